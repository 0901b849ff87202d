"""Conjugate gradients on pytrees: the one linear solver of the library.

The implicit hypergradients (:mod:`udd_jax.bilevel.implicit_diff`, on Hessian- or
Gauss-Newton-vector products) and the Newton steps of the logistic probe
(:mod:`udd_jax.evaluation.logistic`, preconditioned by a Cholesky factor) both solve
``A x = b`` with it. It lives below both layers, which may not import each other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike
from jaxtyping import Array


class CGSolution(NamedTuple):
  """The outcome of :func:`conjugate_gradient`.

  Attributes:
    x: the solution estimate.
    num_steps: iterations used.
    negative_curvature: whether a direction with ``p^T A p <= 0`` ended the solve.
    residual: relative residual ``||r|| / ||b||`` as tracked by the recursion (equal to
      ``||b - A x|| / ||b||`` in exact arithmetic; no extra ``matvec``).
  """

  x: Any
  num_steps: Array
  negative_curvature: Array
  residual: Array


class _Carry(NamedTuple):
  x: Any
  r: Any  # the residual b - A x
  p: Any  # the search direction
  rs: Array  # <r, r>, for the stopping rule
  rz: Array  # <r, M^-1 r>, for the step (rs itself without a preconditioner)
  step: Array
  negative: Array


def conjugate_gradient(
    matvec: Callable[[Any], Any],
    b: Any,
    *,
    max_steps: int,
    tol: float = 0.0,
    atol: ArrayLike = 0.0,
    x0: Any = None,
    precondition: Callable[[Any], Any] | None = None,
    vdot: Callable[[Any, Any], Array] = optax.tree.vdot,
) -> CGSolution:
  """(Preconditioned) CG for ``A x = b``, until ``||r|| <= max(tol ||b||, atol)``, ``max_steps`` or negative curvature.

  JAX's ``jax.scipy.sparse.linalg.cg`` reports neither iterations nor breakdown, and
  lineax's CG fails with NaN when the operator is indefinite; here a direction with
  ``p^T A p <= 0`` ends the solve (truncated CG, as in Newton-CG methods): at the first
  iteration after one step along ``p`` (the preconditioned residual) of length
  ``||p|| / ||A p||``, later at the current iterate; the event is reported.

  Args:
    matvec: ``x -> A x`` on pytrees shaped like ``b``; ``A`` symmetric.
    b: right-hand side (a pytree).
    max_steps: iteration budget.
    tol: relative tolerance on the residual norm (0: none).
    atol: absolute tolerance on the residual norm (0: none); may be traced.
    x0: starting point (zero if None, or if its residual ``||b - A x0||`` is not below
      ``||b||``). A warm start costs one extra ``matvec`` for that residual; it can make
      ``x0`` the answer with no iteration at all.
    precondition: ``r -> M^-1 r`` for a symmetric positive definite ``M ~ A`` (None: the
      identity, plain CG).
    vdot: the inner product of two pytrees. ``optax.tree.vdot`` (a dot product per leaf)
      by default; the logistic probe sums elementwise products, which round differently.

  Returns:
    A :class:`CGSolution`: ``(x, num_steps, negative_curvature, residual)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> a = jnp.asarray([[4.0, 1.0], [1.0, 3.0]])
    >>> solution = conjugate_gradient(lambda v: a @ v, jnp.asarray([1.0, 2.0]), tol=1e-6, max_steps=10)
    >>> [round(float(v), 4) for v in solution.x], int(solution.num_steps), bool(solution.negative_curvature)
    ([0.0909, 0.6364], 2, False)
  """
  plain = precondition is None
  bb = vdot(b, b)
  threshold = (tol**2) * bb

  def cond(carry):
    return (carry.step < max_steps) & (carry.rs > threshold) & (jnp.sqrt(carry.rs) > atol) & ~carry.negative

  def body(carry):
    x, r, p, rs, rz, i, _ = carry
    ap = matvec(p)
    pap = vdot(p, ap)
    negative = pap <= 0
    # At negative curvature the first iteration steps along p by ||p|| / ||A p|| and a later one
    # stops where it is (Newton-CG, Nocedal & Wright Alg. 7.1): a CG step of length
    # r^T z / |p^T A p| would explode as p^T A p -> 0.
    fallback = jnp.where(i == 0, optax.tree.norm(p) / jnp.maximum(optax.tree.norm(ap), 1e-30), 0.0)
    alpha = jnp.where(negative, fallback, rz / jnp.where(negative, 1.0, pap))
    x = optax.tree.add_scale(x, alpha, p)
    r = optax.tree.add_scale(r, -alpha, ap)
    rs_new = vdot(r, r)
    if plain:
      z, rz_new = r, rs_new
    else:
      z = precondition(r)
      rz_new = vdot(r, z)
    p = optax.tree.add_scale(z, rz_new / rz, p)
    return _Carry(x, r, p, rs_new, rz_new, i + 1, negative)

  if x0 is None:
    x0, r0, rs0 = optax.tree.zeros_like(b), b, bb
  else:
    # A warm start is kept only if it beats zero: after a step taken along negative
    # curvature, x0 can be far worse than zero, and warm starts would compound it.
    r_warm = optax.tree.sub(b, matvec(x0))
    rs_warm = vdot(r_warm, r_warm)
    keep = rs_warm < bb
    x0 = jax.tree.map(lambda x: jnp.where(keep, x, jnp.zeros_like(x)), x0)
    r0 = jax.tree.map(lambda rw, b_: jnp.where(keep, rw, b_), r_warm, b)
    rs0 = jnp.where(keep, rs_warm, bb)
  if plain:
    z0, rz0 = r0, rs0
  else:
    z0 = precondition(r0)
    rz0 = vdot(r0, z0)
  init = _Carry(x0, r0, z0, rs0, rz0, jnp.asarray(0), jnp.asarray(False))
  x, _, _, rs, _, steps, negative = jax.lax.while_loop(cond, body, init)
  return CGSolution(x, steps, negative, jnp.sqrt(rs / jnp.maximum(bb, 1e-30)))
