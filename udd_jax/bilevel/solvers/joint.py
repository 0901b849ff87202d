"""Joint solvers: D, the learner and the heads optimised together, the inner problem as a penalty.

* :class:`Penalty`: task losses + (mu/2)||grad_w L_in(w; D)||^2.
* :class:`ValueFunction`: the optimal value reformulation, task losses +
  mu (L_in(w; D) - L_in(w'; D)) with w' from warm-started inner steps (Danskin).

Both drive w to a stationary point of L_in on D as the penalty weight ``mu`` grows
(:func:`mu_schedule`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from udd_jax import _validation
from udd_jax.bilevel.problem import TaskBatch
from udd_jax.bilevel.solvers.base import Metrics, Problem, SolverBase, apply_updates, diversity, init_common
from udd_jax.inner.penalty import gradient_penalty
from udd_jax.training import optimizers
from udd_jax.training.unroll import inner_solve



@dataclasses.dataclass(frozen=True)
class MuSchedule:
  """The penalty weight over outer steps; a callable ``step -> mu`` that prints and saves as its settings."""

  kind: str
  init: float
  final: float | None = None
  steps: int | None = None

  def __post_init__(self):
    _validation.check_choice(self.kind, "mu schedule", ("constant", "geometric", "linear"))
    _validation.check_positive_float(self.init, "mu init")
    if self.kind != "constant":
      if self.final is None or self.steps is None:
        raise ValueError(f"a {self.kind} mu schedule needs both final and steps.")
      _validation.check_positive_float(self.final, "mu final")
      _validation.check_positive_int(self.steps, "mu steps")

  def to_config(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def __call__(self, step: Array) -> Array:
    if self.kind == "constant":
      return optax.constant_schedule(self.init)(step)
    if self.kind == "linear":
      return optax.linear_schedule(self.init, self.final, self.steps)(step)
    return optax.exponential_decay(self.init, self.steps, self.final / self.init, end_value=self.final)(step)


def mu_schedule(kind: str, init: float, *, final: float | None = None, steps: int | None = None) -> MuSchedule:
  """The penalty weight ``mu`` over outer steps: ``"constant"``, ``"geometric"`` or ``"linear"``.

  ``geometric`` and ``linear`` go from ``init`` to ``final`` over ``steps`` steps and
  stay there.

  Examples:
    >>> s = mu_schedule("geometric", 1.0, final=100.0, steps=10)
    >>> [round(float(s(t)), 3) for t in (0, 5, 10, 20)]
    [1.0, 10.0, 100.0, 100.0]
  """
  return MuSchedule(kind, init, final, steps)


# mu grows from 0.01 (the task losses dominate) to 100 (w is driven to a stationary point of
# L_in on D): distill's default since the solvers existed.
DEFAULT_MU = mu_schedule("geometric", 0.01, final=100.0, steps=2000)


def as_mu(value: Any) -> float | MuSchedule:
  """The penalty weight as data: a non-negative float, a :class:`MuSchedule`, or its config dict."""
  if isinstance(value, MuSchedule):
    return value
  if isinstance(value, dict):
    unknown = sorted(set(value) - {f.name for f in dataclasses.fields(MuSchedule)})
    if unknown:
      raise TypeError(f"unknown mu schedule field(s) {unknown}; a mu schedule has kind, init, final and steps.")
    return MuSchedule(**value)
  if callable(value):
    raise TypeError("mu must be a float or a MuSchedule (udd_jax.mu_schedule(...)), so that the run's config can "
                    f"replay it; got the callable {value!r}.")
  return _validation.check_positive_float(value, "mu", allow_zero=True)


def _mu_at(mu: float | MuSchedule, step: Array) -> Array:
  return mu(step) if isinstance(mu, MuSchedule) else optax.constant_schedule(mu)(step)


class PenaltyState(NamedTuple):
  """The state of :class:`Penalty`: D, the learner and heads it trains jointly, their optimiser states."""

  step: Array
  images: Float[Array, "N d"]
  params: PyTree
  heads: PyTree
  image_opt_state: optax.OptState
  model_opt_state: optax.OptState
  key: PRNGKeyArray


class ValueFunctionState(NamedTuple):
  """The state of :class:`ValueFunction`: as :class:`PenaltyState`, with the auxiliary learner w' and its optimiser."""

  step: Array
  images: Float[Array, "N d"]
  params: PyTree
  heads: PyTree
  aux_params: PyTree
  aux_opt_state: optax.OptState
  image_opt_state: optax.OptState
  model_opt_state: optax.OptState
  key: PRNGKeyArray


@dataclasses.dataclass(frozen=True)
class JointBase(SolverBase):
  """D, the learner and the heads optimised together: the fields both joint solvers share.

  Attributes:
    mu: penalty weight, a float or a :class:`MuSchedule` of the outer step (see :func:`mu_schedule`);
      by default :data:`DEFAULT_MU`, geometric from 0.01 to 100 over 2000 steps.
    model_optimizer: optimiser of (w, heads) (``"adam"`` or ``"sgd"``).
    model_lr: its step size (under the solver's ``lr_schedule``).
  """

  mu: float | MuSchedule = DEFAULT_MU
  model_optimizer: str = "adam"
  model_lr: float = 1e-3
  # The diversity term is part of the objective these solvers differentiate, so D's chain
  # does not add it a second time.
  diversity_in_objective = True

  def __post_init__(self):
    super().__post_init__()
    object.__setattr__(self, "mu", as_mu(self.mu))
    _validation.check_choice(self.model_optimizer, "model_optimizer", optimizers.OPTIMIZERS)
    _validation.check_positive_float(self.model_lr, "model_lr")

  def model_transform(self) -> optax.GradientTransformation:
    return optimizers.optimizer(self.model_optimizer, self.outer_lr(self.model_lr))

  def joint_step(
      self, problem: Problem, state: PenaltyState | ValueFunctionState, batch: TaskBatch,
      constraint: Callable[[PyTree, Array], tuple[Array, Array]],
  ) -> tuple[Array, PyTree, PyTree, optax.OptState, optax.OptState, Array, Metrics]:
    """One step: min over (D, w, heads) of task losses + constraint(w, D) - lambda div(D), D's update through :meth:`image_transform`.

    ``constraint(params, images) -> (weighted value, raw value)``. Returns the updated
    images, params, heads, both optimiser states, the raw constraint value and common metrics.
    """

    def objective(images, model):
      params, heads = model
      outer, _ = problem.outer_loss(params, heads, batch)
      weighted, raw = constraint(params, images)
      div = diversity(images)
      return outer + weighted - self.diversity * div, (outer, raw, div)

    (total, (outer, raw, div)), (g_images, g_model) = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(
        state.images, (state.params, state.heads)
    )
    images, s_images = apply_updates(self.image_transform(), g_images, state.image_opt_state, state.images)
    (params, heads), s_model = apply_updates(self.model_transform(), g_model, state.model_opt_state,
                                             (state.params, state.heads))
    metrics = {
        "objective": total,
        "outer_loss": outer,
        "diversity": div,
        "image_grad_norm": optax.tree.norm(g_images),
    }
    return images, params, heads, s_images, s_model, raw, metrics


@dataclasses.dataclass(frozen=True)
class Penalty(JointBase):
  """Quadratic penalty: min over (D, w, heads) of sum_j L_j + (mu/2)||grad_w L_in(w; D)||^2 - lambda div(D).

  Options: ``mu``, ``model_optimizer``, ``model_lr`` (:class:`JointBase`) and D's
  (:class:`~udd_jax.bilevel.solvers.base.SolverBase`).

  Examples:
    >>> Penalty(mu=1.0).mu, Penalty.default_head, Penalty.default_steps
    (1.0, 'softmax', 600)
  """

  name = "penalty"

  def init(self, problem: Problem, key: PRNGKeyArray, images: Array, basis: jax.typing.ArrayLike | None = None,
           prior: Any = None) -> PenaltyState:
    params, heads, key = init_common(problem, key, images)
    return PenaltyState(jnp.asarray(0), images, params, heads, self.init_image_state(images, basis, prior=prior),
                        self.model_transform().init((params, heads)), key)

  def step(self, problem: Problem, state: PenaltyState, batch: TaskBatch) -> tuple[PenaltyState, Metrics]:
    key, k_inner = jax.random.split(state.key)
    mu = _mu_at(self.mu, state.step)

    def constraint(params, images):
      penalty = gradient_penalty(problem.inner_loss, params, images, k_inner)
      return 0.5 * mu * penalty, penalty

    images, params, heads, s_images, s_model, penalty, metrics = self.joint_step(problem, state, batch, constraint)
    metrics |= {"penalty": penalty, "inner_grad_norm": jnp.sqrt(penalty), "mu": jnp.asarray(mu, penalty.dtype)}
    return PenaltyState(state.step + 1, images, params, heads, s_images, s_model, key), metrics


@dataclasses.dataclass(frozen=True)
class ValueFunction(JointBase):
  """Optimal value reformulation: sum_j L_j + mu (L_in(w; D) - min_w' L_in(w'; D)).

  The minimum is approximated by ``inner_steps`` warm-started steps of
  ``inner_optimizer`` at ``inner_lr`` on an auxiliary w' (started from w when w fits D
  better); by Danskin's theorem the gradient in D is the partial gradient at w'.

  ``mu`` is the penalty weight as in :class:`Penalty` (the same default).

  Examples:
    >>> solver = ValueFunction(inner_steps=3)  # w' takes 3 warm-started steps per outer step
    >>> solver.inner_steps, float(solver.mu(0)), float(solver.mu(2000))  # mu grows from 0.01 to 100
    (3, 0.01, 100.0)
  """

  inner_steps: int = 10
  inner_optimizer: str = "adam"
  inner_lr: float = 1e-2
  name = "value_function"

  def __post_init__(self):
    super().__post_init__()
    _validation.check_positive_int(self.inner_steps, "inner_steps")
    _validation.check_choice(self.inner_optimizer, "inner_optimizer", optimizers.OPTIMIZERS)
    _validation.check_positive_float(self.inner_lr, "inner_lr")

  def inner_transform(self) -> optax.GradientTransformation:
    return optimizers.optimizer(self.inner_optimizer, self.inner_lr)

  def init(self, problem: Problem, key: PRNGKeyArray, images: Array, basis: jax.typing.ArrayLike | None = None,
           prior: Any = None) -> ValueFunctionState:
    params, heads, key = init_common(problem, key, images)
    return ValueFunctionState(jnp.asarray(0), images, params, heads, params, self.inner_transform().init(params),
                              self.init_image_state(images, basis, prior=prior), self.model_transform().init((params, heads)), key)

  def step(self, problem: Problem, state: ValueFunctionState, batch: TaskBatch) -> tuple[ValueFunctionState, Metrics]:
    key, k_inner = jax.random.split(state.key)
    mu = _mu_at(self.mu, state.step)
    inner = lambda p, images: problem.inner_loss(p, images, k_inner)

    w_is_better = inner(state.params, state.images) < inner(state.aux_params, state.images)
    w_start = jax.tree.map(lambda a, b: jnp.where(w_is_better, a, b), state.params, state.aux_params)
    solved = inner_solve(
        lambda p: inner(p, state.images), w_start, state.aux_opt_state, self.inner_transform(), max_steps=self.inner_steps
    )
    w_prime = solved.params

    def constraint(params, images):
      gap = inner(params, images) - inner(w_prime, images)
      return mu * gap, gap

    images, params, heads, s_images, s_model, gap, metrics = self.joint_step(problem, state, batch, constraint)
    metrics |= {
        "value_gap": gap,
        "inner_value": inner(w_prime, state.images),
        "inner_grad_norm": solved.grad_norm,
        "mu": jnp.asarray(mu, gap.dtype),
    }
    return ValueFunctionState(state.step + 1, images, params, heads, w_prime, solved.opt_state, s_images, s_model,
                              key), metrics
