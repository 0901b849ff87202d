"""A pool of persistent learners trained towards convergence on D (the learner a user trains)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PRNGKeyArray, PyTree, Scalar

from udd_jax import _validation
from udd_jax.bilevel import implicit_diff
from udd_jax.bilevel.problem import BilevelProblem, TaskBatch
from udd_jax.bilevel.solvers.base import FreshHeadsBase, Metrics, Problem, apply_updates, check_curvature, inner_residuals
from udd_jax.inner import learners as learners_lib
from udd_jax.training import optimizers
from udd_jax.training.recipes import Recipe
from udd_jax.training.unroll import advance


class PoolState(NamedTuple):
  """The state of :class:`Pool`: its learners, stacked over the pool (leading axis P).

  With ``members`` (a mixture of learners), each of ``params``, ``opt_state``, ``age`` and
  ``adjoint`` is a tuple with one stack per member group (leading axis P / groups).

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

  ``members`` makes the pool a distribution of learners, so that D is good for the
  learners people will train and not one width and one scoring rule: ``"ae:128,ae:64,
  denoising_score_matching:128"`` splits the pool evenly over those (scoring rule, width)
  groups, each vmapped over its own learners, and D follows their mean hypergradient. The
  first group is the learner the run reports on, probes and saves, and must be the
  problem's own (its scoring rule and ``n_hidden``). Only learners of the GRBM family
  (:class:`~udd_jax.inner.learners.GRBMLearner`) can be mixed; every group keeps the
  problem's ``sigma2`` and ``noise_std``.

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
  members: str = ""
  curvature: str = "hessian"
  name = "pool"
  default_steps = 500
  default_head = "ridge_ce"
  member_fields = ("params", "opt_state", "age", "adjoint")
  recorded_unless_default = FreshHeadsBase.recorded_unless_default | {"members": "", "curvature": "hessian"}

  @property
  def n_members(self) -> int:
    """Learners per member group: the leading axis of every stack of the state."""
    return self.pool_size // len(self.member_groups) if self.members else self.pool_size

  @property
  def member_axis(self) -> str:
    return f"learners per member group (pool_size / {len(self.member_groups)})" if self.members else "pool_size"

  @property
  def member_groups(self) -> tuple[tuple[str, int], ...]:
    """``members`` as ``(scoring rule, n_hidden)`` pairs (empty: the problem's own learner only)."""
    return parse_members(self.members)

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
    groups = self.member_groups
    if groups and self.pool_size % len(groups):
      raise ValueError(f"pool_size ({self.pool_size}) must be a multiple of the {len(groups)} member groups of "
                       f"members={self.members!r}: each group gets the same number of learners.")
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

  def group_problems(self, problem: Problem) -> tuple[Problem, ...]:
    """One problem per member group (the problem itself when the pool has no ``members``)."""
    if not self.members:
      return (problem,)
    learner = getattr(problem, "learner", None)
    if not isinstance(problem, BilevelProblem) or not isinstance(learner, learners_lib.GRBMLearner):
      raise ValueError(f"members={self.members!r} mixes learners of the GRBM family; this problem's learner is "
                       f"{type(learner).__name__}, which cannot be mixed.")
    first = self.member_groups[0]
    if first != (learner.name, problem.n_hidden):
      raise ValueError(f"the first group of members={self.members!r} is the learner the run reports on and saves, so it "
                       f"must be the problem's own, {learner.name}:{problem.n_hidden}; got {first[0]}:{first[1]}.")
    return tuple(dataclasses.replace(problem, learner=dataclasses.replace(learner, name=rule), n_hidden=k)
                 for rule, k in self.member_groups)

  def _keys(self, key: PRNGKeyArray, n_groups: int) -> list[PRNGKeyArray]:
    """One key per group: ``key`` itself when there is one group (today's draws, unchanged)."""
    return [key] if not self.members else list(jax.random.split(key, n_groups))

  def _groups(self, field: PyTree) -> list[PyTree]:
    """A member field as a list of per-group stacks."""
    return list(field) if self.members else [field]

  def _pack(self, stacks: list[PyTree]) -> PyTree:
    """The inverse of :meth:`_groups`."""
    return tuple(stacks) if self.members else stacks[0]

  def init(self, problem: Problem, key: PRNGKeyArray, images: Array, basis: jax.typing.ArrayLike | None = None,
           prior: Any = None) -> PoolState:
    if isinstance(problem, BilevelProblem):
      problem.check_images(images)
    problems = self.group_problems(problem)
    for p in problems:
      check_curvature(p, self.curvature, images)
    k_params, key = jax.random.split(key)
    n = self.n_members
    params = [jax.vmap(lambda k, p=p: p.init_params(k, images.dtype))(jax.random.split(k_g, n))
              for p, k_g in zip(problems, self._keys(k_params, len(problems)))]
    opt_state = [jax.vmap(self.learner_transform().init)(w) for w in params]
    # Staggered ages: learner i of a group first restarts after (n - i) / n of a lifetime,
    # and from then on each group covers the whole lifetime evenly.
    age = [(jnp.arange(n) * self.lifetime) // n for _ in problems]
    return PoolState(jnp.asarray(0), images, self._pack(params), self._pack(opt_state), self._pack(age),
                     self._pack([optax.tree.zeros_like(w) for w in params]), self.init_image_state(images, basis, prior=prior), key)

  def learner_params(self, state: PoolState) -> PyTree:
    """The oldest learner of the pool (of its first member group): the one nearest to convergence.

    Picked by a one-hot contraction over the pool axis (exact: one term is the learner, the
    others are zeros), which a device mesh that splits the pool turns into one all-reduce
    of a single learner instead of an all-gather of the whole pool.
    """
    params, age = self._groups(state.params)[0], self._groups(state.age)[0]
    oldest = jax.nn.one_hot(jnp.argmax(age), self.n_members, dtype=jnp.result_type(*jax.tree.leaves(params)))
    return jax.tree.map(lambda a: jnp.tensordot(oldest.astype(a.dtype), a, axes=1), params)

  def step(self, problem: Problem, state: PoolState, batch: TaskBatch) -> tuple[PoolState, Metrics]:
    key, k_fresh, k_inner, k_heads = jax.random.split(state.key, 4)
    dtype = state.images.dtype
    strategy = HYPERGRADIENTS[self.hypergradient]
    problems = self.group_problems(problem)
    n = self.n_members

    def group_step(p: Problem, params, opt_state, adjoint, age, k_fresh, k_heads):
      inner = lambda w, images: p.inner_loss(w, images, k_inner)
      residuals = inner_residuals(p, k_inner)
      restart = age >= self.lifetime
      pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(restart.reshape((-1,) + (1,) * (a.ndim - 1)), a, b),
                                           new, old)
      fresh = jax.vmap(lambda k: p.init_params(k, dtype))(jax.random.split(k_fresh, n))
      params = pick(fresh, params)
      opt_state = pick(jax.vmap(self.learner_transform().init)(fresh), opt_state)
      adjoint = pick(optax.tree.zeros_like(fresh), adjoint)
      age = jnp.where(restart, 0, age)

      def one(w, s, u, k):
        def score(w_new):
          heads = self.fit_fresh_heads(p, w_new, batch, k, dtype)
          return p.outer_loss(w_new, heads, batch)[0]

        return strategy(self, inner, residuals, score, w, s, u, state.images)

      return jax.vmap(one)(params, opt_state, adjoint, jax.random.split(k_heads, n)), age + self.inner_steps

    fields = [self._groups(f) for f in (state.params, state.opt_state, state.adjoint, state.age)]
    steps = [group_step(p, *f, k_f, k_h) for p, *f, k_f, k_h in
             zip(problems, *fields, self._keys(k_fresh, len(problems)), self._keys(k_heads, len(problems)))]
    learners = [step for step, _ in steps]
    ages = [age for _, age in steps]
    # Every learner past min_age counts the same, whichever its group.
    counts = [(age > self.min_age).astype(dtype) for age in ages]
    total = jnp.maximum(_sum(jnp.sum(c) for c in counts), 1.0)
    weights = [c / total for c in counts]
    g_images = _sum(jnp.tensordot(w, step.image_grad, axes=1) for w, step in zip(weights, learners))
    images, s_images = apply_updates(self.image_transform(), g_images, state.image_opt_state, state.images)
    new_state = PoolState(state.step + 1, images, self._pack([step.params for step in learners]),
                          self._pack([step.opt_state for step in learners]), self._pack(ages),
                          self._pack([step.adjoint for step in learners]), s_images, key)
    oldest = self.learner_params(new_state)
    inner = lambda w, images: problem.inner_loss(w, images, k_inner)
    metrics = {
        "outer_loss": _sum(jnp.sum(w * step.outer_loss) for w, step in zip(weights, learners)),
        "inner_value": inner(oldest, state.images),
        "inner_grad_norm": optax.tree.norm(jax.grad(inner)(oldest, state.images)),
        "image_grad_norm": optax.tree.norm(g_images),
    }
    # The strategy's diagnostics over every learner of the pool.
    stats = jax.tree.map(lambda *a: jnp.concatenate(a), *[step.stats for step in learners])
    metrics |= strategy.summarise(stats, dtype)
    return new_state, metrics


def _sum(terms) -> Array:
  """The sum of a few arrays (no ``0 +`` term: one group's sum is its term, bit for bit)."""
  return functools.reduce(jnp.add, terms)


def parse_members(spec: str) -> tuple[tuple[str, int], ...]:
  """``"ae:128,denoising_score_matching:64"`` -> ``(("ae", 128), ("denoising_score_matching", 64))``, checked.

  Examples:
    >>> parse_members("ae:128, score_matching:64")
    (('ae', 128), ('score_matching', 64))
    >>> parse_members("")
    ()
  """
  if not isinstance(spec, str):
    raise TypeError(f"members must be a string such as 'ae:128,ae:64'; got {spec!r}.")
  groups = []
  for part in filter(None, (p.strip() for p in spec.split(","))):
    rule, sep, width = part.partition(":")
    if not sep or not width.strip().isdigit() or int(width) <= 0:
      raise ValueError(f"members entry {part!r} must be RULE:K with K a positive integer, e.g. 'ae:128'.")
    _validation.check_choice(rule.strip(), "members scoring rule", learners_lib.INNER_LOSSES)
    groups.append((rule.strip(), int(width)))
  if len(set(groups)) != len(groups):
    raise ValueError(f"members={spec!r} names a group twice; give each (rule, K) once.")
  return tuple(groups)
