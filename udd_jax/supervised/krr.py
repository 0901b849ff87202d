"""Kernel ridge regression (KRR) on a labelled support set: KIP's loss and its predictions.

``L(X_s, y_s) = 0.5 * mean || K_ts (K_ss + lambda I)^-1 y_s - y_t ||^2``,
``lambda = reg * trace(K_ss) / n_s``: the loss :mod:`udd_jax.supervised.kip` minimises
over the support set, and :func:`krr_predict` the predictions it is evaluated by. Labels
are mean-centred one-hot vectors (:func:`centred_one_hot`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int

from udd_jax import _validation
from udd_jax.supervised.kernels import KernelFn


def centred_one_hot(labels: Int[ArrayLike, " n"], n_classes: int) -> Float[Array, "n n_classes"]:
  """KIP's label vectors: one-hot minus ``1 / n_classes`` (``0.9`` / ``-0.1`` for ten classes).

  Examples:
    >>> centred_one_hot(jnp.array([1]), 4).tolist()
    [[-0.25, 0.75, -0.25, -0.25]]
  """
  return jax.nn.one_hot(labels, n_classes) - 1.0 / n_classes


def _ridge_solve(k_ss: jax.Array, y_s: jax.Array, reg: float | jax.Array) -> jax.Array:
  """``(K_ss + reg * trace(K_ss) / n_s * I)^-1 y_s``; the relative ridge keeps ``reg`` scale-free."""
  n_s = k_ss.shape[0]
  ridge = reg * jnp.trace(k_ss) / n_s
  return jax.scipy.linalg.solve(k_ss + ridge * jnp.eye(n_s, dtype=k_ss.dtype), y_s, assume_a="pos")


def kip_loss(
    x_support: Float[Array, "n_s ..."],
    y_support: Float[Array, "n_s n_classes"],
    x_target: Float[Array, "n_t ..."],
    y_target: Float[Array, "n_t n_classes"],
    *,
    kernel_fn: KernelFn,
    reg: float | jax.Array = 1e-6,
) -> Float[Array, ""]:
  """KIP's KRR loss ``0.5 * mean((K_ts (K_ss + lambda I)^-1 y_s - y_t)^2)``, ``lambda = reg * tr(K_ss) / n_s``.

  The mean runs over targets and label components, as in KIP's code.

  Args:
    x_support: support inputs.
    y_support: support label vectors.
    x_target: target inputs (same trailing shape as ``x_support``).
    y_target: target label vectors (same encoding as ``y_support``).
    kernel_fn: ``k(x1, x2) -> (n1, n2)``, e.g. from :func:`udd_jax.supervised.kernels.get_kernel`.
    reg: ridge regularisation, relative to the mean diagonal of ``K_ss``.

  Returns:
    The scalar loss.

  Examples:
    >>> from udd_jax.supervised.kernels import get_kernel
    >>> x = jnp.eye(3)
    >>> y = centred_one_hot(jnp.arange(3), 3)
    >>> loss = kip_loss(x, y, x, y, kernel_fn=get_kernel("fc"), reg=1e-6)
    >>> bool(loss < 1e-8)
    True
  """
  if y_support.ndim != 2 or y_target.ndim != 2 or y_support.shape[1] != y_target.shape[1]:
    raise ValueError(f"y_support and y_target must be label vectors (n, n_classes) with equal n_classes; got {y_support.shape} and {y_target.shape}.")
  if y_support.shape[0] != x_support.shape[0] or y_target.shape[0] != x_target.shape[0]:
    raise ValueError(f"labels and inputs disagree in length: x_support {x_support.shape} / y_support {y_support.shape}, x_target {x_target.shape} / y_target {y_target.shape}.")
  k_ss = kernel_fn(x_support, x_support)
  k_ts = kernel_fn(x_target, x_support)
  pred = k_ts @ _ridge_solve(k_ss, y_support, reg)
  return 0.5 * jnp.mean(jnp.square(pred - y_target))


def krr_predict(
    x_support: Float[ArrayLike, "n_s ..."],
    y_support: Float[ArrayLike, "n_s n_classes"],
    x_query: Float[ArrayLike, "n_q ..."],
    kernel_fn: KernelFn,
    *,
    reg: float = 1e-6,
    block_size: int = 1000,
) -> Float[Array, "n_q n_classes"]:
  """Kernel ridge regression fitted on the support set, evaluated on ``x_query`` in blocks.

  Args:
    x_support: support inputs.
    y_support: support targets ``(n_s, n_classes)`` (or ``(n_s,)``).
    x_query: query inputs, same trailing shape.
    kernel_fn: the kernel ``k(x1, x2) -> (n1, n2)``.
    reg: ridge regularisation, relative to the mean diagonal of ``K_ss`` (as in :func:`kip_loss`).
    block_size: queries per kernel evaluation (the last block is padded, so one compilation).

  Returns:
    The predictions ``K_qs (K_ss + lambda I)^-1 y_s``.

  Examples:
    >>> from udd_jax.supervised.kernels import get_kernel
    >>> x = jnp.eye(2)
    >>> pred = krr_predict(x, jnp.array([[1.0], [-1.0]]), x, get_kernel("fc"), reg=1e-9)
    >>> [round(float(v), 4) for v in pred[:, 0]]
    [1.0, -1.0]
  """
  reg = _validation.check_positive_float(reg, "reg", allow_zero=True)
  block_size = _validation.check_positive_int(block_size, "block_size")
  x_support, y_support, x_query = jnp.asarray(x_support), jnp.asarray(y_support), jnp.asarray(x_query)
  if x_query.shape[1:] != x_support.shape[1:]:
    raise ValueError(f"x_query must have the support's trailing shape {x_support.shape[1:]}; got {x_query.shape}.")
  alpha = _krr_fit(x_support, y_support, reg, kernel_fn=kernel_fn)
  n = x_query.shape[0]
  block = min(block_size, n)
  n_blocks = -(-n // block)
  padded = jnp.concatenate([x_query, jnp.zeros((n_blocks * block - n, *x_query.shape[1:]), x_query.dtype)])
  preds = [_krr_apply(x_support, alpha, padded[i * block : (i + 1) * block], kernel_fn=kernel_fn) for i in range(n_blocks)]
  return jnp.concatenate(preds)[:n]


# Kernels are static arguments: get_kernel returns one cached function per configuration.
@functools.partial(jax.jit, static_argnames="kernel_fn")
def _krr_fit(x_support, y_support, reg, *, kernel_fn):
  return _ridge_solve(kernel_fn(x_support, x_support), y_support, reg)


@functools.partial(jax.jit, static_argnames="kernel_fn")
def _krr_apply(x_support, alpha, x_block, *, kernel_fn):
  return kernel_fn(x_block, x_support) @ alpha
