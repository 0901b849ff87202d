"""A pool of persistent learners trained towards convergence on D (the learner a user trains)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PRNGKeyArray, PyTree, Scalar

from udd_jax import _validation
from udd_jax.bilevel import implicit_diff
from udd_jax.bilevel.problem import BilevelProblem, TaskBatch
from udd_jax.bilevel.solvers.base import FreshHeadsBase, Metrics, Problem, apply_updates, check_curvature, inner_residuals
from udd_jax.training import optimizers
from udd_jax.training.recipes import Recipe
from udd_jax.training.unroll import advance


class PoolState(NamedTuple):
  """The state of :class:`Pool`: its learners, stacked over the pool (leading axis P).

  Attributes:
    params: each learner's parameters.
    opt_state: each learner's inner optimiser state.
    age: inner steps each learner has taken since its (re)start, (P,).
    adjoint: each learner's last adjoint ``u`` (the implicit hypergradient's CG warm start;
      zeros, unused, for the truncated one).
    image_opt_state: D's optimiser state.
  """

  step: Array
  images: Float[Array, "N d"]
  params: PyTree
  opt_state: optax.OptState
  age: Array
  adjoint: PyTree
  image_opt_state: optax.OptState
  key: PRNGKeyArray


class LearnerStep(NamedTuple):
  """One learner's outer step under a hypergradient strategy: where it went and what D should do.

  Attributes:
    params, opt_state: the learner after its ``inner_steps`` steps on D.
    adjoint: its adjoint for the next step (the implicit strategy's warm start).
    image_grad: the gradient of its task losses in D.
    outer_loss: its task losses.
    stats: the strategy's own per-learner diagnostics (a dict of scalars), which its
      ``summarise`` turns into the pool's metrics.
  """

  params: PyTree
  opt_state: optax.OptState
  adjoint: PyTree
  image_grad: Float[Array, "N d"]
  outer_loss: Scalar
  stats: dict[str, Array]


InnerLoss = Callable[[PyTree, Array], Scalar]
Score = Callable[[PyTree], Scalar]


@dataclasses.dataclass(frozen=True)
class Truncated:
  """Backpropagation through the learner's ``inner_steps`` steps on D, from its current state (moments included)."""

  name = "truncated"

  def summarise(self, stats: dict[str, Array], dtype: jnp.dtype) -> dict[str, Array]:
    """Its diagnostics over the pool: none."""
    return {}

  def __call__(self, pool: Pool, inner: InnerLoss, residuals: implicit_diff.Residuals, score: Score, params: PyTree,
               opt_state: optax.OptState, adjoint: PyTree, images: Array) -> LearnerStep:
    def through_steps(d):
      w, s = advance(inner, params, opt_state, d, pool.learner_transform(), pool.inner_steps)
      return score(w), (w, s)

    (outer, (w, s)), g = jax.value_and_grad(through_steps, has_aux=True)(images)
    return LearnerStep(w, s, adjoint, g, outer, {})


@dataclasses.dataclass(frozen=True)
class ImplicitAtLearner:
  """The implicit function theorem at the learner after its steps: CG on damped HVPs, warm-started from its last adjoint.

  The curvature is the pool's ``curvature``: the Hessian of the inner loss, or its
  Gauss-Newton matrix (from ``residuals``), positive semi-definite where the learner is
  not at a minimum, so that damped CG converges there.
  """

  name = "implicit"

  def summarise(self, stats: dict[str, Array], dtype: jnp.dtype) -> dict[str, Array]:
    """Its diagnostics over the pool: mean CG steps, median residual, share of learners at negative curvature."""
    return {"cg_steps": jnp.mean(stats["cg_steps"].astype(dtype)), "cg_residual": jnp.median(stats["cg_residual"]),
            "cg_negative_curvature": jnp.mean(stats["cg_negative_curvature"].astype(dtype))}

  def __call__(self, pool: Pool, inner: InnerLoss, residuals: implicit_diff.Residuals, score: Score, params: PyTree,
               opt_state: optax.OptState, adjoint: PyTree, images: Array) -> LearnerStep:
    w, s = advance(inner, params, opt_state, images, pool.learner_transform(), pool.inner_steps)
    outer, v = jax.value_and_grad(score)(w)
    u, cg = implicit_diff.solve_adjoint(inner, w, images, v, damping=pool.damping, tol=pool.cg_tol,
                                        max_steps=pool.cg_steps, init=adjoint, curvature=pool.curvature,
                                        residuals=residuals)
    stats = {"cg_steps": cg.num_steps, "cg_residual": cg.residual, "cg_negative_curvature": cg.negative_curvature}
    return LearnerStep(w, s, u, implicit_diff.mixed_vjp(inner, w, images, u), outer, stats)


HYPERGRADIENTS = {"truncated": Truncated(), "implicit": ImplicitAtLearner()}


@dataclasses.dataclass(frozen=True)
class Pool(FreshHeadsBase):
  """D for the learner a user trains: a pool of persistent learners trained towards convergence on D.

  The honest target is ``w*(D)``, a learner trained on D from a fresh init until it
  converges (the standard recipe: ``inner_optimizer`` at ``inner_lr``, full batch). Each
  outer step, every learner of the pool takes ``inner_steps`` more steps on the current D
  and the task losses at the learners give the hypergradient, averaged over the pool, by
  one of two strategies (:data:`HYPERGRADIENTS`):

  * ``"truncated"`` (:class:`Truncated`): backpropagation through those ``inner_steps``
    steps (truncated unrolling from the learner's current state, moments included);
  * ``"implicit"`` (:class:`ImplicitAtLearner`): the implicit function theorem at the
    learner, CG on damped Hessian-vector products, warm-started from the learner's last
    adjoint; ``curvature="gauss_newton"`` uses the inner loss's Gauss-Newton matrix
    instead of its Hessian (a sum-of-squares learner only: the tied AE, DSM), positive
    semi-definite at learners that are not at a minimum.

  Both give the same metrics (``outer_loss``, ``inner_value``, ``inner_grad_norm``,
  ``image_grad_norm``) and each adds its own diagnostics (the implicit one: ``cg_steps``,
  ``cg_residual``, ``cg_negative_curvature``).

  A learner restarts from a fresh init after ``lifetime`` inner steps; the pool starts
  with staggered ages, so at any time it holds learners from fresh to nearly
  ``lifetime`` steps old, the whole trajectory of the standard recipe (model pools as in
  FRePo, Zhou et al. 2022). Heads are fitted afresh at each learner (ridge: closed form).

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
  curvature: str = "hessian"
  name = "pool"
  default_steps = 500
  member_fields = ("params", "opt_state", "age", "adjoint")

  @property
  def n_members(self) -> int:
    return self.pool_size

  def __post_init__(self):
    super().__post_init__()
    _validation.check_positive_int(self.pool_size, "pool_size")
    _validation.check_positive_int(self.inner_steps, "inner_steps")
    _validation.check_positive_int(self.lifetime, "lifetime")
    if self.lifetime < self.inner_steps:
      raise ValueError(f"lifetime ({self.lifetime}) must be at least inner_steps ({self.inner_steps}).")
    _validation.check_choice(self.inner_optimizer, "inner_optimizer", optimizers.OPTIMIZERS)
    _validation.check_positive_float(self.inner_lr, "inner_lr")
    _validation.check_choice(self.hypergradient, "hypergradient", HYPERGRADIENTS)
    _validation.check_non_negative_int(self.min_age, "min_age")
    if self.min_age >= self.lifetime:
      raise ValueError(f"min_age ({self.min_age}) must be below lifetime ({self.lifetime}): no learner would count.")
    _validation.check_positive_float(self.damping, "damping", allow_zero=True)
    _validation.check_positive_int(self.cg_steps, "cg_steps")
    _validation.check_choice(self.curvature, "curvature", implicit_diff.CURVATURES)
    if self.curvature != "hessian" and self.hypergradient != "implicit":
      raise ValueError(f"curvature={self.curvature!r} is for hypergradient='implicit'; the {self.hypergradient} "
                       "hypergradient solves no linear system.")

  def recipe(self, state: PoolState | None, init_scale: float, given: Recipe | None = None) -> Recipe:
    """Its learners' own recipe, trained until convergence (``given`` is ignored)."""
    return Recipe(self.inner_optimizer, self.inner_lr, self.lifetime, init_scale, until_converged=True)

  def learner_transform(self) -> optax.GradientTransformation:
    """The optimiser every learner of the pool trains with."""
    return optimizers.optimizer(self.inner_optimizer, self.inner_lr)

  def init(self, problem: Problem, key: PRNGKeyArray, images: Array) -> PoolState:
    if isinstance(problem, BilevelProblem):
      problem.check_images(images)
    check_curvature(problem, self.curvature, images)
    k_params, key = jax.random.split(key)
    params = jax.vmap(lambda k: problem.init_params(k, images.dtype))(jax.random.split(k_params, self.pool_size))
    opt_state = jax.vmap(self.learner_transform().init)(params)
    # Staggered ages: learner i first restarts after (P - i) / P of a lifetime, and from then
    # on the pool covers the whole lifetime evenly.
    age = (jnp.arange(self.pool_size) * self.lifetime) // self.pool_size
    return PoolState(jnp.asarray(0), images, params, opt_state, age, optax.tree.zeros_like(params),
                     self.image_transform().init(images), key)

  def learner_params(self, state: PoolState) -> PyTree:
    """The oldest learner of the pool: the one nearest to convergence.

    Picked by a one-hot contraction over the pool axis (exact: one term is the learner, the
    others are zeros), which a device mesh that splits the pool turns into one all-reduce
    of a single learner instead of an all-gather of the whole pool.
    """
    oldest = jax.nn.one_hot(jnp.argmax(state.age), self.pool_size, dtype=jnp.result_type(*jax.tree.leaves(state.params)))
    return jax.tree.map(lambda a: jnp.tensordot(oldest.astype(a.dtype), a, axes=1), state.params)

  def step(self, problem: Problem, state: PoolState, batch: TaskBatch) -> tuple[PoolState, Metrics]:
    key, k_fresh, k_inner, k_heads = jax.random.split(state.key, 4)
    inner = lambda p, images: problem.inner_loss(p, images, k_inner)
    residuals = inner_residuals(problem, k_inner)
    dtype = state.images.dtype
    strategy = HYPERGRADIENTS[self.hypergradient]

    restart = state.age >= self.lifetime
    pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(restart.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old)
    fresh = jax.vmap(lambda k: problem.init_params(k, dtype))(jax.random.split(k_fresh, self.pool_size))
    params = pick(fresh, state.params)
    opt_state = pick(jax.vmap(self.learner_transform().init)(fresh), state.opt_state)
    adjoint = pick(optax.tree.zeros_like(fresh), state.adjoint)
    age = jnp.where(restart, 0, state.age)

    def one(w, s, u, k):
      def score(w_new):
        heads = self.fit_fresh_heads(problem, w_new, batch, k, dtype)
        return problem.outer_loss(w_new, heads, batch)[0]

      return strategy(self, inner, residuals, score, w, s, u, state.images)

    learners = jax.vmap(one)(params, opt_state, adjoint, jax.random.split(k_heads, self.pool_size))
    age = age + self.inner_steps
    weights = (age > self.min_age).astype(dtype)
    weights = weights / jnp.maximum(jnp.sum(weights), 1.0)
    g_images = jnp.tensordot(weights, learners.image_grad, axes=1)
    images, s_images = apply_updates(self.image_transform(), g_images, state.image_opt_state, state.images)
    new_state = PoolState(state.step + 1, images, learners.params, learners.opt_state, age, learners.adjoint, s_images,
                          key)
    oldest = self.learner_params(new_state)
    metrics = {
        "outer_loss": jnp.sum(weights * learners.outer_loss),
        "inner_value": inner(oldest, state.images),
        "inner_grad_norm": optax.tree.norm(jax.grad(inner)(oldest, state.images)),
        "image_grad_norm": optax.tree.norm(g_images),
    }
    metrics |= strategy.summarise(learners.stats, dtype)
    return new_state, metrics
