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
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, PRNGKeyArray

from udd_jax import _validation
from udd_jax.bilevel.problem import TaskBatch
from udd_jax.bilevel.solvers.base import (
    Metrics,
    Problem,
    ScalarOrSchedule,
    SolverBase,
    SolverState,
    apply_updates,
    init_common,
    diversity,
)
from udd_jax.inner.penalty import gradient_penalty
from udd_jax.training.unroll import inner_solve


def _schedule(value: ScalarOrSchedule, name: str) -> Callable[[Array], Array]:
  if callable(value):
    return value
  return optax.constant_schedule(_validation.check_positive_float(value, name, allow_zero=True))



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


def _joint_step(
    solver: Penalty | ValueFunction, problem: Problem, state: SolverState, batch: TaskBatch,
    constraint: Callable[[Any, Array], tuple[Array, Array]],
) -> tuple[Any, Any, Any, tuple[Any, Any], Array, Metrics]:
  """One step of a joint method: min over (D, w, heads) of task losses + constraint(w, D) - lambda div(D).

  ``constraint(params, images) -> (weighted value, raw value)``. Returns the updated
  images, params, heads, optimiser states, the raw constraint value and common metrics.
  """

  def objective(images, model):
    params, heads = model
    outer, _ = problem.outer_loss(params, heads, batch)
    weighted, raw = constraint(params, images)
    div = diversity(images)
    return outer + weighted - solver.diversity * div, (outer, raw, div)

  (total, (outer, raw, div)), (g_images, g_model) = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(
      state.images, (state.params, state.heads)
  )
  s_images, s_model = state.opt_state
  images, s_images = apply_updates(solver.image_optimizer, g_images, s_images, state.images)
  (params, heads), s_model = apply_updates(solver.model_optimizer, g_model, s_model, (state.params, state.heads))
  metrics = {
      "objective": total,
      "outer_loss": outer,
      "diversity": div,
      "image_grad_norm": optax.tree.norm(g_images),
  }
  return images, params, heads, (s_images, s_model), raw, metrics


@dataclasses.dataclass(frozen=True)
class Penalty(SolverBase):
  """Quadratic penalty: min over (D, w, heads) of sum_j L_j + (mu/2)||grad_w L_in(w; D)||^2 - lambda div(D).

  Attributes:
    mu: penalty weight, a float or an optax schedule of the outer step (see :func:`mu_schedule`);
      by default :data:`DEFAULT_MU`, geometric from 0.01 to 100 over 2000 steps.
    diversity: weight ``lambda`` of the diversity term (0 disables it).
    image_optimizer: optax optimiser for D.
    model_optimizer: optax optimiser for (w, heads).

  State: ``extra`` is ``()``; ``opt_state`` is ``(images, (w, heads))``.

  Examples:
    >>> Penalty(mu=1.0).mu, Penalty.default_head, Penalty.default_steps
    (1.0, 'softmax', 600)
  """

  mu: ScalarOrSchedule = DEFAULT_MU
  model_optimizer: optax.GradientTransformation = optax.adam(1e-3)
  name = "penalty"

  def __post_init__(self):
    super().__post_init__()
    _schedule(self.mu, "mu")

  def init(self, problem: Problem, key: PRNGKeyArray, images: Array) -> SolverState:
    params, heads, key = init_common(problem, key, images)
    opt_state = (self.image_optimizer.init(images), self.model_optimizer.init((params, heads)))
    return SolverState(jnp.asarray(0), images, params, heads, (), opt_state, key)

  def step(self, problem: Problem, state: SolverState, batch: TaskBatch) -> tuple[SolverState, Metrics]:
    key, k_inner = jax.random.split(state.key)
    mu = _schedule(self.mu, "mu")(state.step)

    def constraint(params, images):
      penalty = gradient_penalty(problem.inner_loss, params, images, k_inner)
      return 0.5 * mu * penalty, penalty

    images, params, heads, opt_state, penalty, metrics = _joint_step(self, problem, state, batch, constraint)
    metrics |= {"penalty": penalty, "inner_grad_norm": jnp.sqrt(penalty), "mu": jnp.asarray(mu, penalty.dtype)}
    return SolverState(state.step + 1, images, params, heads, (), opt_state, key), metrics


@dataclasses.dataclass(frozen=True)
class ValueFunction(SolverBase):
  """Optimal value reformulation: sum_j L_j + mu (L_in(w; D) - min_w' L_in(w'; D)).

  The minimum is approximated by ``inner_steps`` warm-started steps of
  ``inner_optimizer`` on an auxiliary w' (started from w when w fits D better);
  by Danskin's theorem the gradient in D is the partial gradient at w'.

  ``mu`` is the penalty weight as in :class:`Penalty` (the same default).

  State: ``extra`` is ``(w', inner optimiser state)``; ``opt_state`` is ``(images, (w, heads))``.

  Examples:
    >>> solver = ValueFunction(inner_steps=3)  # w' takes 3 warm-started steps per outer step
    >>> solver.inner_steps, float(solver.mu(0)), float(solver.mu(2000))  # mu grows from 0.01 to 100
    (3, 0.01, 100.0)
  """

  mu: ScalarOrSchedule = DEFAULT_MU
  inner_steps: int = 10
  inner_optimizer: optax.GradientTransformation = optax.adam(1e-2)
  model_optimizer: optax.GradientTransformation = optax.adam(1e-3)
  name = "value_function"

  def __post_init__(self):
    super().__post_init__()
    _schedule(self.mu, "mu")
    _validation.check_positive_int(self.inner_steps, "inner_steps")

  def init(self, problem: Problem, key: PRNGKeyArray, images: Array) -> SolverState:
    params, heads, key = init_common(problem, key, images)
    extra = (params, self.inner_optimizer.init(params))
    opt_state = (self.image_optimizer.init(images), self.model_optimizer.init((params, heads)))
    return SolverState(jnp.asarray(0), images, params, heads, extra, opt_state, key)

  def step(self, problem: Problem, state: SolverState, batch: TaskBatch) -> tuple[SolverState, Metrics]:
    key, k_inner = jax.random.split(state.key)
    mu = _schedule(self.mu, "mu")(state.step)
    inner = lambda p, images: problem.inner_loss(p, images, k_inner)

    w_prime, s_prime = state.extra
    w_is_better = inner(state.params, state.images) < inner(w_prime, state.images)
    w_start = jax.tree.map(lambda a, b: jnp.where(w_is_better, a, b), state.params, w_prime)
    solved = inner_solve(
        lambda p: inner(p, state.images), w_start, s_prime, self.inner_optimizer, max_steps=self.inner_steps
    )
    w_prime = solved.params

    def constraint(params, images):
      gap = inner(params, images) - inner(w_prime, images)
      return mu * gap, gap

    images, params, heads, opt_state, gap, metrics = _joint_step(self, problem, state, batch, constraint)
    metrics |= {
        "value_gap": gap,
        "inner_value": inner(w_prime, state.images),
        "inner_grad_norm": solved.grad_norm,
        "mu": jnp.asarray(mu, gap.dtype),
    }
    extra = (w_prime, solved.opt_state)
    return SolverState(state.step + 1, images, params, heads, extra, opt_state, key), metrics
