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
    inner_steps: number of full-batch steps (with ``until_converged``, the minimum).
    init_scale: W starts as ``init_scale * N(0, 1)``, b and a at zero.
    until_converged: after ``inner_steps``, keep training in chunks of
      ``CONVERGENCE_CHUNK`` steps while the inner gradient norm still falls by at least
      ``CONVERGENCE_DROP`` per chunk, up to ``max_steps`` (a constant ``inner_lr`` only).
    max_steps: cap of a converged run (default ``4 * inner_steps``).

  Examples:
    >>> STANDARD_RECIPE.describe()
    'adam lr 0.003, >= 4000 full-batch steps until the gradient norm stops falling (<= 16000), init 0.01 N(0, 1)'
  """

  inner_optimizer: str = "adam"
  inner_lr: float | tuple[float, ...] = 0.01
  inner_steps: int = 200
  init_scale: float = 0.01
  until_converged: bool = False
  max_steps: int | None = None

  def __post_init__(self):
    _validation.check_choice(self.inner_optimizer, "inner_optimizer", INNER_OPTIMIZERS)
    _validation.check_positive_int(self.inner_steps, "inner_steps")
    _validation.check_positive_float(self.init_scale, "init_scale", allow_zero=True)
    if self.until_converged:
      if isinstance(self.inner_lr, (tuple, list)):
        raise ValueError("a recipe that trains until convergence needs one constant inner_lr, not per-step rates.")
      max_steps = 4 * self.inner_steps if self.max_steps is None else self.max_steps
      if _validation.check_positive_int(max_steps, "max_steps") < self.inner_steps:
        raise ValueError(f"max_steps ({max_steps}) must be at least inner_steps ({self.inner_steps}).")
      object.__setattr__(self, "max_steps", int(max_steps))
    elif self.max_steps is not None:
      raise ValueError("max_steps applies only to a recipe with until_converged=True.")
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

  def for_learner(self, n_hidden: int, made_for: int | None) -> Recipe:
    """This recipe for a learner with ``n_hidden`` units, when it was made for ``made_for`` units.

    Plain gradient steps are tuned to the learner's curvature, which grows with K (every
    hidden unit adds to the reconstruction): their step sizes scale by ``made_for /
    n_hidden``. Adam's steps are scale-free and stay as they are.
    """
    if made_for is None or made_for == n_hidden or self.inner_optimizer != "sgd":
      return self
    factor = made_for / n_hidden
    lr = tuple(v * factor for v in self.inner_lr) if isinstance(self.inner_lr, tuple) else self.inner_lr * factor
    return dataclasses.replace(self, inner_lr=lr)

  def describe(self) -> str:
    """One line for reports: optimiser, step sizes, steps, init."""
    lr = f"{len(self.inner_lr)} learned step sizes" if isinstance(self.inner_lr, tuple) else f"lr {self.inner_lr:g}"
    steps = (f">= {self.inner_steps} full-batch steps until the gradient norm stops falling (<= {self.max_steps})"
             if self.until_converged else f"{self.inner_steps} full-batch steps")
    return f"{self.inner_optimizer} {lr}, {steps}, init {self.init_scale:g} N(0, 1)"

  def to_config(self) -> dict[str, Any]:
    lr = list(self.inner_lr) if isinstance(self.inner_lr, tuple) else float(self.inner_lr)
    config = dict(inner_optimizer=self.inner_optimizer, inner_lr=lr, inner_steps=int(self.inner_steps), init_scale=float(self.init_scale))
    if self.until_converged:
      config |= dict(until_converged=True, max_steps=int(self.max_steps))
    return config

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
        until_converged=bool(config.get("until_converged", False)),
        max_steps=config.get("max_steps"),
    )


# SPEC section 5's standard recipe: it does not come from D, and it is the learner the
# bilevel problem is about (argmin_w L_in(w; D)) and the one a user trains on a set.
STANDARD_RECIPE = Recipe("adam", 3e-3, 4000, 0.01, until_converged=True)
CONVERGENCE_CHUNK = 500
CONVERGENCE_DROP = 0.05


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


def train_until_converged(
    images: Float[Array, "N d"],
    key: PRNGKeyArray,
    *,
    learner: learners.InnerLearner,
    n_hidden: int,
    lr: float | Array,
    init_scale: float | Array,
    adam: bool,
    min_steps: int,
    max_steps: int,
) -> tuple[Any, Array, Array, Array]:
  """Trains a fresh learner on ``images`` alone, full batch, until its gradient norm stops falling.

  Exactly ``min_steps`` steps; then chunks of ``CONVERGENCE_CHUNK`` steps while the
  gradient norm at the end of a chunk is below ``1 - CONVERGENCE_DROP`` times the one a
  chunk earlier and another chunk fits within ``max_steps``. A ``lax.while_loop`` over
  ``lax.scan`` chunks, so it vmaps over seeds (each seed stops on its own test) and is
  never differentiated.

  Returns:
    (params, final inner loss, final gradient norm, steps taken).
  """
  k_init, k_loss = jax.random.split(key)
  params = learner.init(k_init, images.shape[1], n_hidden, init_scale=1.0, dtype=images.dtype)
  params = params._replace(W=init_scale * params.W)
  loss = lambda p: learner.loss(p, images, k_loss)
  opt = optax.adam(lr) if adam else optax.sgd(lr)
  grad_norm = lambda p: optax.tree.norm(jax.grad(loss)(p))
  chunk = CONVERGENCE_CHUNK

  def run(p, s, n):
    def one(carry, _):
      p, s = carry
      updates, s = opt.update(jax.grad(loss)(p), s, p)
      return (optax.apply_updates(p, updates), s), None

    return jax.lax.scan(one, (p, s), None, length=n)[0]

  def cond(carry):
    _, _, steps, previous, current = carry
    return (steps + chunk <= max_steps) & (current < (1.0 - CONVERGENCE_DROP) * previous)

  def body(carry):
    p, s, steps, _, current = carry
    p, s = run(p, s, chunk)
    return p, s, steps + chunk, current, grad_norm(p)

  # The minimum, with the gradient norm one chunk before its end as the first comparison.
  head = max(min_steps - chunk, 0)
  p, s = run(params, opt.init(params), head)
  previous = grad_norm(p) if head else jnp.asarray(jnp.inf, images.dtype)
  p, s = run(p, s, min_steps - head)
  carry = (p, s, jnp.asarray(min_steps), previous, grad_norm(p))
  params, _, steps, _, gnorm = jax.lax.while_loop(cond, body, carry)
  return params, loss(params), gnorm, steps


def retrain(
    images: Float[Array, "N d"],
    recipe: Recipe,
    key: PRNGKeyArray,
    *,
    learner: learners.InnerLearner,
    n_hidden: int,
    steps: int | None = None,
) -> tuple[Any, Array, Array]:
  """Trains a fresh learner on ``images`` alone with ``recipe``; returns (params, final loss, grad norm).

  ``steps`` overrides the recipe's number of steps (a fixed count, even for a recipe
  that trains until convergence).
  """
  if recipe.until_converged and steps is None:
    params, loss, gnorm, _ = train_until_converged(
        images, key, learner=learner, n_hidden=n_hidden, lr=recipe.inner_lr, init_scale=recipe.init_scale,
        adam=recipe.inner_optimizer == "adam", min_steps=recipe.inner_steps, max_steps=recipe.max_steps,
    )
    return params, loss, gnorm
  return retrain_with_step_sizes(
      images, jnp.asarray(recipe.step_sizes(steps), images.dtype), key, learner=learner, n_hidden=n_hidden,
      init_scale=recipe.init_scale, adam=recipe.inner_optimizer == "adam",
  )


@dataclasses.dataclass
class Row:
  """One line of an evaluation table.

  ``accuracies`` are the headline probe's (logistic head on the raw features),
  ``accuracies_standardized`` the same head on standardised features; ``recipe`` says
  which recipe trained the learner (``"standard"``, ``"D's recipe"``, or ``""`` when no
  learner was trained on a set).
  """

  name: str
  accuracies: list[float]
  inner_loss: float | None = None
  grad_norm: float | None = None
  note: str = ""
  accuracies_standardized: list[float] | None = None
  recipe: str = ""
  steps: float | None = None

  @property
  def mean(self) -> float:
    """Mean accuracy; NaN for a row whose learner diverged (no accuracies)."""
    return float(np.mean(self.accuracies)) if self.accuracies else float("nan")

  @property
  def std(self) -> float:
    return float(np.std(self.accuracies)) if len(self.accuracies) > 1 else 0.0


def _format_accuracy(accs: list[float] | None) -> str:
  if accs is None:
    return ""
  if not accs:
    return "diverged"
  return f"{100 * np.mean(accs):.2f} +- {100 * np.std(accs):.2f}" if len(accs) > 1 else f"{100 * np.mean(accs):.2f}"


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
        "| features from | learner recipe | test accuracy, raw features (%) | standardised features (%) | seeds "
        "| inner steps | final inner loss | inner grad norm | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in self.rows:
      loss = "" if r.inner_loss is None else f"{r.inner_loss:.4g}"
      gnorm = "" if r.grad_norm is None else f"{r.grad_norm:.2g}"
      steps = "" if r.steps is None else f"{r.steps:.0f}"
      std_text = "diverged" if not r.accuracies and r.recipe else _format_accuracy(r.accuracies_standardized)
      lines.append(f"| {r.name} | {r.recipe} | {_format_accuracy(r.accuracies)} | {std_text} "
                   f"| {len(r.accuracies)} | {steps} | {loss} | {gnorm} | {r.note} |")
    return "\n".join(lines)

  def recipes_markdown(self) -> str:
    """Which recipe is which: the settings of the standard recipe and of D's own."""
    return "\n".join(f"- {name}: {Recipe.from_config(cfg).describe()}" for name, cfg in self.settings["recipes"].items())

  def __str__(self) -> str:
    return self.to_markdown() + "\n\n" + self.recipes_markdown()

  def to_dict(self) -> dict[str, Any]:
    return dict(settings=self.settings, rows=[dataclasses.asdict(r) | dict(mean=r.mean, std=r.std) for r in self.rows])


@functools.partial(jax.jit, static_argnames=("n_classes", "standardize", "max_steps"))
def _probe(feats_train, y_train, feats_test, y_test, l2, *, n_classes, standardize, max_steps) -> Array:
  """Accuracies of converged logistic heads, vmapped over a leading seed axis of the features."""

  def one(ftr, fte):
    head = logistic.fit_logistic(ftr, y_train, n_classes, l2=l2, standardize=standardize, max_steps=max_steps)
    return logistic.accuracy(head, fte, y_test)

  return jax.vmap(one)(feats_train, feats_test)


@functools.partial(jax.jit, static_argnames=("learner", "n_hidden", "adam"))
def _retrain_many(sets, step_sizes, keys, init_scale, *, learner, n_hidden, adam):
  """:func:`retrain_with_step_sizes` vmapped over (sets, keys); one compilation per shape."""
  return jax.vmap(
      lambda d, k: retrain_with_step_sizes(d, step_sizes, k, learner=learner, n_hidden=n_hidden, init_scale=init_scale, adam=adam)
  )(sets, keys)


@functools.partial(jax.jit, static_argnames=("learner", "n_hidden", "adam", "min_steps", "max_steps"))
def _converge_many(sets, keys, lr, init_scale, *, learner, n_hidden, adam, min_steps, max_steps):
  """:func:`train_until_converged` vmapped over (sets, keys)."""
  return jax.vmap(
      lambda d, k: train_until_converged(d, k, learner=learner, n_hidden=n_hidden, lr=lr, init_scale=init_scale, adam=adam,
                                         min_steps=min_steps, max_steps=max_steps)
  )(sets, keys)


def _train_many(sets: Array, keys: Array, recipe: Recipe, *, learner, n_hidden: int, steps: int | None = None):
  """Re-trains one learner per (set, key) with ``recipe``; returns (params, losses, grad norms, steps taken)."""
  adam = recipe.inner_optimizer == "adam"
  if recipe.until_converged and steps is None:
    return _converge_many(sets, keys, recipe.inner_lr, recipe.init_scale, learner=learner, n_hidden=n_hidden, adam=adam,
                          min_steps=recipe.inner_steps, max_steps=recipe.max_steps)
  n = recipe.inner_steps if steps is None else steps
  params, losses, gnorms = _retrain_many(sets, jnp.asarray(recipe.step_sizes(n), sets.dtype), keys, recipe.init_scale,
                                         learner=learner, n_hidden=n_hidden, adam=adam)
  return params, losses, gnorms, jnp.full(losses.shape, n)


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
    recipe_n_hidden: int | None = None,
    standard_recipe: Recipe = STANDARD_RECIPE,
    seeds: int = 5,
    preprocessing: Preprocessing | None = None,
    joint_params: Any = None,
    baselines: Sequence[str] = BASELINES,
    convergence_factor: int = 0,
    head_l2: float = 2e-5,
    head_steps: int = 1000,
    seed: int = 10_000,
    sigma2: float = 1.0,
    noise_std: float = 0.1,
) -> EvaluationReport:
  """Honest evaluation of a distilled set D (SPEC section 5).

  Every learner row re-trains fresh learners (seeds never used in distillation) on a set
  alone, with two recipes side by side: ``standard_recipe``, which does not come from D
  (Adam 3e-3, full batch, at least 4000 steps and until the gradient norm stops falling,
  init 0.01), and D's own ``recipe`` (omitted when it is the standard one). Each is
  probed by a converged multinomial logistic head (L-BFGS, mean cross-entropy +
  ``head_l2/2 ||V||^2``) fitted on the features of every real training image, on the raw
  features (the headline, ``Row.accuracies``) and on standardised ones.

  Args:
    images: the distilled set, (N, ...) in the same value space and shape as ``train``'s inputs.
    train: ``(x_train, y_train)`` real labelled training data.
    test: ``(x_test, y_test)`` real labelled test data.
    n_hidden: number of hidden units K of the learner re-trained on D (another K than
      distillation used gives the cross-learner transfer figure).
    inner: inner loss of the re-trained learner (``"ae"``, ``"score_matching"``, ...).
    recipe: the inner recipe stored with D (a :class:`Recipe` or its config dict); None
      means D ships the standard recipe.
    recipe_n_hidden: the K that ``recipe`` was made for; for another ``n_hidden``, plain
      gradient step sizes are rescaled (:meth:`Recipe.for_learner`). A recipe under which
      a learner still diverges gets a row marked "diverged" instead of accuracies.
    standard_recipe: the recipe that does not come from D.
    seeds: number of fresh learner inits (never used during distillation).
    preprocessing: the map from value space to learner inputs stored with D (flatten only if None).
    joint_params: the jointly learned w of a penalty/OVR run, reported beside.
    baselines: which of ``raw_pixels``, ``random_w``, ``random_subset``, ``kmeans``,
      ``full_data``, ``supervised`` to add.
    convergence_factor: if > 0, a robustness row re-trains with D's recipe for this many
      times its steps.
    head_l2: L2 of the logistic head, ``head_l2/2 ||V||^2`` (2e-5: SPEC's ``1e-5 ||V||^2``).
    head_steps: L-BFGS iteration budget of each head.
    seed: base of the evaluation PRNG stream.
    sigma2, noise_std: inner-loss hyperparameters.

  Returns:
    An :class:`EvaluationReport`; ``print(report)`` shows the markdown table and the recipes.

  Examples:
    >>> import udd_jax
    >>> (x, y), (xt, yt) = udd_jax.load_dataset("digits")
    >>> quick = udd_jax.Recipe("adam", 0.01, 50, 0.01, until_converged=True, max_steps=100)
    >>> report = evaluate(x[:20], (x, y), (xt, yt), n_hidden=8, seeds=2, standard_recipe=quick,
    ...                   baselines=("raw_pixels",), head_steps=200)
    >>> [(r.name, r.recipe) for r in report.rows]
    [('distilled D', 'standard'), ('raw pixels', '')]
  """
  seeds = _validation.check_positive_int(seeds, "seeds")
  n_hidden = _validation.check_positive_int(n_hidden, "n_hidden")
  convergence_factor = _validation.check_non_negative_int(convergence_factor, "convergence_factor")
  _validation.check_non_negative_int(seed, "seed")
  head_l2 = _validation.check_positive_float(head_l2, "head_l2", allow_zero=True)
  head_steps = _validation.check_positive_int(head_steps, "head_steps")
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
    recipe = standard_recipe
  elif isinstance(recipe, dict):
    recipe = Recipe.from_config(recipe)
  elif not isinstance(recipe, Recipe):
    raise TypeError(f"recipe must be a Recipe or its config dict; got {type(recipe).__name__}.")
  if recipe_n_hidden is not None:
    recipe = recipe.for_learner(n_hidden, _validation.check_positive_int(recipe_n_hidden, "recipe_n_hidden"))
  if not isinstance(standard_recipe, Recipe):
    raise TypeError(f"standard_recipe must be a Recipe; got {type(standard_recipe).__name__}.")
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
  recipes = [("standard", standard_recipe)] + ([("D's recipe", recipe)] if recipe != standard_recipe else [])

  def probe(params=None, raw=None) -> tuple[list[float], list[float]]:
    """Raw-feature and standardised-feature accuracies of the learners ``params`` (or of inputs ``raw``)."""
    f_train, f_test = (feats(params, z_train), feats(params, z_test)) if raw is None else raw
    out = [np.asarray(_probe(f_train, y_train_j, f_test, y_test_j, head_l2, n_classes=n_classes, standardize=std,
                             max_steps=head_steps)).tolist() for std in (False, True)]
    return out[0], out[1]

  def learner_rows(name: str, sets: Array, note: str = ""):
    """Re-train on each of ``sets`` (S, N, d) with each recipe, probe the features."""
    variants = [(name, label, r, None) for label, r in recipes]
    if convergence_factor:
      steps = convergence_factor * recipe.inner_steps
      variants.append((f"{name}, {convergence_factor}x steps", "D's recipe", recipe, steps))
    for row_name, label, r, steps in variants:
      params, losses, gnorms, taken = _train_many(sets, keys, r, learner=learner, n_hidden=n_hidden, steps=steps)
      if not bool(jnp.all(jnp.isfinite(losses))):
        rows.append(Row(row_name, [], note=f"diverged: this recipe does not train a K = {n_hidden} {learner.name} learner "
                        "(non-finite inner loss); not probed", recipe=label))
        continue
      raw_accs, std_accs = probe(params)
      rows.append(Row(row_name, raw_accs, float(jnp.mean(losses)), float(jnp.mean(gnorms)), note, std_accs, label,
                      float(jnp.mean(taken))))

  learner_rows("distilled D", jnp.broadcast_to(d_images, (seeds, *d_images.shape)))
  if joint_params is not None:
    raw_accs, std_accs = probe(jax.tree.map(lambda a: jnp.asarray(a)[None], joint_params))
    rows.append(Row("jointly learned w (not a re-trained learner)", raw_accs, accuracies_standardized=std_accs))
  n = d_images.shape[0]
  if "raw_pixels" in baselines:
    raw_accs, std_accs = probe(raw=(z_train[None], z_test[None]))
    rows.append(Row("raw pixels", raw_accs, accuracies_standardized=std_accs))
  if "random_w" in baselines:
    init = standard_recipe.init_scale
    params = jax.vmap(lambda k: learner.init(k, z_train.shape[1], n_hidden, init_scale=init, dtype=z_train.dtype))(keys)
    raw_accs, std_accs = probe(params)
    rows.append(Row("random untrained W", raw_accs, note=f"init {init} N(0, 1)", accuracies_standardized=std_accs))
  if "random_subset" in baselines:
    subsets = jax.vmap(lambda k: z_train[jax.random.choice(k, z_train.shape[0], (n,), replace=False)])(
        jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    )
    learner_rows(f"random real subset of {n}", subsets)
  if "kmeans" in baselines:
    centres = jax.jit(jax.vmap(lambda k: kmeans(k, z_train, n)))(jax.vmap(lambda k: jax.random.fold_in(k, 2))(keys))
    learner_rows(f"k-means centroids ({n})", centres)
  if "full_data" in baselines:
    params = jax.jit(lambda k: train_on_full_data(k, z_train, learner=learner, n_hidden=n_hidden,
                                                   init_scale=standard_recipe.init_scale))(jax.random.fold_in(keys[0], 3))
    raw_accs, std_accs = probe(jax.tree.map(lambda a: a[None], params))
    rows.append(Row("learner trained on all training data", raw_accs, note="3000 Adam steps, batch 256",
                    accuracies_standardized=std_accs))
  if "supervised" in baselines:
    acc = train_supervised(jax.random.fold_in(keys[0], 4), z_train, y_train_j, z_test, y_test_j,
                           n_hidden=n_hidden, n_classes=n_classes)
    rows.append(Row(f"supervised network, K={n_hidden} (ceiling)", [acc], note="end to end, 12000 Adam steps"))
  settings = dict(
      n_distill=int(n), n_hidden=n_hidden, inner=learner.name, seeds=seeds,
      recipes={label: r.to_config() for label, r in recipes},
      head="multinomial logistic, L-BFGS, mean CE + head_l2/2 ||V||^2; raw features (headline) and standardised",
      head_l2=head_l2, head_steps=head_steps, n_train=int(x_train.shape[0]), n_test=int(x_test.shape[0]),
  )
  return EvaluationReport(rows, settings)
