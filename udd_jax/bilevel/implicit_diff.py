"""Implicit differentiation of ``w*(theta) = argmin_w f(w, theta)``.

At a stationary point ``grad_w f(w*, theta) = 0``, the implicit function theorem gives,
for an outer cotangent ``v = dL/dw*``,

    dL/dtheta = -(d^2 f / dtheta dw) u,     (H_ww + damping I) u = v.

``u`` comes from conjugate gradients on Hessian-vector products built by
forward-over-reverse differentiation of ``grad_w f``, the single source of truth
for optimality. Damping keeps the system positive definite where the inner problem
is not convex.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Scalar


class LinearSolveStats(NamedTuple):
  """Diagnostics of the adjoint solve.

  Attributes:
    num_steps: CG iterations used.
    residual: relative residual ``||(H + damping I) u - v|| / ||v||``, measured with one
      extra Hessian-vector product after the solve.
    negative_curvature: whether CG met a direction of non-positive curvature (the
      damped Hessian is indefinite there) and stopped early.
  """

  num_steps: Array
  residual: Array
  negative_curvature: Array


def hvp(f: Callable[[Any, Any], Scalar], w: Any, theta: Any, t: Any) -> Any:
  """Hessian-vector product ``H_ww(w, theta) t`` by forward-over-reverse."""
  return jax.jvp(lambda p: jax.grad(f)(p, theta), (w,), (t,))[1]


def conjugate_gradient(
    matvec: Callable[[Any], Any], b: Any, *, tol: float, max_steps: int
) -> tuple[Any, Array, Array]:
  """CG for ``A x = b`` on pytrees, stopping at ``||r|| <= tol ||b||`` or at negative curvature.

  JAX's ``jax.scipy.sparse.linalg.cg`` reports neither iterations nor breakdown, and
  lineax's CG fails with NaN when the operator is indefinite; here a direction with
  ``p^T A p <= 0`` ends the solve with one step of length ``r^T r / |p^T A p|``
  (truncated CG, as in Newton-CG methods), and the event is reported.

  Returns:
    ``(x, num_steps, negative_curvature)``.
  """
  rs0 = optax.tree.vdot(b, b)
  threshold = (tol**2) * rs0

  def cond(carry):
    _, _, _, rs, i, stop = carry
    return (i < max_steps) & (rs > threshold) & ~stop

  def body(carry):
    x, r, p, rs, i, _ = carry
    ap = matvec(p)
    pap = optax.tree.vdot(p, ap)
    negative = pap <= 0
    alpha = rs / jnp.where(negative, jnp.maximum(-pap, 1e-30), pap)
    x = optax.tree.add_scale(x, alpha, p)
    r = optax.tree.add_scale(r, -alpha, ap)
    rs_new = optax.tree.vdot(r, r)
    p = optax.tree.add_scale(r, rs_new / rs, p)
    return x, r, p, rs_new, i + 1, negative

  x0 = optax.tree.zeros_like(b)
  init = (x0, b, b, rs0, jnp.asarray(0), jnp.asarray(False))
  x, _, _, _, steps, negative = jax.lax.while_loop(cond, body, init)
  return x, steps, negative


def solve_adjoint(
    f: Callable[[Any, Any], Scalar],
    w: Any,
    theta: Any,
    v: Any,
    *,
    damping: float = 1e-3,
    tol: float = 1e-5,
    max_steps: int = 50,
) -> tuple[Any, LinearSolveStats]:
  """Solves ``(H_ww + damping I) u = v`` by conjugate gradients; returns ``u`` and diagnostics."""

  def matvec(t):
    return optax.tree.add_scale(hvp(f, w, theta, t), damping, t)

  u, steps, negative = conjugate_gradient(matvec, v, tol=tol, max_steps=max_steps)
  residual = optax.tree.norm(optax.tree.sub(matvec(u), v)) / jnp.maximum(optax.tree.norm(v), 1e-30)
  return u, LinearSolveStats(num_steps=steps, residual=residual, negative_curvature=negative)


def implicit_hypergradient(
    f: Callable[[Any, Any], Scalar],
    w: Any,
    theta: Any,
    v: Any,
    *,
    damping: float = 1e-3,
    tol: float = 1e-5,
    max_steps: int = 50,
) -> tuple[Any, LinearSolveStats]:
  """``dL/dtheta`` through ``w*(theta)`` given the outer cotangent ``v = dL/dw`` at ``w = w*``.

  Args:
    f: inner objective ``f(w, theta) -> scalar``.
    w: the inner solution (approximately stationary).
    theta: outer variables (the distilled images).
    v: ``dL/dw`` at ``w``.
    damping: added to the Hessian's diagonal.
    tol: CG relative tolerance.
    max_steps: CG iteration budget.

  Returns:
    ``(dL/dtheta, LinearSolveStats)``.
  """
  u, stats = solve_adjoint(f, w, theta, v, damping=damping, tol=tol, max_steps=max_steps)
  _, vjp_theta = jax.vjp(lambda th: jax.grad(f)(w, th), theta)
  (g_theta,) = vjp_theta(u)
  return jax.tree.map(jnp.negative, g_theta), stats


def implicit_argmin(
    f: Callable[[Any, Any], Scalar],
    solve: Callable[[Any, Any], Any],
    *,
    damping: float = 1e-3,
    tol: float = 1e-5,
    max_steps: int = 50,
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
    damping, tol, max_steps: as for :func:`implicit_hypergradient`.

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
    g_theta, _ = implicit_hypergradient(f, w, theta, v, damping=damping, tol=tol, max_steps=max_steps)
    return jax.tree.map(jnp.zeros_like, w_init), g_theta

  argmin.defvjp(fwd, bwd)
  return argmin
