"""Implicit differentiation of ``w*(theta) = argmin_w f(w, theta)``.

At a stationary point ``grad_w f(w*, theta) = 0``, the implicit function theorem gives,
for an outer cotangent ``v = dL/dw*``,

    dL/dtheta = -(d^2 f / dtheta dw) u,     (H_ww + damping I) u = v.

``u`` comes from conjugate gradients on Hessian-vector products built by
forward-over-reverse differentiation of ``grad_w f``, the single source of truth
for optimality. Damping keeps the system positive definite where the inner problem
is not convex.

Gauss-Newton curvature. Where ``f(w, theta) = scale * 1/2 ||r(w, theta)||^2`` is a sum of
squares, ``curvature="gauss_newton"`` replaces ``H_ww`` by ``G = scale * J^T J``
(``J = dr/dw``), which drops the term ``scale * sum_k r_k grad^2_ww r_k`` of the Hessian
and is positive semi-definite, so CG on ``G + damping I`` converges for any damping > 0.
The mixed derivative ``d^2 f / dtheta dw`` stays the true one, so the hypergradient is the
Gauss-Newton approximation of the implicit one: exact where the residuals vanish (then
``G = H_ww``), biased by the dropped term elsewhere (docs/SOLVERS.md, "Gauss-Newton
curvature").

Matmul precision. On GPU and TPU, JAX's default matmul precision for float32 is reduced
(TF32 on NVIDIA tensor cores, one bf16 pass on TPU: about three significant digits).
CG is sensitive to it: its recursion assumes the operator is the same symmetric matrix
at every iteration, and a Hessian-vector product rounded to ~1e-3 stalls the residual
near that level and can report spurious negative curvature. So :func:`hvp`, :func:`gnvp`,
:func:`conjugate_gradient`, :func:`solve_adjoint`, :func:`mixed_vjp` and the functions
built on them trace their matmuls and convolutions under
``jax.default_matmul_precision(precision)``, ``precision`` defaulting to
:data:`PRECISION` (``"highest"``: full float32). The context applies when the
computation is traced, so it holds inside ``jit``; ``precision=None`` leaves JAX's
ambient default. On CPU, float32 matmuls run at full precision whatever the setting, so
no number changes there (docs/CORRECTNESS.md, "Matmul precision on accelerators").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Scalar

from udd_jax import _validation
from udd_jax.training import linear_solve

PRECISION: str = "highest"
"""The matmul precision of the adjoint computation (see the module docstring)."""

CURVATURES: tuple[str, ...] = ("hessian", "gauss_newton")
"""The curvature matrices the adjoint solve can use (see the module docstring)."""

Residuals = Callable[[Any, Any], tuple[Any, Scalar]]
"""``(w, theta) -> (r, scale)`` with ``f(w, theta) = scale * 1/2 ||r||^2``, ``scale`` independent of ``w``."""


class LinearSolveStats(NamedTuple):
  """Diagnostics of the adjoint solve.

  Attributes:
    num_steps: CG iterations used.
    residual: relative residual ``||(H + damping I) u - v|| / ||v||`` as tracked by the
      CG recursion (no extra Hessian-vector product).
    negative_curvature: whether CG met a direction of non-positive curvature (the
      damped Hessian is indefinite there) and stopped early.
  """

  num_steps: Array
  residual: Array
  negative_curvature: Array


def hvp(f: Callable[[Any, Any], Scalar], w: Any, theta: Any, t: Any, *, precision: str | None = PRECISION) -> Any:
  """Hessian-vector product ``H_ww(w, theta) t`` by forward-over-reverse, at matmul ``precision``."""
  with jax.default_matmul_precision(precision):
    return jax.jvp(lambda p: jax.grad(f)(p, theta), (w,), (t,))[1]


def gnvp(residuals: Residuals, w: Any, theta: Any, t: Any, *, precision: str | None = PRECISION) -> Any:
  """Gauss-Newton-vector product ``scale J^T (J t)``, ``J = dr/dw`` at ``(w, theta)``, at matmul ``precision``.

  One linearisation of the residual map gives ``J t`` (forward mode) and its transpose
  ``J^T`` (reverse mode), so ``r`` is evaluated once.

  Examples:
    >>> import jax.numpy as jnp
    >>> residuals = lambda w, theta: (theta @ w, 0.5)  # f = 1/4 ||A w||^2: G = A^T A / 2
    >>> A = jnp.asarray([[1.0, 2.0], [0.0, 1.0], [1.0, 0.0]])
    >>> gnvp(residuals, jnp.ones(2), A, jnp.asarray([1.0, 0.0])).tolist()
    [1.0, 1.0]
  """
  with jax.default_matmul_precision(precision):
    _, jvp_fn, scale = jax.linearize(lambda p: residuals(p, theta), w, has_aux=True)
    (jtjt,) = jax.linear_transpose(jvp_fn, w)(jvp_fn(t))
    return optax.tree.scale(scale, jtjt)


def conjugate_gradient(
    matvec: Callable[[Any], Any], b: Any, *, tol: float, max_steps: int, x0: Any = None,
    precision: str | None = PRECISION,
) -> linear_solve.CGSolution:
  """CG for ``A x = b`` on pytrees, stopping at ``||r|| <= tol ||b||`` or at negative curvature, at matmul ``precision``.

  :func:`udd_jax.training.linear_solve.conjugate_gradient` (plain: no preconditioner)
  traced under ``jax.default_matmul_precision(precision)``. A direction with
  ``p^T A p <= 0`` ends the solve (truncated CG, as in Newton-CG methods): at the first
  iteration after one step along ``p = r0`` of length ``||p|| / ||A p||``, later at the
  current iterate; the event is reported.

  Args:
    matvec: ``x -> A x``.
    b: right-hand side.
    tol: relative tolerance on the residual norm.
    max_steps: iteration budget.
    x0: starting point (zero if None, or if its residual ``||b - A x0||`` is not below
      ``||b||``). A warm start costs one extra ``matvec`` for that residual; it can make
      ``x0`` the answer with no iteration at all.
    precision: matmul precision under which ``matvec`` and the inner products are
      traced (:data:`PRECISION` by default; None for JAX's ambient default).

  Returns:
    ``(x, num_steps, negative_curvature, residual)`` (a
    :class:`~udd_jax.training.linear_solve.CGSolution`), ``residual`` being ``||r|| / ||b||``
    of the CG recursion (equal to ``||b - A x|| / ||b||`` in exact arithmetic).
  """
  with jax.default_matmul_precision(precision):
    return linear_solve.conjugate_gradient(matvec, b, tol=tol, max_steps=max_steps, x0=x0)


def check_curvature(curvature: str, residuals: Residuals | None) -> None:
  """Raises ValueError for a curvature not in :data:`CURVATURES`, or ``"gauss_newton"`` without ``residuals``."""
  _validation.check_choice(curvature, "curvature", CURVATURES)
  if curvature == "gauss_newton" and residuals is None:
    raise ValueError("curvature='gauss_newton' needs residuals, (w, theta) -> (r, scale) with f = scale * 1/2 ||r||^2.")


def solve_adjoint(f: Callable[[Any, Any], Scalar], w: Any, theta: Any, v: Any, *, damping: float = 1e-3, tol: float = 1e-5,
                  max_steps: int = 50, init: Any = None, precision: str | None = PRECISION,
                  curvature: str = "hessian", residuals: Residuals | None = None) -> tuple[Any, LinearSolveStats]:
  """Solves ``(C + damping I) u = v`` by conjugate gradients from ``init`` (zero if None).

  ``C`` is the Hessian ``H_ww`` of ``f`` (``curvature="hessian"``, :func:`hvp`) or the
  Gauss-Newton matrix ``scale J^T J`` of ``residuals`` (``curvature="gauss_newton"``,
  :func:`gnvp`; ``residuals`` must then describe ``f``, which is not checked). Every matmul
  of the solve runs at ``precision`` (:data:`PRECISION` by default). Returns ``u`` and
  diagnostics.
  """
  check_curvature(curvature, residuals)

  def matvec(t):
    if curvature == "gauss_newton":
      return optax.tree.add_scale(gnvp(residuals, w, theta, t, precision=precision), damping, t)
    return optax.tree.add_scale(hvp(f, w, theta, t, precision=precision), damping, t)

  u, steps, negative, residual = conjugate_gradient(matvec, v, tol=tol, max_steps=max_steps, x0=init,
                                                    precision=precision)
  return u, LinearSolveStats(num_steps=steps, residual=residual, negative_curvature=negative)


def mixed_vjp(f: Callable[[Any, Any], Scalar], w: Any, theta: Any, u: Any, *,
              precision: str | None = PRECISION) -> Any:
  """``-(d^2 f / dtheta dw) u``: the hypergradient once the adjoint ``u`` is known, at matmul ``precision``."""
  with jax.default_matmul_precision(precision):
    _, vjp_theta = jax.vjp(lambda th: jax.grad(f)(w, th), theta)
    (g_theta,) = vjp_theta(u)
  return jax.tree.map(jnp.negative, g_theta)


def implicit_hypergradient(f: Callable[[Any, Any], Scalar], w: Any, theta: Any, v: Any, *, damping: float = 1e-3,
                           tol: float = 1e-5, max_steps: int = 50, precision: str | None = PRECISION,
                           curvature: str = "hessian", residuals: Residuals | None = None) -> tuple[Any, LinearSolveStats]:
  """``dL/dtheta`` through ``w*(theta)`` given the outer cotangent ``v = dL/dw`` at ``w = w*``.

  Args:
    f: inner objective ``f(w, theta) -> scalar``.
    w: the inner solution (approximately stationary).
    theta: outer variables (the distilled images).
    v: ``dL/dw`` at ``w``.
    damping: added to the Hessian's diagonal.
    tol: CG relative tolerance.
    max_steps: CG iteration budget.
    precision: matmul precision of the solve and the mixed product (:data:`PRECISION`
      by default; None for JAX's ambient default).
    curvature: ``"hessian"`` (``H_ww``) or ``"gauss_newton"`` (``scale J^T J`` of
      ``residuals``: the Gauss-Newton approximation of the hypergradient, exact where
      the residuals vanish); the mixed product is the true ``d^2 f / dtheta dw`` either way.
    residuals: ``(w, theta) -> (r, scale)`` with ``f = scale * 1/2 ||r||^2``; needed by
      ``"gauss_newton"`` only.

  Returns:
    ``(dL/dtheta, LinearSolveStats)``.
  """
  u, stats = solve_adjoint(f, w, theta, v, damping=damping, tol=tol, max_steps=max_steps, precision=precision,
                           curvature=curvature, residuals=residuals)
  return mixed_vjp(f, w, theta, u, precision=precision), stats


def implicit_argmin(
    f: Callable[[Any, Any], Scalar],
    solve: Callable[[Any, Any], Any],
    *,
    damping: float = 1e-3,
    tol: float = 1e-5,
    max_steps: int = 50,
    precision: str | None = PRECISION,
) -> Callable[[Any, Any], Any]:
  """Wraps an inner solver as a function ``w*(w_init, theta)`` differentiable in ``theta``.

  The forward pass calls ``solve(w_init, theta)``; the backward pass is
  :func:`implicit_hypergradient` (a ``jax.custom_vjp``), so any outer loss can be
  composed with the inner solution and differentiated with ``jax.grad``. The
  solvers call :func:`implicit_hypergradient` directly, which also returns CG
  diagnostics; this wrapper drops them.

  Args:
    f: inner objective ``f(w, theta) -> scalar``.
    solve: ``solve(w_init, theta) -> w*``, any (non-differentiated) inner solver.
    damping, tol, max_steps, precision: as for :func:`implicit_hypergradient`.

  Returns:
    ``argmin(w_init, theta) -> w*``; its gradient with respect to ``w_init`` is zero.
  """

  @jax.custom_vjp
  def argmin(w_init, theta):
    return solve(w_init, theta)

  def fwd(w_init, theta):
    w = solve(w_init, theta)
    return w, (w, w_init, theta)

  def bwd(residuals, v):
    w, w_init, theta = residuals
    g_theta, _ = implicit_hypergradient(f, w, theta, v, damping=damping, tol=tol, max_steps=max_steps,
                                        precision=precision)
    return jax.tree.map(jnp.zeros_like, w_init), g_theta

  argmin.defvjp(fwd, bwd)
  return argmin
