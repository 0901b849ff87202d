"""A tied linear autoencoder with ordered ridge penalties: a learner whose inner argmin has a closed form.

With ``y = x - a`` the reconstruction is ``y W W^T`` and the loss (docs/METHOD.md, section 2.4) is

    L(W, a; X) = mean_i 1/2 ||y_i - y_i W W^T||^2 + 1/2 sum_k lambda_k ||w_k||^2,
    lambda_k = reg * (k + 1) / K   (k = 0 .. K-1: distinct and increasing).

The features are ``y W`` (linear). Distinct penalties break the rotation symmetry of a plain
linear autoencoder (``W -> W R`` leaves its loss unchanged), so the minimum is unique up to the
sign of each column (Bao et al., 2020, "Regularized linear autoencoders recover the principal
components, eventually"): ``a* = mean(X)`` and, with ``S = Y^T Y / n`` (Y centred) and its
eigenpairs ``(s_k, u_k)`` in decreasing order,

    w_k* = c_k u_k,   c_k^2 = max(0, 1 - lambda_k / (2 s_k)).

Column ``k`` (the ``k``-th smallest penalty) takes the ``k``-th principal direction. The minimum
is isolated (its Hessian is positive definite where the ``s_k`` are distinct and no
``lambda_k = 2 s_k``), so ``W*(X)`` is differentiable and :func:`linear_ae_solution`, a
function of ``X`` through one symmetric eigendecomposition, gives the exact hypergradient of
any outer loss, against which every solver is checked (``tests/test_linear_ae.py``). The
learner is :class:`udd_jax.inner.learners.LinearAELearner`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Scalar

from udd_jax import _validation


class LinearAEParams(NamedTuple):
  """Tied weights ``W`` (d, K), column ``k`` the filter ``w_k``, and the offset ``a`` (d,)."""

  W: Float[Array, "d K"]
  a: Float[Array, " d"]


def penalties(n_hidden: int, reg: float | Array, dtype: Any = jnp.float32) -> Float[Array, " K"]:
  """The ordered ridge penalties ``lambda_k = reg * (k + 1) / K``."""
  return reg * jnp.arange(1, n_hidden + 1, dtype=dtype) / n_hidden


def check_params(params: Any, x: Any, name: str = "x") -> None:
  """Shape and dtype checks of :class:`LinearAEParams` and data ``x`` (n, d); they work under ``jit``."""
  if not isinstance(params, LinearAEParams):
    raise TypeError(f"params must be a LinearAEParams(W, a); got {type(params).__name__}.")
  _validation.check_static_array(params.W, "params.W", 2)
  _validation.check_static_array(params.a, "params.a", 1)
  if params.a.shape != (params.W.shape[0],):
    raise ValueError(f"params.a must have shape ({params.W.shape[0]},) to match params.W "
                     f"{_validation.shape_str(params.W.shape)}; got {_validation.shape_str(params.a.shape)}.")
  _validation.check_static_inputs(x, name, params.W.shape[0], "params.W")


def linear_ae_loss(params: LinearAEParams, x: Float[Array, "n d"], *, reg: float = 1e-2) -> Scalar:
  """The tied linear autoencoder's loss with ordered ridge penalties (module docstring).

  Examples:
    >>> import jax.numpy as jnp
    >>> params = LinearAEParams(W=jnp.zeros((3, 2)), a=jnp.zeros(3))
    >>> float(linear_ae_loss(params, jnp.ones((4, 3))))  # 1/2 ||x||^2 with W = 0
    1.5
  """
  check_params(params, x)
  y = x - params.a
  r = y - (y @ params.W) @ params.W.T
  ridge = jnp.sum(penalties(params.W.shape[1], reg, params.W.dtype) * jnp.sum(params.W**2, axis=0))
  return 0.5 * jnp.mean(jnp.sum(r**2, axis=-1)) + 0.5 * ridge


def linear_ae_grad_closed_form(params: LinearAEParams, x: Float[Array, "n d"], *, reg: float = 1e-2) -> LinearAEParams:
  """The gradient of :func:`linear_ae_loss`, derived by hand (the test oracle of ``jax.grad``).

  With ``y = x - a``, ``S = Y^T Y / n``, ``m = mean_i y_i`` and ``P = W W^T``:
  ``g_W = -2 S W + S W (W^T W) + W (W^T S W) + W diag(lambda)`` and ``g_a = -(I - P)^2 m``.
  """
  check_params(params, x)
  W = params.W
  y = x - params.a
  n = x.shape[0]
  SW = y.T @ (y @ W) / n
  g_W = -2.0 * SW + SW @ (W.T @ W) + W @ (W.T @ SW) + W * penalties(W.shape[1], reg, W.dtype)
  m = jnp.mean(y, axis=0)
  once = m - W @ (W.T @ m)
  g_a = -(once - W @ (W.T @ once))
  return LinearAEParams(W=g_W, a=g_a)


def linear_ae_solution(x: Float[Array, "n d"], n_hidden: int, *, reg: float = 1e-2,
                       signs_like: Float[Array, "d K"] | None = None) -> LinearAEParams:
  """The minimiser of :func:`linear_ae_loss` on ``x``, differentiable in ``x``.

  The principal directions come from the ``n x n`` Gram matrix of the centred data (so a
  set with fewer rows than pixels has no degenerate null space to differentiate through);
  directions whose eigenvalue ``s_k <= lambda_k / 2`` get ``w_k = 0``. The minimiser is unique
  up to the sign of each column: ``signs_like`` (a ``W`` to agree with) picks the signs, else
  each column's largest entry is positive. Its derivative needs distinct eigenvalues.

  Args:
    x: data, shape ``(n, d)``.
    n_hidden: the number of columns ``K``.
    reg: the largest penalty (``lambda_K``).
    signs_like: a ``(d, K)`` weight matrix whose column signs the result takes.

  Returns:
    A :class:`LinearAEParams` ``(W*, a* = mean(x))``.
  """
  n_hidden = _validation.check_positive_int(n_hidden, "n_hidden")
  _validation.check_static_inputs(x, "x")
  n, d = x.shape
  a = jnp.mean(x, axis=0)
  y = x - a
  s, v = jnp.linalg.eigh(y @ y.T / n)
  s, v = s[::-1], v[:, ::-1]  # decreasing
  k = min(n_hidden, n)
  s, v = s[:k], v[:, :k]
  lam = penalties(n_hidden, reg, x.dtype)[:k]
  active = s > lam / 2
  safe_s = jnp.where(active, s, 1.0)  # no division by a (near-)zero eigenvalue, in the value or its derivative
  c = jnp.where(active, jnp.sqrt(jnp.where(active, 1.0 - lam / (2 * safe_s), 1.0)), 0.0)
  u = (y.T @ v) / jnp.sqrt(n * safe_s)
  W = jnp.zeros((d, n_hidden), x.dtype).at[:, :k].set(u * c)
  if signs_like is None:
    signs = jnp.sign(jnp.take_along_axis(W, jnp.argmax(jnp.abs(W), axis=0)[None], axis=0)[0])
  else:
    signs = jnp.sign(jnp.sum(jnp.asarray(signs_like) * W, axis=0))
  return LinearAEParams(W=W * jax.lax.stop_gradient(jnp.where(signs == 0, 1.0, signs)), a=a)
