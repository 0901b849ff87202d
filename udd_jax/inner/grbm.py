"""The Gaussian-Bernoulli RBM (GRBM) inner learner and its proper scoring rules.

All functions are pure: ``loss(params, x, **hparams) -> scalar`` with ``x`` of
shape ``(n, d)`` (flattened inputs, one row per sample). With ``h = sigmoid(x W + b)``
the GRBM log-density and score are

    log p(x) = -||x - a||^2 / (2 sigma2) + sum_k softplus(x . w_k + b_k)   (+ const)
    s(x)     = grad_x log p(x) = (a - x) / sigma2 + W h(x)

and the features handed to task heads are ``h(x)``.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, Scalar

from udd_jax import _validation


class GRBMParams(NamedTuple):
  """Parameters of a GRBM / tied autoencoder with ``d`` visible and ``K`` hidden units.

  Attributes:
    W: weights, shape ``(d, K)``; column ``k`` is the filter ``w_k``.
    b: hidden biases, shape ``(K,)``.
    a: visible biases (the reconstruction offset), shape ``(d,)``.
  """

  W: Float[Array, "d K"]
  b: Float[Array, " K"]
  a: Float[Array, " d"]


def init_params(
    key: PRNGKeyArray,
    n_visible: int,
    n_hidden: int,
    *,
    init_scale: float = 0.01,
    dtype: jnp.dtype = jnp.float32,
) -> GRBMParams:
  """Initialises GRBM parameters: ``W = init_scale * N(0, 1)``, ``b = 0``, ``a = 0``.

  This is the init of the inner recipe stored with a distilled set (the
  ``init_scale`` key), so that anyone can re-train a learner on it.

  Args:
    key: a JAX PRNG key.
    n_visible: input dimension ``d``.
    n_hidden: number of hidden units ``K``.
    init_scale: standard deviation of the weights (a Python number, or an array under ``jit``).
    dtype: floating dtype of the parameters.

  Returns:
    A :class:`GRBMParams`.

  Examples:
    >>> import jax
    >>> params = init_params(jax.random.key(0), 64, 16)
    >>> params.W.shape, params.b.shape, params.a.shape
    ((64, 16), (16,), (64,))
  """
  n_visible = _validation.check_positive_int(n_visible, "n_visible")
  n_hidden = _validation.check_positive_int(n_hidden, "n_hidden")
  if not isinstance(init_scale, jax.Array):  # a traced scale (re-training many recipes) cannot be checked
    init_scale = _validation.check_positive_float(init_scale, "init_scale", allow_zero=True)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"dtype must be a floating dtype; got {dtype}.")
  W = init_scale * jax.random.normal(key, (n_visible, n_hidden), dtype)
  return GRBMParams(W=W, b=jnp.zeros((n_hidden,), dtype), a=jnp.zeros((n_visible,), dtype))


def check_params(params: Any, x: Any, name: str = "x", *, sigma2: Any = 1.0) -> None:
  """Shape and dtype checks of GRBM ``params`` and data ``x`` (n, d) that also work under ``jit``.

  ``sigma2`` is checked to be positive when it is a concrete Python number.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> check_params(init_params(jax.random.key(0), 4, 3), jnp.ones((2, 5)))
    Traceback (most recent call last):
    ...
    ValueError: x has 5 features but params.W expects 4; got shape (2, 5).
  """
  if isinstance(sigma2, numbers.Real) and not (sigma2 > 0 and np.isfinite(sigma2)):
    raise ValueError(f"sigma2 must be a finite positive number; got {sigma2}.")
  if not isinstance(params, tuple) or len(params) != 3:
    raise TypeError(f"params must be a GRBMParams(W, b, a); got {type(params).__name__}.")
  W, b, a = params
  for pname, p, rank in (("params.W", W, 2), ("params.b", b, 1), ("params.a", a, 1)):
    _validation.check_static_array(p, pname, rank)
  d, k = W.shape
  shape = _validation.shape_str
  if b.shape != (k,):
    raise ValueError(f"params.b must have shape {shape((k,))} to match params.W {shape(W.shape)}; got {shape(b.shape)}.")
  if a.shape != (d,):
    raise ValueError(f"params.a must have shape {shape((d,))} to match params.W {shape(W.shape)}; got {shape(a.shape)}.")
  _validation.check_static_inputs(x, name, d, "params.W")


def _hidden(params: GRBMParams, x: Array) -> Array:
  return jax.nn.sigmoid(x @ params.W + params.b)


def features(params: GRBMParams, x: Float[Array, "n d"]) -> Float[Array, "n K"]:
  """Hidden-unit activations ``sigmoid(x W + b)``, the features given to task heads.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> params = init_params(jax.random.key(0), 4, 3)
    >>> features(params, jnp.zeros((2, 4))).tolist()
    [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]
  """
  check_params(params, x)
  return _hidden(params, x)


def _score(params: GRBMParams, x: Array, h: Array, sigma2: float) -> Array:
  return (params.a - x) / sigma2 + h @ params.W.T


def score(params: GRBMParams, x: Float[Array, "n d"], *, sigma2: float = 1.0) -> Float[Array, "n d"]:
  """The GRBM score ``grad_x log p(x) = (a - x) / sigma2 + W sigmoid(W^T x + b)``, row-wise."""
  check_params(params, x, sigma2=sigma2)
  return _score(params, x, _hidden(params, x), sigma2)


def ae_loss(params: GRBMParams, x: Float[Array, "n d"], *, sigma2: float = 1.0) -> Scalar:
  """Tied-autoencoder loss of the seed: ``mean_i 1/2 ||(a - x_i)/sigma2 + W h(x_i)||^2``.

  This is half the mean squared GRBM score. With ``sigma2 = 1`` it is the
  squared error of the tied-weight reconstruction ``a + W h(x)``.

  Args:
    params: GRBM parameters.
    x: inputs, shape ``(n, d)``.
    sigma2: visible variance.

  Returns:
    The scalar loss.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> params = init_params(jax.random.key(0), 4, 3, init_scale=0.0)
    >>> float(ae_loss(params, jnp.ones((5, 4))))  # 1/2 ||a - x||^2 with a = 0
    2.0
  """
  check_params(params, x, sigma2=sigma2)
  r = _score(params, x, _hidden(params, x), sigma2)
  return 0.5 * jnp.mean(jnp.sum(r**2, axis=-1))


def score_matching_loss(params: GRBMParams, x: Float[Array, "n d"], *, sigma2: float = 1.0) -> Scalar:
  """Exact Hyvarinen score matching for the GRBM.

  ``L_SM = mean_i [ 1/2 ||s(x_i)||^2 + tr(grad_x s(x_i)) ]`` with the closed-form
  Laplacian ``tr(grad_x s(x)) = sum_k ||w_k||^2 h_k (1 - h_k) - d / sigma2``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> params = init_params(jax.random.key(0), 4, 3, init_scale=0.0)
    >>> float(score_matching_loss(params, jnp.ones((5, 4))))  # 2.0 - d
    -2.0
  """
  check_params(params, x, sigma2=sigma2)
  h = _hidden(params, x)
  s = _score(params, x, h, sigma2)
  d = x.shape[-1]
  trace = (h * (1.0 - h)) @ jnp.sum(params.W**2, axis=0) - d / sigma2
  return jnp.mean(0.5 * jnp.sum(s**2, axis=-1) + trace)


def sliced_score_matching_loss(
    params: GRBMParams,
    x: Float[Array, "n d"],
    key: PRNGKeyArray,
    *,
    sigma2: float = 1.0,
) -> Scalar:
  """Sliced score matching (Song et al., 2019) for the GRBM, one random projection per row.

  With ``v_i ~ N(0, I)`` drawn from ``key``, the loss is
  ``mean_i [ 1/2 (v_i . s(x_i))^2 + v_i^T grad_x s(x_i) v_i ]``: score matching with the
  Laplacian replaced by a projection of the Jacobian, which needs one Jacobian-vector
  product instead of ``d``. Its expectation over ``v`` is :func:`score_matching_loss`
  (``E[v v^T] = I``). For the GRBM the projection has a closed form,
  ``v^T grad_x s v = sum_k h_k (1 - h_k) (w_k . v)^2 - ||v||^2 / sigma2``, which is what is
  computed (a test checks it against ``jax.jvp`` of :func:`score`).

  Args:
    params: GRBM parameters.
    x: inputs, shape ``(n, d)``.
    key: PRNG key for the projections.
    sigma2: visible variance.

  Returns:
    The scalar loss (a Monte Carlo estimate with one projection per sample).
  """
  check_params(params, x, sigma2=sigma2)
  v = jax.random.normal(key, x.shape, x.dtype)
  h = _hidden(params, x)
  s = _score(params, x, h, sigma2)
  projected_jacobian = jnp.sum(h * (1.0 - h) * (v @ params.W) ** 2, axis=-1) - jnp.sum(v**2, axis=-1) / sigma2
  return jnp.mean(0.5 * jnp.sum(v * s, axis=-1) ** 2 + projected_jacobian)


def denoising_score_matching_loss(
    params: GRBMParams,
    x: Float[Array, "n d"],
    key: PRNGKeyArray,
    *,
    sigma2: float = 1.0,
    noise_std: float = 0.1,
) -> Scalar:
  """Denoising score matching (Vincent, 2011) for the GRBM.

  With ``x~ = x + noise_std * eps``, ``eps ~ N(0, I)``, the loss is
  ``mean_i 1/2 ||s(x~_i) + eps_i / noise_std||^2``: the score of the model at the
  noisy point regresses the score of the Gaussian corruption kernel. It is
  unweighted (no ``noise_std^2`` factor), so its scale grows as ``noise_std`` shrinks.

  Args:
    params: GRBM parameters.
    x: clean inputs, shape ``(n, d)``.
    key: PRNG key for the corruption noise.
    sigma2: visible variance of the GRBM.
    noise_std: standard deviation of the Gaussian corruption.

  Returns:
    The scalar loss (a Monte Carlo estimate with one noise draw per sample).
  """
  r = denoising_score_matching_residuals(params, x, key, sigma2=sigma2, noise_std=noise_std)
  return 0.5 * jnp.mean(jnp.sum(r**2, axis=-1))


def denoising_score_matching_residuals(
    params: GRBMParams,
    x: Float[Array, "n d"],
    key: PRNGKeyArray,
    *,
    sigma2: float = 1.0,
    noise_std: float = 0.1,
) -> Float[Array, "n d"]:
  """The residuals ``s(x~_i) + eps_i / noise_std`` of :func:`denoising_score_matching_loss`, row-wise.

  The loss is ``mean_i 1/2 ||r_i||^2`` of these (the same noise draw for the same ``key``).
  """
  check_params(params, x, sigma2=sigma2)
  if not isinstance(noise_std, jax.Array):  # a traced noise level cannot be checked
    _validation.check_positive_float(noise_std, "noise_std")
  eps = jax.random.normal(key, x.shape, x.dtype)
  x_noisy = x + noise_std * eps
  s = _score(params, x_noisy, _hidden(params, x_noisy), sigma2)
  return s + eps / noise_std
