"""The honest evaluation protocol of SPEC section 5.

1. Re-train the inner learner from fresh random inits on D alone with the recipe
   stored with D (and, as a robustness figure, with 10x the steps).
2. Features of the whole real training set; a converged multinomial logistic head.
3. Test accuracy, mean +- std over seeds, beside the baselines.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray

from udd_jax import _validation
from udd_jax.bilevel.inner_solve import unroll
from udd_jax.data.preprocessing import Preprocessing, fit_preprocessing
from udd_jax.evaluation import logistic
from udd_jax.inner import learners

INNER_OPTIMIZERS = {"sgd": optax.identity, "adam": optax.scale_by_adam}
BASELINES = ("raw_pixels", "random_w", "random_subset", "kmeans", "full_data", "supervised")


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How to re-train the inner learner on a distilled set: full-batch steps on D.

  Attributes:
    inner_optimizer: ``"adam"`` or ``"sgd"``.
    inner_lr: a step size, or one learned step size per step.
    inner_steps: number of full-batch steps.
    init_scale: W starts as ``init_scale * N(0, 1)``, b and a at zero.
  """

  inner_optimizer: str = "adam"
  inner_lr: float | tuple[float, ...] = 0.01
  inner_steps: int = 200
  init_scale: float = 0.01

  def __post_init__(self):
    _validation.check_choice(self.inner_optimizer, "inner_optimizer", INNER_OPTIMIZERS)
    _validation.check_positive_int(self.inner_steps, "inner_steps")
    _validation.check_positive_float(self.init_scale, "init_scale", allow_zero=True)
    if isinstance(self.inner_lr, (tuple, list)):
      lrs = tuple(_validation.check_positive_float(v, "inner_lr") for v in self.inner_lr)
      if len(lrs) != self.inner_steps:
        raise ValueError(f"inner_lr has {len(lrs)} per-step rates but inner_steps is {self.inner_steps}.")
      object.__setattr__(self, "inner_lr", lrs)
    else:
      _validation.check_positive_float(self.inner_lr, "inner_lr")

  def step_sizes(self, steps: int | None = None) -> np.ndarray:
    """Step sizes for ``steps`` steps (default ``inner_steps``); learned rates continue with their last value."""
    steps = self.inner_steps if steps is None else steps
    if isinstance(self.inner_lr, tuple):
      lrs = np.asarray(self.inner_lr, np.float32)
      return np.concatenate([lrs, np.full(max(steps - len(lrs), 0), lrs[-1], np.float32)])[:steps]
    return np.full(steps, self.inner_lr, np.float32)

  def to_config(self) -> dict[str, Any]:
    lr = list(self.inner_lr) if isinstance(self.inner_lr, tuple) else float(self.inner_lr)
    return dict(inner_optimizer=self.inner_optimizer, inner_lr=lr, inner_steps=int(self.inner_steps), init_scale=float(self.init_scale))

  @classmethod
  def from_config(cls, config: dict[str, Any]) -> Recipe:
    if not isinstance(config, dict):
      raise TypeError(f"a recipe config must be a dict; got {type(config).__name__}.")
    missing = [k for k in ("inner_optimizer", "inner_lr", "inner_steps", "init_scale") if k not in config]
    if missing:
      raise ValueError(f"the recipe config lacks {missing}; it needs inner_optimizer, inner_lr, inner_steps and init_scale.")
    lr = config["inner_lr"]
    return cls(
        inner_optimizer=config["inner_optimizer"],
        inner_lr=tuple(lr) if isinstance(lr, (list, tuple)) else float(lr),
        inner_steps=int(config["inner_steps"]),
        init_scale=float(config["init_scale"]),
    )


def retrain_with_step_sizes(
    images: Float[Array, "N d"],
    step_sizes: Float[Array, " T"],
    key: PRNGKeyArray,
    *,
    learner: learners.InnerLearner,
    n_hidden: int,
    init_scale: float | Array,
    adam: bool,
) -> tuple[Any, Array, Array]:
  """Trains a fresh learner on ``images`` alone, full batch, one step per entry of ``step_sizes``.

  ``adam`` selects Adam-scaled updates over plain gradient steps. ``step_sizes`` and
  ``init_scale`` may be traced, so one compilation serves every recipe of a given length.
  Returns (params, final inner loss, final gradient norm).
  """
  k_init, k_loss = jax.random.split(key)
  params = learner.init(k_init, images.shape[1], n_hidden, init_scale=1.0, dtype=images.dtype)
  params = params._replace(W=init_scale * params.W)
  loss = lambda p, d: learner.loss(p, d, k_loss)
  transform = optax.scale_by_adam() if adam else optax.identity()
  params = unroll(loss, params, images, step_sizes, transform=transform)
  return params, loss(params, images), optax.tree.norm(jax.grad(loss)(params, images))


def retrain(
    images: Float[Array, "N d"],
    recipe: Recipe,
    key: PRNGKeyArray,
    *,
    learner: learners.InnerLearner,
    n_hidden: int,
    steps: int | None = None,
) -> tuple[Any, Array, Array]:
  """Trains a fresh learner on ``images`` alone with ``recipe``; returns (params, final loss, grad norm)."""
  return retrain_with_step_sizes(
      images, jnp.asarray(recipe.step_sizes(steps), images.dtype), key, learner=learner, n_hidden=n_hidden,
      init_scale=recipe.init_scale, adam=recipe.inner_optimizer == "adam",
  )


@dataclasses.dataclass
class Row:
  """One line of an evaluation table."""

  name: str
  accuracies: list[float]
  inner_loss: float | None = None
  grad_norm: float | None = None
  note: str = ""

  @property
  def mean(self) -> float:
    return float(np.mean(self.accuracies))

  @property
  def std(self) -> float:
    return float(np.std(self.accuracies)) if len(self.accuracies) > 1 else 0.0


@dataclasses.dataclass
class EvaluationReport:
  """Test accuracies of a distilled set and its baselines; prints as a markdown table."""

  rows: list[Row]
  settings: dict[str, Any]

  def __getitem__(self, name: str) -> Row:
    for row in self.rows:
      if row.name == name:
        return row
    raise KeyError(f"no row {name!r}; rows are {[r.name for r in self.rows]}")

  def to_markdown(self) -> str:
    lines = [
        "| features from | test accuracy (%) | seeds | final inner loss | inner grad norm | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in self.rows:
      acc = f"{100 * r.mean:.2f} +- {100 * r.std:.2f}" if len(r.accuracies) > 1 else f"{100 * r.mean:.2f}"
      loss = "" if r.inner_loss is None else f"{r.inner_loss:.4g}"
      gnorm = "" if r.grad_norm is None else f"{r.grad_norm:.2g}"
      lines.append(f"| {r.name} | {acc} | {len(r.accuracies)} | {loss} | {gnorm} | {r.note} |")
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.to_markdown()

  def to_dict(self) -> dict[str, Any]:
    return dict(settings=self.settings, rows=[dataclasses.asdict(r) | dict(mean=r.mean, std=r.std) for r in self.rows])


@functools.partial(jax.jit, static_argnames=("n_classes",))
def _probe(feats_train, y_train, feats_test, y_test, l2, *, n_classes) -> Array:
  """Accuracies of converged logistic heads, vmapped over a leading seed axis of the features."""

  def one(ftr, fte):
    head = logistic.fit_logistic(ftr, y_train, n_classes, l2=l2)
    return logistic.accuracy(head, fte, y_test)

  return jax.vmap(one)(feats_train, feats_test)


@functools.partial(jax.jit, static_argnames=("learner", "n_hidden", "adam"))
def _retrain_many(sets, step_sizes, keys, init_scale, *, learner, n_hidden, adam):
  """:func:`retrain_with_step_sizes` vmapped over (sets, keys); one compilation per shape."""
  return jax.vmap(
      lambda d, k: retrain_with_step_sizes(d, step_sizes, k, learner=learner, n_hidden=n_hidden, init_scale=init_scale, adam=adam)
  )(sets, keys)


def kmeans(key: PRNGKeyArray, x: Float[Array, "n d"], k: int, *, iterations: int = 50) -> Float[Array, "k d"]:
  """Lloyd's k-means from k distinct random data points; empty clusters keep their centre."""
  centres = x[jax.random.choice(key, x.shape[0], (k,), replace=False)]

  def body(c, _):
    d2 = jnp.sum(x**2, 1)[:, None] - 2 * x @ c.T + jnp.sum(c**2, 1)[None, :]
    assign = jax.nn.one_hot(jnp.argmin(d2, axis=1), k, dtype=x.dtype)
    counts = assign.sum(0)
    new = (assign.T @ x) / jnp.maximum(counts, 1.0)[:, None]
    return jnp.where(counts[:, None] > 0, new, c), None

  return jax.lax.scan(body, centres, None, length=iterations)[0]


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


def evaluate(
    images: Any,
    train: tuple[Any, Any],
    test: tuple[Any, Any],
    *,
    n_hidden: int,
    inner: str | learners.InnerLearner = "ae",
    recipe: Recipe | dict[str, Any] | None = None,
    seeds: int = 5,
    preprocessing: Preprocessing | None = None,
    joint_params: Any = None,
    baselines: Sequence[str] = BASELINES,
    convergence_factor: int = 10,
    head_l2: float = 1e-4,
    seed: int = 10_000,
    sigma2: float = 1.0,
    noise_std: float = 0.1,
) -> EvaluationReport:
  """Honest evaluation of a distilled set D (SPEC section 5).

  Args:
    images: the distilled set, (N, ...) in the same value space and shape as ``train``'s inputs.
    train: ``(x_train, y_train)`` real labelled training data.
    test: ``(x_test, y_test)`` real labelled test data.
    n_hidden: number of hidden units K of the learner re-trained on D (another K than
      distillation used gives the cross-learner transfer figure).
    inner: inner loss of the re-trained learner (``"ae"``, ``"score_matching"``, ...).
    recipe: the inner recipe stored with D (a :class:`Recipe` or its config dict).
    seeds: number of fresh learner inits (never used during distillation).
    preprocessing: the map from value space to learner inputs stored with D (flatten only if None).
    joint_params: the jointly learned w of a penalty/OVR run, reported beside.
    baselines: which of ``raw_pixels``, ``random_w``, ``random_subset``, ``kmeans``,
      ``full_data``, ``supervised`` to add.
    convergence_factor: the robustness row re-trains with this many times the steps (0: no such row).
    head_l2: L2 of the logistic head (on standardised features).
    seed: base of the evaluation PRNG stream.
    sigma2, noise_std: inner-loss hyperparameters.

  Returns:
    An :class:`EvaluationReport`; ``print(report)`` shows the markdown table.
  """
  seeds = _validation.check_positive_int(seeds, "seeds")
  n_hidden = _validation.check_positive_int(n_hidden, "n_hidden")
  convergence_factor = _validation.check_non_negative_int(convergence_factor, "convergence_factor")
  _validation.check_non_negative_int(seed, "seed")
  head_l2 = _validation.check_positive_float(head_l2, "head_l2", allow_zero=True)
  x_train, y_train = _validation.check_labelled(train, "train")
  x_test, y_test = _validation.check_labelled(test, "test")
  images = _validation.check_array(images, "images", min_ndim=2)
  if images.shape[1:] != x_train.shape[1:] or x_test.shape[1:] != x_train.shape[1:]:
    raise ValueError(
        f"images {images.shape[1:]}, train x {x_train.shape[1:]} and test x {x_test.shape[1:]} must share one trailing shape."
    )
  for b in baselines:
    _validation.check_choice(b, "baseline", BASELINES)
  if images.shape[0] > x_train.shape[0] and {"random_subset", "kmeans"} & set(baselines):
    raise ValueError(f"images has {images.shape[0]} rows, more than the {x_train.shape[0]} training inputs the "
                     "random_subset and kmeans baselines draw that many from.")
  if recipe is None:
    recipe = Recipe()
  elif isinstance(recipe, dict):
    recipe = Recipe.from_config(recipe)
  elif not isinstance(recipe, Recipe):
    raise TypeError(f"recipe must be a Recipe or its config dict; got {type(recipe).__name__}.")
  if preprocessing is not None and not isinstance(preprocessing, Preprocessing):
    raise TypeError(f"preprocessing must be the Preprocessing stored with D; got {type(preprocessing).__name__}.")
  learner = learners.get_inner_learner(inner, sigma2=sigma2, noise_std=noise_std)
  prep = preprocessing if preprocessing is not None else fit_preprocessing(x_train[:1], method="none")
  n_classes = int(max(y_train.max(), y_test.max())) + 1

  z_train = jnp.asarray(prep.apply(x_train))
  z_test = jnp.asarray(prep.apply(x_test))
  d_images = jnp.asarray(prep.apply(images))
  if joint_params is not None:
    try:
      _validation.check_static_data(jax.tree.map(jnp.asarray, joint_params), d_images, "images")
    except (TypeError, ValueError) as e:
      raise type(e)(f"joint_params do not fit the images: {e}") from None
  y_train_j, y_test_j = jnp.asarray(y_train), jnp.asarray(y_test)
  keys = jax.random.split(jax.random.key(seed), seeds)
  feats = jax.jit(jax.vmap(learner.features, in_axes=(0, None)))
  rows: list[Row] = []

  def probe(feats_train, feats_test) -> np.ndarray:
    return np.asarray(_probe(feats_train, y_train_j, feats_test, y_test_j, head_l2, n_classes=n_classes))

  def learner_rows(name: str, sets: Array, note: str = "", with_convergence: bool = True):
    """Re-train on each of ``sets`` (S, N, d) with the recipe (and 10x), probe the features."""
    variants = [(name, recipe.inner_steps, note)]
    if with_convergence and convergence_factor:
      steps = convergence_factor * recipe.inner_steps
      variants.append((f"{name}, {convergence_factor}x steps", steps, f"{steps} steps"))
    for row_name, steps, row_note in variants:
      params, losses, gnorms = _retrain_many(
          sets, jnp.asarray(recipe.step_sizes(steps), sets.dtype), keys, recipe.init_scale,
          learner=learner, n_hidden=n_hidden, adam=recipe.inner_optimizer == "adam",
      )
      accs = probe(feats(params, z_train), feats(params, z_test))
      rows.append(Row(row_name, accs.tolist(), float(jnp.mean(losses)), float(jnp.mean(gnorms)), row_note))

  learner_rows("distilled D, fresh learner (recipe)", jnp.broadcast_to(d_images, (seeds, *d_images.shape)),
               f"{recipe.inner_optimizer}, {recipe.inner_steps} steps")
  if joint_params is not None:
    jp = jax.tree.map(lambda a: jnp.asarray(a)[None], joint_params)
    accs = probe(feats(jp, z_train), feats(jp, z_test))
    rows.append(Row("jointly learned w (not a re-trained learner)", accs.tolist()))
  n = d_images.shape[0]
  if "raw_pixels" in baselines:
    acc = probe(z_train[None], z_test[None])
    rows.append(Row("raw pixels", acc.tolist()))
  if "random_w" in baselines:
    params = jax.vmap(lambda k: learner.init(k, z_train.shape[1], n_hidden, init_scale=recipe.init_scale, dtype=z_train.dtype))(keys)
    accs = probe(feats(params, z_train), feats(params, z_test))
    rows.append(Row("random untrained W", accs.tolist(), note=f"init {recipe.init_scale} N(0, 1)"))
  if "random_subset" in baselines:
    subsets = jax.vmap(lambda k: z_train[jax.random.choice(k, z_train.shape[0], (n,), replace=False)])(
        jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    )
    learner_rows(f"random real subset of {n}", subsets, with_convergence=False)
  if "kmeans" in baselines:
    centres = jax.jit(jax.vmap(lambda k: kmeans(k, z_train, n)))(jax.vmap(lambda k: jax.random.fold_in(k, 2))(keys))
    learner_rows(f"k-means centroids ({n})", centres, with_convergence=False)
  if "full_data" in baselines:
    params = jax.jit(lambda k: train_on_full_data(k, z_train, learner=learner, n_hidden=n_hidden, init_scale=recipe.init_scale))(
        jax.random.fold_in(keys[0], 3)
    )
    params = jax.tree.map(lambda a: a[None], params)
    accs = probe(feats(params, z_train), feats(params, z_test))
    rows.append(Row("learner trained on all training data", accs.tolist(), note="3000 Adam steps, batch 256"))
  if "supervised" in baselines:
    acc = train_supervised(jax.random.fold_in(keys[0], 4), z_train, y_train_j, z_test, y_test_j,
                           n_hidden=n_hidden, n_classes=n_classes)
    rows.append(Row(f"supervised network, K={n_hidden} (ceiling)", [acc], note="end to end, 12000 Adam steps"))
  settings = dict(
      n_distill=int(n), n_hidden=n_hidden, inner=learner.name, seeds=seeds, recipe=recipe.to_config(),
      head="multinomial logistic, L-BFGS, standardised features", head_l2=head_l2,
      n_train=int(x_train.shape[0]), n_test=int(x_test.shape[0]),
  )
  return EvaluationReport(rows, settings)
