"""What every bilevel solver shares: the state protocol, the problem it accepts, the base classes and small helpers.

Every solver has the same interface::

    state = solver.init(problem, key, images)
    state, metrics = solver.step(problem, state, batch)   # pure; jit it once

``images`` is the distilled set D, shape (N, d), in the space the learner sees.
``state`` is the solver's own NamedTuple; every one has ``step``, ``images`` and ``key``
(:class:`SolverState`), and the driver asks the solver for the rest
(:meth:`SolverBase.learner_params`, :meth:`SolverBase.finite`, :meth:`SolverBase.recipe`).
``metrics`` is a flat dict of scalars (the diagnostics: outer loss, inner gradient
norm, CG iterations and residual, ...). Optimisers are optax throughout, chosen by name
and step size (:mod:`udd_jax.training.optimizers`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray, PyTree, Scalar

from udd_jax import _validation
from udd_jax.bilevel import basis as basis_lib
from udd_jax.bilevel import implicit_diff
from udd_jax.bilevel.problem import BilevelProblem, TaskBatch
from udd_jax.heads import linear as heads_lib
from udd_jax.inner import prior as prior_lib
from udd_jax.training import optimizers
from udd_jax.training.recipes import STANDARD_RECIPE, Recipe

Metrics = dict[str, Array]


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

  def inner_loss(self, params: PyTree, images: Float[Array, "N d"], key: PRNGKeyArray) -> Scalar:
    """The unsupervised fit of ``params`` on ``images``."""
    ...

  def outer_loss(self, params: PyTree, heads: PyTree, batch: TaskBatch) -> tuple[Scalar, Float[Array, " T"]]:
    """The task losses: their sum and one per task."""
    ...

  def features(self, params: PyTree, x: Float[Array, "n d"]) -> Float[Array, "n K"]:
    """The learner's features of ``x``."""
    ...

  def init_params(self, key: PRNGKeyArray, dtype: Any = ...) -> PyTree:
    """A fresh random init of the inner learner."""
    ...

  def init_heads(self, key: PRNGKeyArray, dtype: Any = ...) -> PyTree:
    """Fresh task-head parameters, stacked over tasks."""
    ...


class SolverState(Protocol):
  """What the driver reads from every solver's state: each solver's state is a NamedTuple of its own with these fields.

  Every field of a solver's state is an array or a pytree of arrays (a checkpoint
  writes it leaf by leaf, and a sharding can give each field its own layout).

  Attributes:
    step: number of outer steps taken.
    images: the distilled set D, (N, d).
    key: PRNG key for the next step.
  """

  step: Array
  images: Float[Array, "N d"]
  key: PRNGKeyArray

  def _asdict(self) -> dict[str, PyTree]:
    ...


@dataclasses.dataclass(frozen=True)
class SolverBase:
  """What the driver asks of every solver beyond ``init`` and ``step``, and the fields all share.

  A solver owns its defaults: its dataclass fields, and these class attributes. Every
  field is a plain value (a name, a number, a bool), so a solver is saved and rebuilt from
  its ``config.json`` record (:meth:`to_config`, :func:`~udd_jax.bilevel.solvers.get_solver`).

  D is updated by one optax chain, :meth:`image_transform`: the diversity term, the
  optimiser with its step size and schedule (in the coefficients of ``image_basis`` unless
  that is ``"pixels"``), and the projection onto ``image_bounds``.

  Attributes:
    diversity: weight ``lambda`` of the seed's diversity term on D (0 disables it): the
      chain adds ``-lambda * grad div(D)`` to the hypergradient.
    prior_weight: weight ``lambda`` of a learned image prior (0 disables it): the chain adds
      the gradient of ``-lambda * mean_i log p(d_i)``, ``-lambda / N * s(d_i)`` per row, to the
      hypergradient. The prior is data (:class:`~udd_jax.inner.prior.ImagePrior`), given to
      ``init`` and kept in the chain's state like the basis.
    image_optimizer: optimiser of D (``"adam"`` or ``"sgd"``).
    image_lr: its step size.
    lr_schedule: ``"constant"``, or ``"cosine"`` to decay the outer step sizes (D's, and
      the model's for the joint solvers) to zero over ``decay_steps``.
    decay_steps: outer steps of the cosine decay (``distill`` sets its ``steps``).
    image_bounds: ``(low, high)``: D is projected onto this box after every step (None:
      unbounded; ``distill(clip_images=True)`` sets the real inputs' range).
    image_basis: the basis D is optimised in (:mod:`udd_jax.bilevel.basis`): ``"pixels"``
      (D itself), ``"pca:R"`` (``D = D0 + C U^T`` with U the top R principal directions of
      the real inputs) or ``"dct:R"`` (U the R lowest 2-D DCT frequencies). A name, so the
      solver stays plain values; the basis itself is data, given to ``init`` and kept in
      the chain's state (:meth:`init_image_state`).
    name: the solver's name in :data:`~udd_jax.bilevel.solvers.SOLVERS`.
    default_steps: outer steps of a distillation run that does not say.
    default_head: the task head a distillation run uses unless told (``"ridge_ce"``, ``"ridge"`` or ``"softmax"``).
    member_fields: the state's fields stacked over independent learners (leading axis
      :attr:`n_members`), which a device mesh splits; a solver without them has its real
      batch split instead (docs/SCALING.md).
  """

  diversity: float = 0.0
  prior_weight: float = 0.0
  image_optimizer: str = "adam"
  image_lr: float = 1e-2
  lr_schedule: str = "constant"
  decay_steps: int | None = None
  image_bounds: tuple[float, float] | None = None
  image_basis: str = "pixels"
  name: ClassVar[str]
  default_steps: ClassVar[int] = 600
  default_head: ClassVar[str] = "softmax"
  diversity_in_objective: ClassVar[bool] = False
  member_fields: ClassVar[tuple[str, ...]] = ()
  # Fields added after runs were recorded: left out of to_config() at their default, so that the
  # config.json of such a run still matches (resume, --rerun_evaluation) and replays unchanged.
  recorded_unless_default: ClassVar[dict[str, Any]] = {"image_basis": "pixels", "prior_weight": 0.0}

  @property
  def n_members(self) -> int:
    """The length of the leading axis of :attr:`member_fields` (0: the solver has none)."""
    return 0

  @property
  def member_axis(self) -> str:
    """What that axis is called in an error message (an option's name)."""
    return "members"

  def __post_init__(self):
    _validation.check_positive_float(self.diversity, "diversity", allow_zero=True)
    _validation.check_positive_float(self.prior_weight, "prior_weight", allow_zero=True)
    _validation.check_choice(self.image_optimizer, "image_optimizer", optimizers.OPTIMIZERS)
    _validation.check_positive_float(self.image_lr, "image_lr")
    _validation.check_choice(self.lr_schedule, "lr_schedule", optimizers.LR_SCHEDULES)
    if self.decay_steps is not None:
      _validation.check_positive_int(self.decay_steps, "decay_steps")
    if self.image_bounds is not None:
      bounds = tuple(self.image_bounds)
      if len(bounds) != 2 or not all(isinstance(v, (int, float)) for v in bounds) or not bounds[0] < bounds[1]:
        raise ValueError(f"image_bounds must be (low, high) with low < high; got {self.image_bounds!r}.")
      object.__setattr__(self, "image_bounds", (float(bounds[0]), float(bounds[1])))
    basis_lib.parse_image_basis(self.image_basis)

  def outer_lr(self, value: float) -> optimizers.LearningRate:
    """An outer step size under the solver's ``lr_schedule``."""
    return optimizers.learning_rate(value, self.lr_schedule, self.decay_steps)

  def image_transform(self, paired: bool = False, basis: Any = None, prior: Any = None) -> optax.GradientTransformation:
    """D's update as one optax chain: diversity, the prior, the optimiser (step size and schedule), the projection.

    With an ``image_basis`` other than ``"pixels"``, the optimiser runs on D's coefficients
    in the basis (:func:`~udd_jax.bilevel.basis.in_basis`), before the projection.
    With ``paired``, the chain updates a pair ``(D, other)`` (the unrolled solver's D and its
    learned step sizes): the optimiser steps both, diversity, basis and projection touch D only.

    Args:
      paired: the chain updates the pair ``(D, other)``.
      basis: the basis U (d, R), needed by the chain's ``init`` only (:meth:`init_image_state`
        passes it); a step's chain reads U from its state.
      prior: the :class:`~udd_jax.inner.prior.ImagePrior`, likewise needed by ``init`` only.
    """
    parts = []
    if self.diversity and not self.diversity_in_objective:
      parts.append(add_diversity(self.diversity, paired))
    if self.prior_weight:
      parts.append(add_prior(self.prior_weight, prior, paired))
    optimizer = optimizers.optimizer(self.image_optimizer, self.outer_lr(self.image_lr))
    if self.image_basis != "pixels":
      optimizer = basis_lib.in_basis(optimizer, basis, paired)
    parts.append(optimizer)
    if self.image_bounds is not None:
      parts.append(project_onto_box(*self.image_bounds, paired=paired))
    return parts[0] if len(parts) == 1 else optax.chain(*parts)

  def init_image_state(self, params: PyTree, basis: Any = None, paired: bool = False, prior: Any = None
                       ) -> optax.OptState:
    """The initial state of :meth:`image_transform`'s chain at D (or at the pair ``(D, other)``), with D's basis and prior in it.

    The basis is data (a PCA of the real inputs), so it is not a field of the solver: the
    caller computes it (:func:`~udd_jax.bilevel.basis.make_image_basis`; ``distill`` does) and
    the chain keeps it in its state, where every step reads it.

    Args:
      params: D (N, d), or the pair ``(D, other)`` when ``paired``.
      basis: U (d, R) for ``image_basis``; None computes a data-free one (``"dct:R"``) and is
        the only value ``"pixels"`` accepts.
      paired: the chain updates the pair ``(D, other)``.
      prior: the :class:`~udd_jax.inner.prior.ImagePrior` (or its path) when ``prior_weight > 0``.

    Raises:
      ValueError: a basis given with ``"pixels"``, ``"pca:R"`` without its basis, or a basis
        of the wrong shape or not orthonormal; a prior missing with ``prior_weight > 0``, given
        with ``prior_weight = 0``, or over another number of features than D.
    """
    images = params[0] if paired else params
    d = images.shape[1]
    if self.prior_weight and prior is None:
      raise ValueError(f"prior_weight is {self.prior_weight}, but no prior was given: pass prior= (an ImagePrior, "
                       "e.g. from udd_jax.fit_prior, or the path of a saved one).")
    if prior is not None:
      if not self.prior_weight:
        raise ValueError("a prior was given, but prior_weight is 0: set prior_weight > 0 to use it.")
      prior = prior_lib.check_prior(prior, d)
    if self.image_basis == "pixels":
      if basis is not None:
        raise ValueError("a basis was given, but the solver's image_basis is 'pixels': set image_basis to 'pca:R' or "
                         "'dct:R' to optimise D in it.")
      return self._image_chain(paired, None, prior).init(params)
    if basis is None:
      basis = basis_lib.make_image_basis(self.image_basis, d)
    return self._image_chain(paired, basis_lib.check_basis(self.image_basis, basis, d), prior).init(params)

  def _image_chain(self, paired: bool, basis: Any, prior: Any) -> optax.GradientTransformation:
    # ``prior`` is passed only when there is one, so a subclass whose ``image_transform`` predates it still works.
    options = {} if basis is None else {"basis": basis}
    return self.image_transform(paired, **options, **({} if prior is None else {"prior": prior}))

  def learner_params(self, state: SolverState) -> PyTree:
    """The single learner the driver reports on, probes and saves: ``state.params`` unless a solver keeps several."""
    return state.params

  def finite(self, state: SolverState) -> dict[str, Array]:
    """Per field of ``state``: whether every floating value in it is finite (traceable)."""
    return {name: all_finite(value) for name, value in state._asdict().items()}

  def to_config(self) -> dict[str, Any]:
    """The solver as plain values: ``{"name": ..., field: value, ...}``; :func:`get_solver` rebuilds it."""
    record = {"name": self.name}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if f.name in self.recorded_unless_default and value == self.recorded_unless_default[f.name]:
        continue
      record[f.name] = value.to_config() if hasattr(value, "to_config") else list(value) if isinstance(value, tuple) else value
    return record

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
class HeadFitting:
  """Softmax task heads fitted by a few optimiser steps per outer step, at fixed features.

  Attributes:
    head_steps: optimiser steps of the heads per outer step.
    head_optimizer: their optimiser (``"adam"`` or ``"sgd"``).
    head_lr: its step size.
  """

  head_steps: int = 50
  head_optimizer: str = "adam"
  head_lr: float = 0.1

  def check_head_options(self) -> None:
    _validation.check_positive_int(self.head_steps, "head_steps")
    _validation.check_choice(self.head_optimizer, "head_optimizer", optimizers.OPTIMIZERS)
    _validation.check_positive_float(self.head_lr, "head_lr")

  def head_transform(self) -> optax.GradientTransformation:
    return optimizers.optimizer(self.head_optimizer, self.head_lr)


@dataclasses.dataclass(frozen=True)
class FreshHeadsBase(HeadFitting, SolverBase):
  """Base of the solvers whose learners change identity from step to step (fresh inits, a pool).

  Their hidden units come out in any order, so task heads are refitted at every step from
  their init (:func:`fresh_heads`: ``head_steps`` steps of ``head_optimizer``), and a
  closed-form ridge head, refitted at no cost, is the default.
  """

  default_head = "ridge"

  def __post_init__(self):
    super().__post_init__()
    self.check_head_options()

  def fit_fresh_heads(self, problem: Problem, params: PyTree, batch: TaskBatch, key: PRNGKeyArray, dtype: Any) -> PyTree:
    """Heads fitted from their init at fixed features of ``params``."""
    return fresh_heads(problem, params, batch, key, self.head_transform(), self.head_steps, dtype)


def all_finite(tree: PyTree) -> Array:
  """True when every floating leaf of ``tree`` is finite (traceable)."""
  checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def _on_images(fn: Callable[[Array, Array], Array], paired: bool) -> optax.GradientTransformation:
  """A stateless transform ``updates -> fn(updates, D)`` of D's update (of the first of a pair when ``paired``)."""

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("this transform of D's update needs the current D: pass params to update.")
    if paired:
      return (fn(updates[0], params[0]), *updates[1:]), state
    return fn(updates, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def add_diversity(weight: float, paired: bool = False) -> optax.GradientTransformation:
  """Adds ``-weight * grad div(D)`` to D's gradient (:func:`diversity`): a reward for spread-out points."""
  return _on_images(lambda g, images: g - weight * jax.grad(diversity)(images), paired)


class PriorState(NamedTuple):
  """The state of :func:`add_prior`: the prior, so that every step reads it."""

  prior: Any


def add_prior(weight: float, prior: Any = None, paired: bool = False) -> optax.GradientTransformation:
  """Adds the gradient of ``-weight * mean_i log p(d_i)`` to D's gradient: ``-weight / N * s(d_i)`` per row.

  Args:
    weight: the prior's weight ``lambda``.
    prior: the :class:`~udd_jax.inner.prior.ImagePrior`; only ``init`` reads it (``update``
      takes it from the state).
    paired: the updates are a pair ``(D, other)``; only D's is changed.
  """

  def init(params):
    if prior is None:
      raise ValueError("add_prior needs the prior at init (its update reads it from the state).")
    return PriorState(prior)

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("add_prior needs the current D: pass params to update.")
    images, g = (params[0], updates[0]) if paired else (params, updates)
    g = g - weight / images.shape[0] * state.prior.score(images).astype(g.dtype)
    return ((g, *updates[1:]) if paired else g), state

  return optax.GradientTransformation(init, update)


def project_onto_box(low: float, high: float, paired: bool = False) -> optax.GradientTransformation:
  """Turns D's update into the step onto the box: ``D + update`` becomes ``clip(D + update, low, high)``."""
  return _on_images(lambda u, images: jnp.clip(images + u, low, high) - images, paired)


def diversity(images: Float[Array, "N d"]) -> Scalar:
  """Mean squared distance of the distilled points from their mean (the seed's diversity term)."""
  return jnp.mean(jnp.sum((images - jnp.mean(images, axis=0)) ** 2, axis=1))


def apply_updates(optimizer: optax.GradientTransformation, grads: PyTree, opt_state: optax.OptState, params: PyTree
                  ) -> tuple[PyTree, optax.OptState]:
  """One optax step: ``(params, opt_state)`` after ``grads``."""
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def fit_heads(
    problem: Problem, heads: PyTree, opt_state: optax.OptState, optimizer: optax.GradientTransformation, params: PyTree,
    batch: TaskBatch, steps: int,
) -> tuple[PyTree, optax.OptState, Array]:
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
    problem: Problem, params: PyTree, batch: TaskBatch, key: PRNGKeyArray, optimizer: optax.GradientTransformation, steps: int,
    dtype: Any,
) -> PyTree:
  """Heads fitted from their init at fixed features of ``params`` (a ridge head needs no fitting).

  For solvers whose learner changes identity from step to step (fresh inits, a pool):
  their hidden units come out in any order, so heads cannot be carried over.
  """
  heads = problem.init_heads(key, dtype)
  return fit_heads(problem, heads, optimizer.init(heads), optimizer, params, batch, steps)[0]


def inner_residuals(problem: Problem, key: PRNGKeyArray) -> implicit_diff.Residuals:
  """The inner loss as a sum of squares, ``(params, images) -> (r, scale)``: the Gauss-Newton curvature's input.

  A problem offers it through an optional ``inner_least_squares(params, images, key)``
  (a :class:`~udd_jax.bilevel.problem.BilevelProblem` asks its learner's
  ``least_squares``). The map raises ValueError, naming the learner, when it is called
  on a problem without one (score matching, whose Laplacian term is not a square).
  """

  def residuals(params, images):
    least_squares = getattr(problem, "inner_least_squares", None)
    out = None if least_squares is None else least_squares(params, images, key)
    if out is None:
      learner = getattr(problem, "learner", None)
      who = f"the {learner.name!r} learner" if learner is not None else f"the problem {type(problem).__name__}"
      raise ValueError(f"curvature='gauss_newton' needs an inner loss that is a sum of squares "
                       f"(InnerLearner.least_squares), and {who} has none; use curvature='hessian'.")
    return tuple(out)

  return residuals


def check_curvature(problem: Problem, curvature: str, images: Array) -> None:
  """Raises ValueError, naming the learner, if ``curvature="gauss_newton"`` and the inner loss is not a sum of squares.

  Traces the residual map once (:func:`jax.eval_shape`, nothing runs), so a solver's
  ``init`` refuses the pair before anything compiles.
  """
  if curvature == "gauss_newton":
    def trace():
      key = jax.random.key(0)
      return inner_residuals(problem, key)(problem.init_params(key, images.dtype), images)

    jax.eval_shape(trace)


def init_common(problem: Problem, key: PRNGKeyArray, images: Array) -> tuple[PyTree, PyTree, PRNGKeyArray]:
  """Checks D against the problem; returns initial inner parameters, heads and the key left over."""
  if isinstance(problem, BilevelProblem):
    problem.check_images(images)
  k_params, k_heads, key = jax.random.split(key, 3)
  return problem.init_params(k_params, images.dtype), problem.init_heads(k_heads, images.dtype), key

