"""What a distilled set is compared with: the probe every row shares, and the baseline rows.

Every accuracy comes from the same probe (:class:`Probe`): converged multinomial logistic
heads on the features of every real training image, raw and standardised. The baselines
are raw pixels, a random untrained learner, random real subsets and k-means centroids of
the size of D (re-trained like D), a learner trained on all the data, and a supervised
network of the same width (the ceiling).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PRNGKeyArray

from udd_jax import io
from udd_jax.data.clustering import kmeans
from udd_jax.evaluation import logistic
from udd_jax.evaluation.cache import BaselineCache
from udd_jax.evaluation.report import Row
from udd_jax.inner import learners

BASELINES = ("raw_pixels", "random_w", "random_subset", "kmeans", "full_data", "supervised")


@functools.partial(jax.jit, static_argnames=("n_classes", "standardize", "max_steps", "method"))
def probe_accuracies(feats_train, y_train, feats_test, y_test, l2, *, n_classes, standardize, max_steps,
                     method="auto") -> Array:
  """Accuracies of converged logistic heads (``fit_logistic``'s ``method``), one per entry of a leading seed axis.

  The seeds' heads are fitted one after another (``lax.map``): vmapped, their solver loops
  would run in lockstep, each seed waiting for the slowest at every level of the loops,
  and the Newton heads took 2-5 times longer (docs/BENCHMARKS.md section (j)).
  """

  def one(feats):
    ftr, fte = feats
    head = logistic.fit_logistic(ftr, y_train, n_classes, l2=l2, standardize=standardize, max_steps=max_steps,
                                 method=method)
    return logistic.accuracy(head, fte, y_test)

  return jax.lax.map(one, (feats_train, feats_test))


@dataclasses.dataclass
class Probe:
  """The probe of every row: logistic heads on the features of the real training set, tested on the test set.

  Attributes:
    learner: the inner learner whose features are probed.
    z_train, y_train, z_test, y_test: real data in the learner's input space.
    n_classes: number of classes.
    head_l2: L2 of the logistic head.
    head_steps: iteration budget of each head (Newton steps or L-BFGS iterations).
    head_method: the heads' solver, :func:`udd_jax.evaluation.fit_logistic`'s ``method``.
    features: the learner's features, jitted and vmapped over a leading seed axis of the params.
  """

  learner: learners.InnerLearner
  z_train: Float[Array, "n d"]
  y_train: Array
  z_test: Float[Array, "m d"]
  y_test: Array
  n_classes: int
  head_l2: float
  head_steps: int
  head_method: str = "auto"
  features: Callable[[Any, Array], Array] = dataclasses.field(init=False, repr=False)

  def __post_init__(self):
    self.features = jax.jit(jax.vmap(self.learner.features, in_axes=(0, None)))

  def __call__(self, params: Any = None, raw: tuple[Array, Array] | None = None) -> tuple[list[float], list[float]]:
    """Raw-feature and standardised-feature accuracies of the learners ``params`` (or of inputs ``raw``).

    ``params`` are stacked over seeds; ``raw`` is ``(train, test)`` inputs with a leading axis of 1.
    """
    f_train, f_test = (self.features(params, self.z_train), self.features(params, self.z_test)) if raw is None else raw
    out = [io.host_tree(probe_accuracies(f_train, self.y_train, f_test, self.y_test, self.head_l2, n_classes=self.n_classes,
                                       standardize=std, max_steps=self.head_steps,
                                       method=self.head_method)).tolist() for std in (False, True)]
    return out[0], out[1]


def train_on_full_data(
    key: PRNGKeyArray, x: Array, *, learner: learners.InnerLearner, n_hidden: int, init_scale: float,
    steps: int = 3000, batch_size: int = 256, lr: float = 1e-3,
) -> Any:
  """The inner learner trained on the whole training set with minibatch Adam (an upper reference)."""
  k_init, k_run = jax.random.split(key)
  params = learner.init(k_init, x.shape[1], n_hidden, init_scale=init_scale, dtype=x.dtype)
  opt = optax.adam(lr)

  def body(carry, k):
    p, s = carry
    k_batch, k_loss = jax.random.split(k)
    batch = x[jax.random.randint(k_batch, (batch_size,), 0, x.shape[0])]
    updates, s = opt.update(jax.grad(learner.loss)(p, batch, k_loss), s, p)
    return (optax.apply_updates(p, updates), s), None

  (params, _), _ = jax.lax.scan(body, (params, opt.init(params)), jax.random.split(k_run, steps))
  return params


def train_supervised(
    key: PRNGKeyArray, x: Array, y: Array, x_test: Array, y_test: Array, *, n_hidden: int, n_classes: int,
    steps: int = 12000, batch_size: int = 128, lr: float = 1e-3,
) -> float:
  """A one-hidden-layer sigmoid network with ``n_hidden`` units trained end to end: the ceiling."""
  k_w1, k_w2, k_run = jax.random.split(key, 3)
  d = x.shape[1]
  params = (
      jax.random.normal(k_w1, (d, n_hidden), x.dtype) / math.sqrt(d), jnp.zeros(n_hidden, x.dtype),
      jax.random.normal(k_w2, (n_hidden, n_classes), x.dtype) / math.sqrt(n_hidden), jnp.zeros(n_classes, x.dtype),
  )
  logits = lambda p, a: jax.nn.sigmoid(a @ p[0] + p[1]) @ p[2] + p[3]
  loss = lambda p, a, b: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits(p, a), b))
  opt = optax.adam(optax.cosine_decay_schedule(lr, steps))

  def body(carry, k):
    p, s = carry
    idx = jax.random.randint(k, (batch_size,), 0, x.shape[0])
    updates, s = opt.update(jax.grad(loss)(p, x[idx], y[idx]), s, p)
    return (optax.apply_updates(p, updates), s), None

  (params, _), _ = jax.lax.scan(body, (params, opt.init(params)), jax.random.split(k_run, steps))
  return float(jnp.mean(jnp.argmax(logits(params, x_test), 1) == y_test))


LearnerRows = Callable[[str, Array], list[Row]]

# What each baseline's rows depend on, beside the probe's data and heads (BaselineCache's key).
DEPENDS_ON = {
    "raw_pixels": (),
    "random_w": ("keys", "learner", "n_hidden", "init_scale"),
    "random_subset": ("keys", "learner", "n_hidden", "n", "recipes", "convergence"),
    "kmeans": ("keys", "learner", "n_hidden", "n", "recipes", "convergence"),
    "full_data": ("keys", "learner", "n_hidden", "init_scale"),
    "supervised": ("keys", "n_hidden"),
}
PROBE_KEY = ("z_train", "y_train", "z_test", "y_test", "head_l2", "head_steps", "head_method", "devices")


def baseline_key(name: str) -> tuple[str, ...]:
  """What the rows of baseline ``name`` depend on: the probe's data and heads, then :data:`DEPENDS_ON`."""
  return PROBE_KEY + DEPENDS_ON[name]


def baseline_rows(
    baselines: Sequence[str],
    probe: Probe,
    learner_rows: LearnerRows,
    keys: PRNGKeyArray,
    *,
    n: int,
    n_hidden: int,
    init_scale: float,
    on_row: Callable[..., None] = lambda row, cached=False: None,
    cache: BaselineCache | None = None,
) -> list[Row]:
  """The rows of ``baselines``, in the order of :data:`BASELINES`.

  Args:
    baselines: which baselines to compute.
    probe: the probe of every row.
    learner_rows: ``learner_rows(name, sets)`` re-trains learners on ``sets`` (S, n, d)
      as D's rows are, and gives their rows (random subsets and k-means centroids).
    keys: one key per seed (the evaluation's).
    n: size of D (of the subsets and the number of centroids).
    n_hidden: the learner's number of hidden units.
    init_scale: scale of the random untrained learner and of the full-data learner's init.
    on_row: called with each row as it is done (``learner_rows`` reports the rows it
      computes itself), and with ``cached=True`` for each row read from ``cache``.
    cache: where to read a baseline's rows from, and to store those computed here
      (keyed by :data:`DEPENDS_ON` and :data:`PROBE_KEY`); None computes every row.
  """
  z_train = probe.z_train

  def raw_pixels():
    raw_accs, std_accs = probe(raw=(z_train[None], probe.z_test[None]))
    return [_done(Row("raw pixels", raw_accs, accuracies_standardized=std_accs), on_row)]

  def random_w():
    init = lambda k: probe.learner.init(k, z_train.shape[1], n_hidden, init_scale=init_scale, dtype=z_train.dtype)
    raw_accs, std_accs = probe(jax.vmap(init)(keys))
    return [_done(Row("random untrained W", raw_accs, note=f"init {init_scale} N(0, 1)", accuracies_standardized=std_accs),
                  on_row)]

  def random_subset():
    subsets = jax.vmap(lambda k: z_train[jax.random.choice(k, z_train.shape[0], (n,), replace=False)])(
        jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys))
    return learner_rows(f"random real subset of {n}", subsets)

  def kmeans_rows():
    centres = jax.jit(jax.vmap(lambda k: kmeans(k, z_train, n)))(jax.vmap(lambda k: jax.random.fold_in(k, 2))(keys))
    return learner_rows(f"k-means centroids ({n})", centres)

  def full_data():
    params = jax.jit(lambda k: train_on_full_data(k, z_train, learner=probe.learner, n_hidden=n_hidden,
                                                   init_scale=init_scale))(jax.random.fold_in(keys[0], 3))
    raw_accs, std_accs = probe(jax.tree.map(lambda a: a[None], params))
    return [_done(Row("learner trained on all training data", raw_accs, note="3000 Adam steps, batch 256",
                      accuracies_standardized=std_accs), on_row)]

  def supervised():
    acc = train_supervised(jax.random.fold_in(keys[0], 4), z_train, probe.y_train, probe.z_test, probe.y_test,
                           n_hidden=n_hidden, n_classes=probe.n_classes)
    return [_done(Row(f"supervised network, K={n_hidden} (ceiling)", [acc], note="end to end, 12000 Adam steps"),
                  on_row)]

  compute = dict(raw_pixels=raw_pixels, random_w=random_w, random_subset=random_subset, kmeans=kmeans_rows,
                 full_data=full_data, supervised=supervised)
  rows: list[Row] = []
  for name in BASELINES:
    if name not in baselines:
      continue
    depends_on = baseline_key(name)
    cached = cache.get(name, depends_on) if cache is not None else None
    if cached is not None:
      for row in cached:
        on_row(row, cached=True)
      rows += cached
      continue
    computed = compute[name]()
    if cache is not None and all(r.accuracies for r in computed):  # a diverged row is not kept
      cache.put(name, depends_on, computed)
    rows += computed
  return rows


def _done(row: Row, on_row: Callable[..., None]) -> Row:
  on_row(row)
  return row
