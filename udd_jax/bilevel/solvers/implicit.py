"""Implicit differentiation: w*(D) from a warm-started inner solve, dL/dD by the implicit function theorem."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from udd_jax import _validation
from udd_jax.bilevel import implicit_diff
from udd_jax.bilevel.problem import TaskBatch
from udd_jax.bilevel.solvers.base import (HeadFitting, Metrics, Problem, SolverBase, apply_updates, check_curvature, fit_heads,
                                         init_common, inner_residuals)
from udd_jax.training import optimizers
from udd_jax.training.unroll import inner_solve


class ImplicitState(NamedTuple):
  """The state of :class:`Implicit`.

  Attributes:
    params: the warm-started inner solution w*(D).
    heads: the task heads, warm-started at w*.
    inner_opt_state: the inner optimiser's state at w*.
    adjoint: the last adjoint ``u`` (warm-starts CG).
  """

  step: Array
  images: Float[Array, "N d"]
  params: PyTree
  heads: PyTree
  inner_opt_state: optax.OptState
  adjoint: PyTree
  image_opt_state: optax.OptState
  head_opt_state: optax.OptState
  key: PRNGKeyArray


@dataclasses.dataclass(frozen=True)
class Implicit(HeadFitting, SolverBase):
  """Implicit differentiation: dL/dD = -(d^2 L_in / dD dw) (H_ww + damping I)^-1 grad_w L.

  Each step: a warm-started inner solve (``inner_optimizer`` at ``inner_lr`` until the
  gradient norm is below ``inner_tol`` or ``inner_steps``), ``head_steps`` updates of the
  heads at w* (warm-started, so they enter at their optimum, Danskin), then CG for the adjoint
  ``u``, started from the previous step's ``u`` when ``warm_start_adjoint`` (D, w*
  and the heads move little per step, so ``u`` does too, and a few CG iterations
  refine it: amortised implicit differentiation, as Arbel & Mairal 2022's AmIGO).
  ``curvature="gauss_newton"`` puts the Gauss-Newton matrix of the inner loss in place of
  ``H_ww`` (positive semi-definite, so damped CG converges; exact at a zero-residual
  optimum), for learners whose loss is a sum of squares (the tied AE, DSM).

  Examples:
    >>> from udd_jax.bilevel.solvers import get_solver
    >>> Implicit(cg_steps=3) == get_solver("implicit", cg_steps=3)  # a name and an instance run the same thing
    True
  """

  # Few inner and CG iterations per step, both warm-started, and damping 0.1: the budget per
  # step measured best on a fixed wall time (docs/RESULTS.md, "Implicit solver: budget per step").
  inner_steps: int = 5
  inner_tol: float = 1e-4
  inner_optimizer: str = "adam"
  inner_lr: float = 1e-2
  damping: float = 0.1
  cg_tol: float = 1e-5
  cg_steps: int = 5
  warm_start_adjoint: bool = True
  head_steps: int = 5
  head_lr: float = 1e-2
  curvature: str = "hessian"
  recorded_unless_default = SolverBase.recorded_unless_default | {"curvature": "hessian"}
  name = "implicit"

  def __post_init__(self):
    super().__post_init__()
    self.check_head_options()
    _validation.check_positive_int(self.inner_steps, "inner_steps")
    _validation.check_positive_float(self.inner_tol, "inner_tol", allow_zero=True)
    _validation.check_choice(self.inner_optimizer, "inner_optimizer", optimizers.OPTIMIZERS)
    _validation.check_positive_float(self.inner_lr, "inner_lr")
    _validation.check_positive_float(self.damping, "damping", allow_zero=True)
    _validation.check_positive_int(self.cg_steps, "cg_steps")
    _validation.check_choice(self.curvature, "curvature", implicit_diff.CURVATURES)

  def inner_transform(self) -> optax.GradientTransformation:
    return optimizers.optimizer(self.inner_optimizer, self.inner_lr)

  def init(self, problem: Problem, key: PRNGKeyArray, images: Array, basis: jax.typing.ArrayLike | None = None,
           prior: Any = None) -> ImplicitState:
    params, heads, key = init_common(problem, key, images)
    check_curvature(problem, self.curvature, images)
    return ImplicitState(jnp.asarray(0), images, params, heads, self.inner_transform().init(params),
                         optax.tree.zeros_like(params), self.init_image_state(images, basis, prior=prior),
                         self.head_transform().init(heads), key)

  def step(self, problem: Problem, state: ImplicitState, batch: TaskBatch) -> tuple[ImplicitState, Metrics]:
    key, k_inner = jax.random.split(state.key)
    inner = lambda p, images: problem.inner_loss(p, images, k_inner)
    solved = inner_solve(
        lambda p: inner(p, state.images),
        state.params,
        state.inner_opt_state,
        self.inner_transform(),
        max_steps=self.inner_steps,
        tol=self.inner_tol,
    )
    heads, s_heads, _ = fit_heads(problem, state.heads, state.head_opt_state, self.head_transform(), solved.params,
                                  batch, self.head_steps)
    outer, v = jax.value_and_grad(lambda p: problem.outer_loss(p, heads, batch)[0])(solved.params)
    u, cg = implicit_diff.solve_adjoint(
        inner, solved.params, state.images, v, damping=self.damping, tol=self.cg_tol, max_steps=self.cg_steps,
        init=state.adjoint if self.warm_start_adjoint else None, curvature=self.curvature,
        residuals=inner_residuals(problem, k_inner),
    )
    g_images = implicit_diff.mixed_vjp(inner, solved.params, state.images, u)
    images, s_images = apply_updates(self.image_transform(), g_images, state.image_opt_state, state.images)
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
    new_state = ImplicitState(state.step + 1, images, solved.params, heads, solved.opt_state, u, s_images, s_heads, key)
    return new_state, metrics
