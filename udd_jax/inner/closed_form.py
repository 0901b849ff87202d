"""Hand-derived gradients of the GRBM losses: the seed's manual formulas.

They are the test oracle for ``jax.grad`` and the reference for the quadratic
penalty ``||grad_w L_inner(w; D)||^2``. Rows of ``x`` are samples (the seed's
Julia code stores samples as columns; everything here is its transpose).

With ``H = sigmoid(x W + b)``, ``H' = H (1 - H)``, residuals
``r = (a - x)/sigma2 + H W^T`` and ``R = r / n``:

    g_W = R^T H + x^T ((R W) * H'),   g_b = sum_i ((R W) * H')_i,   g_a = sum_i R_i / sigma2

Score matching adds the gradient of the Laplacian term
``T = mean_i sum_k c_k H'_ik - d/sigma2`` with ``c_k = ||w_k||^2``:

    G = c * H' (1 - 2H) / n,   g_W += 2 W diag(mean_i H'_i) + x^T G,   g_b += sum_i G_i
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Scalar

from udd_jax.inner.grbm import GRBMParams, check_params


def ae_grad_closed_form(params: GRBMParams, x: Float[Array, "n d"], *, sigma2: float = 1.0) -> GRBMParams:
  """Gradient of :func:`udd_jax.ae_loss` with respect to ``params``, derived by hand.

  Args:
    params: GRBM parameters.
    x: inputs, shape ``(n, d)``.
    sigma2: visible variance.

  Returns:
    A :class:`GRBMParams` holding ``(g_W, g_b, g_a)``.

  Examples:
    >>> import jax, jax.numpy as jnp, udd_jax
    >>> params = udd_jax.init_params(jax.random.key(0), 6, 4, init_scale=0.5)
    >>> x = jax.random.uniform(jax.random.key(1), (8, 6))
    >>> g = ae_grad_closed_form(params, x)
    >>> g_auto = jax.grad(udd_jax.ae_loss)(params, x)
    >>> bool(jnp.allclose(g.W, g_auto.W, atol=1e-6))
    True
  """
  check_params(params, x, sigma2=sigma2)
  W, b, a = params
  n = x.shape[0]
  h = jax.nn.sigmoid(x @ W + b)
  dh = h * (1.0 - h)
  residual = ((a - x) / sigma2 + h @ W.T) / n
  back = (residual @ W) * dh
  g_W = residual.T @ h + x.T @ back
  g_b = jnp.sum(back, axis=0)
  g_a = jnp.sum(residual, axis=0) / sigma2
  return GRBMParams(W=g_W, b=g_b, a=g_a)


def score_matching_grad_closed_form(
    params: GRBMParams, x: Float[Array, "n d"], *, sigma2: float = 1.0
) -> GRBMParams:
  """Gradient of :func:`udd_jax.score_matching_loss` with respect to ``params``, by hand.

  It is the autoencoder gradient plus the gradient of the Laplacian term (see the
  module docstring).
  """
  g = ae_grad_closed_form(params, x, sigma2=sigma2)
  W, b, _ = params
  n = x.shape[0]
  h = jax.nn.sigmoid(x @ W + b)
  dh = h * (1.0 - h)
  col_norms = jnp.sum(W**2, axis=0)
  G = col_norms * dh * (1.0 - 2.0 * h) / n
  g_W = g.W + 2.0 * W * jnp.mean(dh, axis=0) + x.T @ G
  g_b = g.b + jnp.sum(G, axis=0)
  return GRBMParams(W=g_W, b=g_b, a=g.a)


def ae_penalty_closed_form(params: GRBMParams, x: Float[Array, "n d"], *, sigma2: float = 1.0) -> Scalar:
  """The penalty ``||g_W||^2 + ||g_b||^2 + ||g_a||^2`` of the AE loss, from the closed form.

  This is exactly what the seed's Julia code returns.
  """
  return optax.tree.norm(ae_grad_closed_form(params, x, sigma2=sigma2), squared=True)


def score_matching_penalty_closed_form(
    params: GRBMParams, x: Float[Array, "n d"], *, sigma2: float = 1.0
) -> Scalar:
  """The penalty ``||grad_params L_SM||^2`` of score matching, from the closed form."""
  return optax.tree.norm(score_matching_grad_closed_form(params, x, sigma2=sigma2), squared=True)
