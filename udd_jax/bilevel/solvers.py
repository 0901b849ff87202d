"""Bilevel solvers: small immutable strategy objects with a pure ``init`` and ``step``.

Every solver has the same interface::

    state = solver.init(problem, key, images)
    state, metrics = solver.step(problem, state, batch)   # pure; jit it once

``images`` is the distilled set D, shape (N, d), in the space the learner sees.
``metrics`` is a flat dict of scalars (the diagnostics: outer loss, inner gradient
norm, CG iterations and residual, ...). Optimisers are optax throughout.

* :class:`Penalty`: jointly over (D, w, heads), task losses + (mu/2)||grad_w L_in(w; D)||^2.
* :class:`ValueFunction`: the optimal value reformulation, task losses +
  mu (L_in(w; D) - L_in(w'; D)) with w' from warm-started inner steps (Danskin).
* :class:`Implicit`: w*(D) from a warm-started inner solve; dL/dD by the implicit
  function theorem with CG on damped Hessian-vector products.
* :class:`Unrolled`: differentiate through T inner steps from a fresh random init
  (the original dataset distillation), optionally learning the step sizes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PRNGKeyArray, Scalar

from udd_jax import _validation
from udd_jax.bilevel import implicit_diff
from udd_jax.bilevel.inner_solve import advance, inner_solve, unroll
from udd_jax.bilevel.problem import BilevelProblem, TaskBatch
from udd_jax.heads import linear as heads_lib
from udd_jax.inner.penalty import gradient_penalty

Metrics = dict[str, Array]
ScalarOrSchedule = float | Callable[[Array], Array]


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


class _SolverBase:
  """What the driver asks of every solver beyond ``init`` and ``step``."""

  def current_params(self, state: SolverState) -> Any:
    """The single learner the driver reports on and saves: ``state.params`` unless a solver keeps several."""
    return state.params


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


def diversity(images: Float[Array, "N d"]) -> Scalar:
  """Mean squared distance of the distilled points from their mean (the seed's diversity term)."""
  return jnp.mean(jnp.sum((images - jnp.mean(images, axis=0)) ** 2, axis=1))


def _apply(optimizer: optax.GradientTransformation, grads: Any, opt_state: Any, params: Any) -> tuple[Any, Any]:
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def _fit_heads(
    problem: Any, heads: Any, opt_state: Any, optimizer: optax.GradientTransformation, params: Any, batch: TaskBatch, steps: int
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
    h, s = _apply(optimizer, jax.grad(loss)(h), s, h)
    return (h, s), None

  (heads, opt_state), _ = jax.lax.scan(body, (heads, opt_state), None, length=steps)
  return heads, opt_state, loss(heads)


def _fresh_heads(
    problem: Any, params: Any, batch: TaskBatch, key: PRNGKeyArray, optimizer: optax.GradientTransformation, steps: int, dtype
) -> Any:
  """Heads fitted from their init at fixed features of ``params`` (a ridge head needs no fitting).

  For solvers whose learner changes identity from step to step (fresh inits, a pool):
  their hidden units come out in any order, so heads cannot be carried over.
  """
  heads = problem.init_heads(key, dtype)
  return _fit_heads(problem, heads, optimizer.init(heads), optimizer, params, batch, steps)[0]


def _init_common(problem: Any, key: PRNGKeyArray, images: Array) -> tuple[Any, Any, PRNGKeyArray]:
  if isinstance(problem, BilevelProblem):
    problem.check_images(images)
  k_params, k_heads, key = jax.random.split(key, 3)
  return problem.init_params(k_params, images.dtype), problem.init_heads(k_heads, images.dtype), key


def _joint_step(
    solver: Any, problem: Any, state: SolverState, batch: TaskBatch, constraint: Callable[[Any, Array], tuple[Array, Array]]
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
  images, s_images = _apply(solver.image_optimizer, g_images, s_images, state.images)
  (params, heads), s_model = _apply(solver.model_optimizer, g_model, s_model, (state.params, state.heads))
  metrics = {
      "objective": total,
      "outer_loss": outer,
      "diversity": div,
      "image_grad_norm": optax.tree.norm(g_images),
  }
  return images, params, heads, (s_images, s_model), raw, metrics


@dataclasses.dataclass(frozen=True)
class Penalty(_SolverBase):
  """Quadratic penalty: min over (D, w, heads) of sum_j L_j + (mu/2)||grad_w L_in(w; D)||^2 - lambda div(D).

  Attributes:
    mu: penalty weight, a float or an optax schedule of the outer step (see :func:`mu_schedule`).
    diversity: weight ``lambda`` of the diversity term (0 disables it).
    image_optimizer: optax optimiser for D.
    model_optimizer: optax optimiser for (w, heads).

  State: ``extra`` is ``()``; ``opt_state`` is ``(images, (w, heads))``.
  """

  mu: ScalarOrSchedule = 1.0
  diversity: float = 0.0
  image_optimizer: optax.GradientTransformation = optax.adam(1e-2)
  model_optimizer: optax.GradientTransformation = optax.adam(1e-3)
  name = "penalty"

  def __post_init__(self):
    _schedule(self.mu, "mu")
    _validation.check_positive_float(self.diversity, "diversity", allow_zero=True)

  def init(self, problem: Any, key: PRNGKeyArray, images: Array) -> SolverState:
    params, heads, key = _init_common(problem, key, images)
    opt_state = (self.image_optimizer.init(images), self.model_optimizer.init((params, heads)))
    return SolverState(jnp.asarray(0), images, params, heads, (), opt_state, key)

  def step(self, problem: Any, state: SolverState, batch: TaskBatch) -> tuple[SolverState, Metrics]:
    key, k_inner = jax.random.split(state.key)
    mu = _schedule(self.mu, "mu")(state.step)

    def constraint(params, images):
      penalty = gradient_penalty(problem.inner_loss, params, images, k_inner)
      return 0.5 * mu * penalty, penalty

    images, params, heads, opt_state, penalty, metrics = _joint_step(self, problem, state, batch, constraint)
    metrics |= {"penalty": penalty, "inner_grad_norm": jnp.sqrt(penalty), "mu": jnp.asarray(mu, penalty.dtype)}
    return SolverState(state.step + 1, images, params, heads, (), opt_state, key), metrics


@dataclasses.dataclass(frozen=True)
class ValueFunction(_SolverBase):
  """Optimal value reformulation: sum_j L_j + mu (L_in(w; D) - min_w' L_in(w'; D)).

  The minimum is approximated by ``inner_steps`` warm-started steps of
  ``inner_optimizer`` on an auxiliary w' (started from w when w fits D better);
  by Danskin's theorem the gradient in D is the partial gradient at w'.

  State: ``extra`` is ``(w', inner optimiser state)``; ``opt_state`` is ``(images, (w, heads))``.
  """

  mu: ScalarOrSchedule = 1.0
  diversity: float = 0.0
  inner_steps: int = 10
  inner_optimizer: optax.GradientTransformation = optax.adam(1e-2)
  image_optimizer: optax.GradientTransformation = optax.adam(1e-2)
  model_optimizer: optax.GradientTransformation = optax.adam(1e-3)
  name = "value_function"

  def __post_init__(self):
    _schedule(self.mu, "mu")
    _validation.check_positive_float(self.diversity, "diversity", allow_zero=True)
    _validation.check_positive_int(self.inner_steps, "inner_steps")

  def init(self, problem: Any, key: PRNGKeyArray, images: Array) -> SolverState:
    params, heads, key = _init_common(problem, key, images)
    extra = (params, self.inner_optimizer.init(params))
    opt_state = (self.image_optimizer.init(images), self.model_optimizer.init((params, heads)))
    return SolverState(jnp.asarray(0), images, params, heads, extra, opt_state, key)

  def step(self, problem: Any, state: SolverState, batch: TaskBatch) -> tuple[SolverState, Metrics]:
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


@dataclasses.dataclass(frozen=True)
class Implicit(_SolverBase):
  """Implicit differentiation: dL/dD = -(d^2 L_in / dD dw) (H_ww + damping I)^-1 grad_w L.

  Each step: a warm-started inner solve (``inner_optimizer`` until the gradient
  norm is below ``inner_tol`` or ``inner_steps``), ``head_steps`` updates of the
  heads at w* (so they enter at their optimum, Danskin), then CG for the adjoint
  ``u``, started from the previous step's ``u`` when ``warm_start_adjoint`` (D, w*
  and the heads move little per step, so ``u`` does too, and a few CG iterations
  refine it: amortised implicit differentiation, as Arbel & Mairal 2022's AmIGO).

  State: ``extra`` is ``(inner optimiser state, adjoint u)``; ``opt_state`` is ``(images, heads)``.
  """

  # Few inner and CG iterations per step, both warm-started, and damping 0.1: in 150 s on
  # MNIST |D| = 100 this beat 100 inner steps / 50 CG iterations by 3.4 points (damping
  # 0.1) and 4.0 (damping 1e-3, where CG met negative curvature in 41% of steps);
  # docs/RESULTS.md, "Implicit solver: budget per step".
  inner_steps: int = 5
  inner_tol: float = 1e-4
  inner_optimizer: optax.GradientTransformation = optax.adam(1e-2)
  damping: float = 0.1
  cg_tol: float = 1e-5
  cg_steps: int = 5
  warm_start_adjoint: bool = True
  head_steps: int = 5
  head_optimizer: optax.GradientTransformation = optax.adam(1e-2)
  diversity: float = 0.0
  image_optimizer: optax.GradientTransformation = optax.adam(1e-2)
  name = "implicit"

  def __post_init__(self):
    _validation.check_positive_int(self.inner_steps, "inner_steps")
    _validation.check_positive_float(self.inner_tol, "inner_tol", allow_zero=True)
    _validation.check_positive_float(self.damping, "damping", allow_zero=True)
    _validation.check_positive_int(self.cg_steps, "cg_steps")
    _validation.check_positive_int(self.head_steps, "head_steps")
    _validation.check_positive_float(self.diversity, "diversity", allow_zero=True)

  def init(self, problem: Any, key: PRNGKeyArray, images: Array) -> SolverState:
    params, heads, key = _init_common(problem, key, images)
    opt_state = (self.image_optimizer.init(images), self.head_optimizer.init(heads))
    extra = (self.inner_optimizer.init(params), optax.tree.zeros_like(params))
    return SolverState(jnp.asarray(0), images, params, heads, extra, opt_state, key)

  def step(self, problem: Any, state: SolverState, batch: TaskBatch) -> tuple[SolverState, Metrics]:
    key, k_inner = jax.random.split(state.key)
    inner = lambda p, images: problem.inner_loss(p, images, k_inner)
    s_inner, u_prev = state.extra
    solved = inner_solve(
        lambda p: inner(p, state.images),
        state.params,
        s_inner,
        self.inner_optimizer,
        max_steps=self.inner_steps,
        tol=self.inner_tol,
    )
    s_images, s_heads = state.opt_state
    heads, s_heads, _ = _fit_heads(problem, state.heads, s_heads, self.head_optimizer, solved.params, batch, self.head_steps)
    outer, v = jax.value_and_grad(lambda p: problem.outer_loss(p, heads, batch)[0])(solved.params)
    u, cg = implicit_diff.solve_adjoint(
        inner, solved.params, state.images, v, damping=self.damping, tol=self.cg_tol, max_steps=self.cg_steps,
        init=u_prev if self.warm_start_adjoint else None,
    )
    g_images = implicit_diff.mixed_vjp(inner, solved.params, state.images, u)
    if self.diversity:
      g_images = g_images - self.diversity * jax.grad(diversity)(state.images)
    images, s_images = _apply(self.image_optimizer, g_images, s_images, state.images)
    metrics = {
        "outer_loss": outer,
        "inner_value": inner(solved.params, state.images),
        "inner_grad_norm": solved.grad_norm,
        "inner_steps": solved.num_steps,
        "cg_steps": cg.num_steps,
        "cg_residual": cg.residual,
        "cg_negative_curvature": cg.negative_curvature,
        "image_grad_norm": optax.tree.norm(g_images),
    }
    extra = (solved.opt_state, u)
    new_state = SolverState(state.step + 1, images, solved.params, heads, extra, (s_images, s_heads), key)
    return new_state, metrics


INNER_TRANSFORMS = {"sgd": optax.identity, "adam": optax.scale_by_adam}


@dataclasses.dataclass(frozen=True)
class Unrolled(_SolverBase):
  """Unrolled differentiation through ``unroll_steps`` inner steps from a fresh random init.

  As in the original dataset distillation: each outer step samples a new init w0,
  trains it on D for T steps (``inner_optimizer`` ``"sgd"`` or ``"adam"`` with one
  step size per step, learned when ``learn_step_size``), fits the heads at w_T
  (Danskin), and backpropagates the task losses through the T steps (or only the
  last ``truncate`` of them).

  Because every step starts from a new init, the features of w_T change from step
  to step (hidden units come out in any order), so heads are fitted afresh each
  step: ``head_steps`` steps of ``head_optimizer`` from zero for softmax heads;
  a ridge head (``make_problem(head="ridge")``) is fitted in closed form and is
  the better match for this solver.

  With ``n_inits > 1`` each step trains that many fresh inits (vmapped) and averages
  their task losses: a lower-variance hypergradient of the expected loss over inits,
  at ``n_inits`` times the cost.

  State: ``extra`` is the log step sizes (T,); ``opt_state`` is ``((images, log step sizes),)``;
  ``params`` is the first init's trained learner.
  """

  unroll_steps: int = 20
  inner_optimizer: str = "sgd"
  inner_lr: float = 0.1
  learn_step_size: bool = True
  truncate: int | None = None
  n_inits: int = 1
  head_steps: int = 50
  head_optimizer: optax.GradientTransformation = optax.adam(0.1)
  diversity: float = 0.0
  image_optimizer: optax.GradientTransformation = optax.adam(1e-2)
  name = "unrolled"

  def __post_init__(self):
    _validation.check_choice(self.inner_optimizer, "inner_optimizer", INNER_TRANSFORMS)
    _validation.check_positive_int(self.unroll_steps, "unroll_steps")
    _validation.check_positive_int(self.n_inits, "n_inits")
    _validation.check_positive_float(self.inner_lr, "inner_lr")
    _validation.check_positive_int(self.head_steps, "head_steps")
    _validation.check_positive_float(self.diversity, "diversity", allow_zero=True)
    if self.truncate is not None:
      _validation.check_positive_int(self.truncate, "truncate")

  def init(self, problem: Any, key: PRNGKeyArray, images: Array) -> SolverState:
    params, heads, key = _init_common(problem, key, images)
    log_lr = jnp.full((self.unroll_steps,), jnp.log(self.inner_lr), images.dtype)
    opt_state = (self.image_optimizer.init((images, log_lr)),)
    return SolverState(jnp.asarray(0), images, params, heads, log_lr, opt_state, key)

  def step(self, problem: Any, state: SolverState, batch: TaskBatch) -> tuple[SolverState, Metrics]:
    key, k_init, k_inner, k_heads = jax.random.split(state.key, 4)
    inner = lambda p, images: problem.inner_loss(p, images, k_inner)
    dtype = state.images.dtype
    w0s = jax.vmap(lambda k: problem.init_params(k, dtype))(jax.random.split(k_init, self.n_inits))
    transform = INNER_TRANSFORMS[self.inner_optimizer]()

    def train(images, log_lr):
      train_one = lambda w0: unroll(inner, w0, images, jnp.exp(log_lr), transform=transform, truncate=self.truncate)
      return jax.vmap(train_one)(w0s)

    def fit_and_score(w_final, k):
      heads = _fresh_heads(problem, w_final, batch, k, self.head_optimizer, self.head_steps, dtype)
      outer, v = jax.value_and_grad(lambda p: problem.outer_loss(p, heads, batch)[0])(w_final)
      return heads, outer, jax.tree.map(lambda g: g / self.n_inits, v)

    w_finals, vjp = jax.vjp(train, state.images, state.extra)
    (s_outer,) = state.opt_state
    all_heads, outers, v = jax.vmap(fit_and_score)(w_finals, jax.random.split(k_heads, self.n_inits))
    outer = jnp.mean(outers)
    w_final, heads = jax.tree.map(lambda a: a[0], (w_finals, all_heads))
    g_images, g_log_lr = vjp(v)
    if self.diversity:
      g_images = g_images - self.diversity * jax.grad(diversity)(state.images)
    if not self.learn_step_size:
      g_log_lr = jnp.zeros_like(g_log_lr)
    (images, log_lr), s_outer = _apply(self.image_optimizer, (g_images, g_log_lr), s_outer, (state.images, state.extra))
    metrics = {
        "outer_loss": outer,
        "inner_value": inner(w_final, state.images),
        "inner_grad_norm": optax.tree.norm(jax.grad(inner)(w_final, state.images)),
        "mean_step_size": jnp.mean(jnp.exp(log_lr)),
        "image_grad_norm": optax.tree.norm(g_images),
    }
    new_state = SolverState(state.step + 1, images, w_final, heads, log_lr, (s_outer,), key)
    return new_state, metrics


class PoolState(NamedTuple):
  """The learners of :class:`Pool` beside their parameters (which live in ``SolverState.params``).

  Attributes:
    opt_state: each learner's inner optimiser state, stacked over the pool.
    age: inner steps each learner has taken since its (re)start, (P,).
    adjoint: each learner's last adjoint ``u`` (implicit hypergradient only; warm starts CG).
  """

  opt_state: Any
  age: Array
  adjoint: Any


HYPERGRADIENTS = ("truncated", "implicit")


@dataclasses.dataclass(frozen=True)
class Pool(_SolverBase):
  """D for the learner a user trains: a pool of persistent learners trained towards convergence on D.

  The honest target is ``w*(D)``, a learner trained on D from a fresh init until it
  converges (the standard recipe: ``inner_optimizer`` at ``inner_lr``, full batch). Each
  outer step, every learner of the pool takes ``inner_steps`` more steps on the current D
  and the task losses at the learners give the hypergradient, averaged over the pool:

  * ``"truncated"``: backpropagation through those ``inner_steps`` steps (truncated
    unrolling from the learner's current state, moments included);
  * ``"implicit"``: the implicit function theorem at the learner, CG on damped
    Hessian-vector products, warm-started from the learner's last adjoint.

  A learner restarts from a fresh init after ``lifetime`` inner steps; the pool starts
  with staggered ages, so at any time it holds learners from fresh to nearly
  ``lifetime`` steps old, the whole trajectory of the standard recipe (model pools as in
  FRePo, Zhou et al. 2022). Heads are fitted afresh at each learner (ridge: closed form).

  State: ``params`` is the pool's parameters (stacked, leading axis P); ``extra`` a
  :class:`PoolState`; ``opt_state`` is ``(images,)``.
  """

  pool_size: int = 8
  inner_steps: int = 10
  lifetime: int = 4000
  inner_optimizer: str = "adam"
  inner_lr: float = 3e-3
  hypergradient: str = "truncated"
  min_age: int = 0
  damping: float = 0.1
  cg_steps: int = 10
  cg_tol: float = 1e-6
  head_steps: int = 50
  head_optimizer: optax.GradientTransformation = optax.adam(0.1)
  diversity: float = 0.0
  image_optimizer: optax.GradientTransformation = optax.adam(1e-2)
  name = "pool"

  def __post_init__(self):
    _validation.check_positive_int(self.pool_size, "pool_size")
    _validation.check_positive_int(self.inner_steps, "inner_steps")
    _validation.check_positive_int(self.lifetime, "lifetime")
    if self.lifetime < self.inner_steps:
      raise ValueError(f"lifetime ({self.lifetime}) must be at least inner_steps ({self.inner_steps}).")
    _validation.check_choice(self.inner_optimizer, "inner_optimizer", INNER_TRANSFORMS)
    _validation.check_positive_float(self.inner_lr, "inner_lr")
    _validation.check_choice(self.hypergradient, "hypergradient", HYPERGRADIENTS)
    _validation.check_non_negative_int(self.min_age, "min_age")
    if self.min_age >= self.lifetime:
      raise ValueError(f"min_age ({self.min_age}) must be below lifetime ({self.lifetime}): no learner would count.")
    _validation.check_positive_float(self.damping, "damping", allow_zero=True)
    _validation.check_positive_int(self.cg_steps, "cg_steps")
    _validation.check_positive_int(self.head_steps, "head_steps")
    _validation.check_positive_float(self.diversity, "diversity", allow_zero=True)

  def learner_optimizer(self) -> optax.GradientTransformation:
    return optax.adam(self.inner_lr) if self.inner_optimizer == "adam" else optax.sgd(self.inner_lr)

  def init(self, problem: Any, key: PRNGKeyArray, images: Array) -> SolverState:
    if isinstance(problem, BilevelProblem):
      problem.check_images(images)
    k_params, key = jax.random.split(key)
    params = jax.vmap(lambda k: problem.init_params(k, images.dtype))(jax.random.split(k_params, self.pool_size))
    opt_state = jax.vmap(self.learner_optimizer().init)(params)
    # Staggered ages: learner i first restarts after (P - i) / P of a lifetime, and from then
    # on the pool covers the whole lifetime evenly.
    age = (jnp.arange(self.pool_size) * self.lifetime) // self.pool_size
    extra = PoolState(opt_state, age, optax.tree.zeros_like(params))
    return SolverState(jnp.asarray(0), images, params, (), extra, (self.image_optimizer.init(images),), key)

  def current_params(self, state: SolverState) -> Any:
    """The oldest learner of the pool: the one nearest to convergence."""
    oldest = jnp.argmax(state.extra.age)
    return jax.tree.map(lambda a: a[oldest], state.params)

  def step(self, problem: Any, state: SolverState, batch: TaskBatch) -> tuple[SolverState, Metrics]:
    key, k_fresh, k_inner, k_heads = jax.random.split(state.key, 4)
    inner = lambda p, images: problem.inner_loss(p, images, k_inner)
    dtype = state.images.dtype
    opt = self.learner_optimizer()
    pool = state.extra

    restart = pool.age >= self.lifetime
    pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(restart.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old)
    fresh = jax.vmap(lambda k: problem.init_params(k, dtype))(jax.random.split(k_fresh, self.pool_size))
    params = pick(fresh, state.params)
    opt_state = pick(jax.vmap(opt.init)(fresh), pool.opt_state)
    adjoint = pick(optax.tree.zeros_like(fresh), pool.adjoint)
    age = jnp.where(restart, 0, pool.age)

    def score(w, k):
      heads = _fresh_heads(problem, w, batch, k, self.head_optimizer, self.head_steps, dtype)
      return problem.outer_loss(w, heads, batch)[0]

    def one(w, s, u, k):
      if self.hypergradient == "truncated":
        def through_steps(images):
          w_new, s_new = advance(inner, w, s, images, opt, self.inner_steps)
          return score(w_new, k), (w_new, s_new)

        (outer, (w, s)), g = jax.value_and_grad(through_steps, has_aux=True)(state.images)
        return w, s, u, g, outer, (jnp.asarray(0), jnp.zeros((), dtype), jnp.asarray(False))
      w, s = advance(inner, w, s, state.images, opt, self.inner_steps)
      outer, v = jax.value_and_grad(score)(w, k)
      u, cg = implicit_diff.solve_adjoint(inner, w, state.images, v, damping=self.damping, tol=self.cg_tol,
                                          max_steps=self.cg_steps, init=u)
      return w, s, u, implicit_diff.mixed_vjp(inner, w, state.images, u), outer, tuple(cg)

    params, opt_state, adjoint, grads, outers, (cg_steps, cg_residual, cg_negative) = jax.vmap(one)(
        params, opt_state, adjoint, jax.random.split(k_heads, self.pool_size)
    )
    age = age + self.inner_steps
    weights = (age > self.min_age).astype(dtype)
    weights = weights / jnp.maximum(jnp.sum(weights), 1.0)
    g_images = jnp.tensordot(weights, grads, axes=1)
    if self.diversity:
      g_images = g_images - self.diversity * jax.grad(diversity)(state.images)
    (s_images,) = state.opt_state
    images, s_images = _apply(self.image_optimizer, g_images, s_images, state.images)
    new_state = SolverState(state.step + 1, images, params, (), PoolState(opt_state, age, adjoint), (s_images,), key)
    oldest = self.current_params(new_state)
    metrics = {
        "outer_loss": jnp.sum(weights * outers),
        "inner_value": inner(oldest, state.images),
        "inner_grad_norm": optax.tree.norm(jax.grad(inner)(oldest, state.images)),
        "image_grad_norm": optax.tree.norm(g_images),
    }
    if self.hypergradient == "implicit":
      metrics |= {"cg_steps": jnp.mean(cg_steps), "cg_residual": jnp.median(cg_residual),
                  "cg_negative_curvature": jnp.mean(cg_negative.astype(dtype))}
    return new_state, metrics


SOLVERS = {"penalty": Penalty, "value_function": ValueFunction, "implicit": Implicit, "unrolled": Unrolled, "pool": Pool}
Solver = Penalty | ValueFunction | Implicit | Unrolled | Pool


def get_solver(name: str | Solver, **options: Any) -> Solver:
  """Builds a solver by name (``penalty``, ``value_function``, ``implicit``, ``unrolled``, ``pool``) with options.

  Unknown options raise a ``TypeError`` that lists the valid ones.

  Examples:
    >>> get_solver("implicit", cg_steps=20).cg_steps
    20
  """
  if isinstance(name, tuple(SOLVERS.values())):
    if options:
      return dataclasses.replace(name, **options)
    return name
  cls = SOLVERS[_validation.check_choice(name, "solver", SOLVERS)]
  valid = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(options) - valid)
  if unknown:
    raise TypeError(f"unknown option(s) {unknown} for solver {name!r}; valid options are {sorted(valid)}.")
  return cls(**options)
