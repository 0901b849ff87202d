"""What every bilevel solver shares: its state, the problem it accepts, the base class and small helpers.

Every solver has the same interface::

    state = solver.init(problem, key, images)
    state, metrics = solver.step(problem, state, batch)   # pure; jit it once

``images`` is the distilled set D, shape (N, d), in the space the learner sees.
``metrics`` is a flat dict of scalars (the diagnostics: outer loss, inner gradient
norm, CG iterations and residual, ...). Optimisers are optax throughout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray, Scalar

from udd_jax import _validation
from udd_jax.bilevel.problem import BilevelProblem, TaskBatch
from udd_jax.heads import linear as heads_lib
from udd_jax.training.recipes import STANDARD_RECIPE, Recipe

Metrics = dict[str, Array]
ScalarOrSchedule = float | Callable[[Array], Array]


class Problem(Protocol):
  """What a solver asks of the problem it solves.

  :class:`~udd_jax.bilevel.problem.BilevelProblem` is one; a toy problem with a
  closed-form answer (as in the tests) is another. Only a ``BilevelProblem`` has its
  images checked by ``init``.
  """

  @property
  def head(self) -> heads_lib.Head:
    """The task head (``has_params`` False for a closed-form head)."""
    ...

  @property
  def class_mask(self) -> np.ndarray:
    """Boolean (T, C_max): which padded classes exist for each task."""
    ...

  def inner_loss(self, params: Any, images: Float[Array, "N d"], key: PRNGKeyArray) -> Scalar:
    """The unsupervised fit of ``params`` on ``images``."""
    ...

  def outer_loss(self, params: Any, heads: Any, batch: TaskBatch) -> tuple[Scalar, Float[Array, " T"]]:
    """The task losses: their sum and one per task."""
    ...

  def features(self, params: Any, x: Float[Array, "n d"]) -> Float[Array, "n K"]:
    """The learner's features of ``x``."""
    ...

  def init_params(self, key: PRNGKeyArray, dtype: Any = ...) -> Any:
    """A fresh random init of the inner learner."""
    ...

  def init_heads(self, key: PRNGKeyArray, dtype: Any = ...) -> Any:
    """Fresh task-head parameters, stacked over tasks."""
    ...


class SolverState(NamedTuple):
  """The whole state of a distillation run; a pytree, so it checkpoints as arrays.

  Attributes:
    step: number of outer steps taken.
    images: the distilled set D, (N, d).
    params: inner parameters: the jointly learned w (penalty, OVR), the warm-started
      inner solution w*(D) (implicit) or the last unrolled w_T (unrolled).
    heads: task-head parameters stacked over tasks (``()`` for ridge heads).
    extra: solver-specific state (see each solver).
    opt_state: optax states, a tuple (see each solver).
    key: PRNG key for the next step.
  """

  step: Array
  images: Float[Array, "N d"]
  params: Any
  heads: Any
  extra: Any
  opt_state: tuple[Any, ...]
  key: PRNGKeyArray



@dataclasses.dataclass(frozen=True)
class SolverBase:
  """What the driver asks of every solver beyond ``init`` and ``step``, and the fields all share.

  A solver owns its defaults: its dataclass fields, and these class attributes.

  Attributes:
    diversity: weight ``lambda`` of the seed's diversity term on D (0 disables it).
    image_optimizer: optax optimiser for D.
    name: the solver's name in :data:`~udd_jax.bilevel.solvers.SOLVERS`.
    default_steps: outer steps of a distillation run that does not say.
    default_head: the task head a distillation run uses unless told (``"ridge"`` or ``"softmax"``).
  """

  diversity: float = 0.0
  image_optimizer: optax.GradientTransformation = optax.adam(1e-2)
  name: ClassVar[str]
  default_steps: ClassVar[int] = 600
  default_head: ClassVar[str] = "softmax"

  def __post_init__(self):
    _validation.check_positive_float(self.diversity, "diversity", allow_zero=True)

  def current_params(self, state: SolverState) -> Any:
    """The single learner the driver reports on and saves: ``state.params`` unless a solver keeps several."""
    return state.params

  def recipe(self, state: SolverState, init_scale: float, given: Recipe | None = None) -> Recipe:
    """The recipe a distilled set ships: how a user re-trains a learner on it.

    Every solver but the unrolled one and the pool targets the learner at convergence
    (argmin_w L_in(w; D)), which is what the standard recipe trains; ``given`` (a recipe
    the user chose) replaces it.

    Args:
      state: the solver's state at the end of the run.
      init_scale: the scale of fresh inner weights of the run.
      given: the recipe the user asked for, if any.
    """
    if given is not None:
      return given
    return dataclasses.replace(STANDARD_RECIPE, init_scale=init_scale)


@dataclasses.dataclass(frozen=True)
class FreshHeadsBase(SolverBase):
  """Base of the solvers whose learners change identity from step to step (fresh inits, a pool).

  Their hidden units come out in any order, so task heads are refitted at every step from
  their init (:func:`fresh_heads`), and a closed-form ridge head, refitted at no cost, is
  the default.

  Attributes:
    head_steps: optimiser steps of a softmax head fitted from its init at each outer step.
    head_optimizer: optax optimiser for those steps.
  """

  head_steps: int = 50
  head_optimizer: optax.GradientTransformation = optax.adam(0.1)
  default_head = "ridge"

  def __post_init__(self):
    super().__post_init__()
    _validation.check_positive_int(self.head_steps, "head_steps")

  def fit_fresh_heads(self, problem: Problem, params: Any, batch: TaskBatch, key: PRNGKeyArray, dtype: Any) -> Any:
    """Heads fitted from their init at fixed features of ``params``."""
    return fresh_heads(problem, params, batch, key, self.head_optimizer, self.head_steps, dtype)


def diversity(images: Float[Array, "N d"]) -> Scalar:
  """Mean squared distance of the distilled points from their mean (the seed's diversity term)."""
  return jnp.mean(jnp.sum((images - jnp.mean(images, axis=0)) ** 2, axis=1))


def apply_updates(optimizer: optax.GradientTransformation, grads: Any, opt_state: Any, params: Any) -> tuple[Any, Any]:
  """One optax step: ``(params, opt_state)`` after ``grads``."""
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def fit_heads(
    problem: Problem, heads: Any, opt_state: Any, optimizer: optax.GradientTransformation, params: Any, batch: TaskBatch,
    steps: int,
) -> tuple[Any, Any, Array]:
  """A few optimiser steps on the heads at fixed features; returns heads, state and the loss."""
  feats = jax.lax.stop_gradient(jax.vmap(problem.features, in_axes=(None, 0))(params, batch.x))
  mask = jnp.asarray(problem.class_mask)

  def loss(h):
    return heads_lib.multitask_loss(problem.head, h, feats, batch.y, mask)[0]

  if not problem.head.has_params:
    return heads, opt_state, loss(heads)

  def body(carry, _):
    h, s = carry
    h, s = apply_updates(optimizer, jax.grad(loss)(h), s, h)
    return (h, s), None

  (heads, opt_state), _ = jax.lax.scan(body, (heads, opt_state), None, length=steps)
  return heads, opt_state, loss(heads)


def fresh_heads(
    problem: Problem, params: Any, batch: TaskBatch, key: PRNGKeyArray, optimizer: optax.GradientTransformation, steps: int,
    dtype: Any,
) -> Any:
  """Heads fitted from their init at fixed features of ``params`` (a ridge head needs no fitting).

  For solvers whose learner changes identity from step to step (fresh inits, a pool):
  their hidden units come out in any order, so heads cannot be carried over.
  """
  heads = problem.init_heads(key, dtype)
  return fit_heads(problem, heads, optimizer.init(heads), optimizer, params, batch, steps)[0]


def init_common(problem: Problem, key: PRNGKeyArray, images: Array) -> tuple[Any, Any, PRNGKeyArray]:
  """Checks D against the problem; returns initial inner parameters, heads and the key left over."""
  if isinstance(problem, BilevelProblem):
    problem.check_images(images)
  k_params, k_heads, key = jax.random.split(key, 3)
  return problem.init_params(k_params, images.dtype), problem.init_heads(k_heads, images.dtype), key

