"""A pool of persistent learners trained towards convergence on D (the learner a user trains)."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, PRNGKeyArray

from udd_jax import _validation
from udd_jax.bilevel import implicit_diff
from udd_jax.bilevel.problem import BilevelProblem, TaskBatch
from udd_jax.bilevel.solvers.base import FreshHeadsBase, Metrics, Problem, SolverState, apply_updates, diversity
from udd_jax.training.recipes import INNER_OPTIMIZERS, Recipe
from udd_jax.training.unroll import advance


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
class Pool(FreshHeadsBase):
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

  Examples:
    >>> recipe = Pool().recipe(None, init_scale=0.01)  # what a set distilled by the pool ships
    >>> recipe.inner_optimizer, recipe.inner_lr, recipe.until_converged
    ('adam', 0.003, True)
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
  name = "pool"
  default_steps = 500

  def __post_init__(self):
    super().__post_init__()
    _validation.check_positive_int(self.pool_size, "pool_size")
    _validation.check_positive_int(self.inner_steps, "inner_steps")
    _validation.check_positive_int(self.lifetime, "lifetime")
    if self.lifetime < self.inner_steps:
      raise ValueError(f"lifetime ({self.lifetime}) must be at least inner_steps ({self.inner_steps}).")
    _validation.check_choice(self.inner_optimizer, "inner_optimizer", INNER_OPTIMIZERS)
    _validation.check_positive_float(self.inner_lr, "inner_lr")
    _validation.check_choice(self.hypergradient, "hypergradient", HYPERGRADIENTS)
    _validation.check_non_negative_int(self.min_age, "min_age")
    if self.min_age >= self.lifetime:
      raise ValueError(f"min_age ({self.min_age}) must be below lifetime ({self.lifetime}): no learner would count.")
    _validation.check_positive_float(self.damping, "damping", allow_zero=True)
    _validation.check_positive_int(self.cg_steps, "cg_steps")

  def recipe(self, state: SolverState, init_scale: float, given: Recipe | None = None) -> Recipe:
    """Its learners' own recipe, trained until convergence (``given`` is ignored)."""
    return Recipe(self.inner_optimizer, self.inner_lr, self.lifetime, init_scale, until_converged=True)

  def learner_optimizer(self) -> optax.GradientTransformation:
    return optax.adam(self.inner_lr) if self.inner_optimizer == "adam" else optax.sgd(self.inner_lr)

  def init(self, problem: Problem, key: PRNGKeyArray, images: Array) -> SolverState:
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

  def step(self, problem: Problem, state: SolverState, batch: TaskBatch) -> tuple[SolverState, Metrics]:
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
      heads = self.fit_fresh_heads(problem, w, batch, k, dtype)
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
    images, s_images = apply_updates(self.image_optimizer, g_images, s_images, state.images)
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
