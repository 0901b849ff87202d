"""Re-training an inner learner on a distilled set alone: the recipes and the loops that run them.

A :class:`Recipe` says how a learner is trained on D (optimiser, step sizes, steps,
init); :func:`retrain` runs it from a fresh init, full batch, either for a fixed
number of steps (differentiable, :func:`~udd_jax.training.unroll.unroll`) or until the
gradient norm stops falling (:func:`train_until_converged`); :func:`retrain_many`
runs it for a batch of sets and seeds at once.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray

from udd_jax import _validation
from udd_jax.inner import learners
from udd_jax.training import optimizers
from udd_jax.training.unroll import unroll


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How to re-train the inner learner on a distilled set: full-batch steps on D.

  Attributes:
    inner_optimizer: ``"adam"`` or ``"sgd"``.
    inner_lr: a step size, or one learned step size per step.
    steps: number of full-batch re-training steps (with ``until_converged``, the minimum).
    init_scale: W starts as ``init_scale * N(0, 1)``, b and a at zero.
    until_converged: after ``steps``, keep training in chunks of
      ``CONVERGENCE_CHUNK`` steps while the inner gradient norm still falls by at least
      ``CONVERGENCE_DROP`` per chunk, up to ``max_steps`` (a constant ``inner_lr`` only).
    max_steps: cap of a converged run (default ``4 * steps``).

  Examples:
    >>> STANDARD_RECIPE.describe()
    'adam lr 0.003, >= 4000 full-batch steps until the gradient norm stops falling (<= 16000), init 0.01 N(0, 1)'
  """

  inner_optimizer: str = "adam"
  inner_lr: float | tuple[float, ...] = 0.01
  steps: int = 200
  init_scale: float = 0.01
  until_converged: bool = False
  max_steps: int | None = None

  def __post_init__(self):
    _validation.check_choice(self.inner_optimizer, "inner_optimizer", optimizers.OPTIMIZERS)
    _validation.check_positive_int(self.steps, "steps")
    _validation.check_positive_float(self.init_scale, "init_scale", allow_zero=True)
    if self.until_converged:
      if isinstance(self.inner_lr, (tuple, list)):
        raise ValueError("a recipe that trains until convergence needs one constant inner_lr, not per-step rates.")
      max_steps = 4 * self.steps if self.max_steps is None else self.max_steps
      if _validation.check_positive_int(max_steps, "max_steps") < self.steps:
        raise ValueError(f"max_steps ({max_steps}) must be at least steps ({self.steps}).")
      object.__setattr__(self, "max_steps", int(max_steps))
    elif self.max_steps is not None:
      raise ValueError("max_steps applies only to a recipe with until_converged=True.")
    if isinstance(self.inner_lr, (tuple, list)):
      lrs = tuple(_validation.check_positive_float(v, "inner_lr") for v in self.inner_lr)
      if len(lrs) != self.steps:
        raise ValueError(f"inner_lr has {len(lrs)} per-step rates but steps is {self.steps}.")
      object.__setattr__(self, "inner_lr", lrs)
    else:
      _validation.check_positive_float(self.inner_lr, "inner_lr")

  def step_sizes(self, steps: int | None = None) -> np.ndarray:
    """Step sizes for ``steps`` steps (default ``steps``); learned rates continue with their last value."""
    steps = self.steps if steps is None else steps
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
    steps = (f">= {self.steps} full-batch steps until the gradient norm stops falling (<= {self.max_steps})"
             if self.until_converged else f"{self.steps} full-batch steps")
    return f"{self.inner_optimizer} {lr}, {steps}, init {self.init_scale:g} N(0, 1)"

  def to_config(self) -> dict[str, Any]:
    """JSON: ``inner_optimizer``, ``inner_lr``, ``steps``, ``init_scale`` (and ``until_converged``, ``max_steps``)."""
    lr = list(self.inner_lr) if isinstance(self.inner_lr, tuple) else float(self.inner_lr)
    config = dict(inner_optimizer=self.inner_optimizer, inner_lr=lr, steps=int(self.steps), init_scale=float(self.init_scale))
    if self.until_converged:
      config |= dict(until_converged=True, max_steps=int(self.max_steps))
    return config

  @classmethod
  def from_config(cls, config: dict[str, Any]) -> Recipe:
    """The recipe of :meth:`to_config`'s dict; the old key ``inner_steps`` is read as ``steps``."""
    if not isinstance(config, dict):
      raise TypeError(f"a recipe config must be a dict; got {type(config).__name__}.")
    if "steps" not in config and "inner_steps" in config:  # the key's old name (distilled sets of format 1)
      config = {("steps" if k == "inner_steps" else k): v for k, v in config.items()}
    missing = [k for k in ("inner_optimizer", "inner_lr", "steps", "init_scale") if k not in config]
    if missing:
      raise ValueError(f"the recipe config lacks {missing}; it needs inner_optimizer, inner_lr, steps and init_scale.")
    lr = config["inner_lr"]
    return cls(
        inner_optimizer=config["inner_optimizer"],
        inner_lr=tuple(lr) if isinstance(lr, (list, tuple)) else float(lr),
        steps=int(config["steps"]),
        init_scale=float(config["init_scale"]),
        until_converged=bool(config.get("until_converged", False)),
        max_steps=config.get("max_steps"),
    )


# The standard recipe of docs/METHOD.md section 5: it does not come from D, and it is the learner the
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
  params = learner.init(k_init, images.shape[1], n_hidden, init_scale=init_scale, dtype=images.dtype)
  loss = lambda p, d: learner.loss(p, d, k_loss)
  transform = optimizers.direction("adam" if adam else "sgd")
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
  params = learner.init(k_init, images.shape[1], n_hidden, init_scale=init_scale, dtype=images.dtype)
  loss = lambda p: learner.loss(p, images, k_loss)
  opt = optimizers.optimizer("adam" if adam else "sgd", lr)
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
        adam=recipe.inner_optimizer == "adam", min_steps=recipe.steps, max_steps=recipe.max_steps,
    )
    return params, loss, gnorm
  return retrain_with_step_sizes(
      images, jnp.asarray(recipe.step_sizes(steps), images.dtype), key, learner=learner, n_hidden=n_hidden,
      init_scale=recipe.init_scale, adam=recipe.inner_optimizer == "adam",
  )


@functools.partial(jax.jit, static_argnames=("learner", "n_hidden", "adam"))
def _retrain_many_with_step_sizes(sets, step_sizes, keys, init_scale, *, learner, n_hidden, adam):
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


def retrain_many(
    sets: Float[Array, "S N d"], keys: PRNGKeyArray, recipe: Recipe, *, learner: learners.InnerLearner, n_hidden: int,
    steps: int | None = None,
) -> tuple[Any, Array, Array, Array]:
  """Re-trains one learner per (set, key) with ``recipe``, as :func:`retrain` does for one.

  ``steps`` overrides the recipe's number of steps, as in :func:`retrain`. One
  compilation per shape of ``sets`` (step sizes and init scale are traced).

  Returns:
    (params, final losses, final gradient norms, steps taken), each stacked over S.
  """
  adam = recipe.inner_optimizer == "adam"
  if recipe.until_converged and steps is None:
    return _converge_many(sets, keys, recipe.inner_lr, recipe.init_scale, learner=learner, n_hidden=n_hidden, adam=adam,
                          min_steps=recipe.steps, max_steps=recipe.max_steps)
  n = recipe.steps if steps is None else steps
  params, losses, gnorms = _retrain_many_with_step_sizes(
      sets, jnp.asarray(recipe.step_sizes(n), sets.dtype), keys, recipe.init_scale, learner=learner, n_hidden=n_hidden,
      adam=adam,
  )
  return params, losses, gnorms, jnp.full(losses.shape, n)
