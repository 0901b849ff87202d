"""Closed-form infinite-width kernels (NNGP and NTK) of ReLU networks, for KIP.

Both kernels follow the NTK parameterisation of Jacot et al. (2018) as used by
Lee et al. (2019), Arora et al. (2019) and Neural Tangents (Novak et al., 2020): a layer
computes ``h = sqrt(w_var / fan_in) W x + sqrt(b_var) b`` with standard normal ``W, b``.
In the infinite-width limit the pre-activations of every layer are a Gaussian process
with covariance ``K`` (the NNGP kernel), and the tangent kernel ``Theta`` is
deterministic. For ReLU both follow from the arc-cosine expectations of Cho & Saul
(2009): with ``(u, v)`` centred Gaussian, variances ``k11, k22``, covariance ``k12``,
``rho = k12 / sqrt(k11 k22)``,

* ``T  = E[relu(u) relu(v)]   = sqrt(k11 k22) (sqrt(1 - rho^2) + (pi - arccos rho) rho) / (2 pi)``,
* ``T' = E[relu'(u) relu'(v)] = (pi - arccos rho) / (2 pi)``,

and a linear layer maps ``(K, Theta)`` after the activation to
``K_next = w_var T + b_var`` and ``Theta_next = K_next + w_var T' Theta``.

Precision: for an input paired with itself (or a near duplicate) ``rho`` is 1 up to
rounding, and ``arccos`` near 1 turns a rounding ``delta`` of ``rho`` into
``sqrt(2 delta)``: ``T'`` and hence the NTK carry a relative error of about 1e-8 in
float64 and 1e-4 in float32 there (the NNGP is not affected to first order).

``neural-tangents`` 0.6.5 (its latest release) does not import with the JAX this library
uses (it imports ``jax.core.Jaxpr`` and ``jax.util``, both removed), so the recursions
are written here in ``jax.numpy``; they are jittable, differentiable with respect to
the inputs (KIP differentiates through them) and checked against Monte-Carlo estimates
of wide random networks in ``tests/supervised/test_kernels.py``.

Examples:
  >>> import jax.numpy as jnp
  >>> x = jnp.eye(3)
  >>> k = fc_kernel(x, x, depth=1, kind="nngp", w_var=2.0, b_var=0.0)
  >>> [round(float(v), 3) for v in k[0]]
  [0.667, 0.212, 0.212]
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from udd_jax import _validation

KERNELS = ("fc", "conv")
KINDS = ("ntk", "nngp")
POOLINGS = ("none", "avg")

KernelFn = Callable[[jax.Array, jax.Array], jax.Array]


@jax.custom_jvp
def _relu_t_normalised(rho: jax.Array) -> jax.Array:
  """``E[relu(u) relu(v)]`` for unit variances and correlation ``rho`` (1/2 at ``rho = 1``)."""
  return (jnp.sqrt(jnp.maximum(1.0 - rho * rho, 0.0)) + (jnp.pi - jnp.arccos(rho)) * rho) / (2 * jnp.pi)


@_relu_t_normalised.defjvp
def _relu_t_normalised_jvp(primals, tangents):
  # The derivative is (pi - arccos rho) / (2 pi), finite at rho = 1 although sqrt(1 - rho^2) is not
  # differentiable there: every diagonal entry K(x, x) sits at rho = 1.
  (rho,), (drho,) = primals, tangents
  return _relu_t_normalised(rho), _relu_tdot(rho) * drho


@jax.custom_jvp
def _relu_tdot(rho: jax.Array) -> jax.Array:
  """``E[relu'(u) relu'(v)]`` for correlation ``rho``."""
  return (jnp.pi - jnp.arccos(rho)) / (2 * jnp.pi)


@_relu_tdot.defjvp
def _relu_tdot_jvp(primals, tangents):
  # d/drho = 1 / (2 pi sqrt(1 - rho^2)) is infinite at rho = 1, where the tangent of rho is 0
  # for the diagonal entries; capping the factor keeps 0 * inf from turning into NaN.
  (rho,), (drho,) = primals, tangents
  floor = jnp.finfo(rho.dtype).eps
  return _relu_tdot(rho), drho / (2 * jnp.pi * jnp.sqrt(jnp.maximum(1.0 - rho * rho, floor)))


def _relu(k12: jax.Array, k11: jax.Array, k22: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(T, T')`` for covariances ``k12`` with variances ``k11``, ``k22`` broadcast against it."""
  # Variances are 0 only where the input is 0 and b_var = 0; then k12 = 0 too, and the floor
  # gives rho = 0, T = 0 instead of 0 / 0.
  scale = jnp.sqrt(jnp.maximum(k11 * k22, jnp.finfo(k12.dtype).tiny))
  rho = jnp.clip(k12 / scale, -1.0, 1.0)
  return scale * _relu_t_normalised(rho), _relu_tdot(rho)


def _check_options(depth: Any, kind: Any, w_var: Any, b_var: Any) -> tuple[int, str, float, float]:
  depth = _validation.check_positive_int(depth, "depth")
  kind = _validation.check_choice(kind, "kind", KINDS)
  w_var = _validation.check_positive_float(w_var, "w_var")
  b_var = _validation.check_positive_float(b_var, "b_var", allow_zero=True)
  return depth, kind, w_var, b_var


def _check_pair(x1: Any, x2: Any, *, ndim: int | None) -> tuple[jax.Array, jax.Array]:
  """Shape and dtype checks that also hold for tracers (KIP calls the kernels under ``jit``)."""
  out = []
  for name, x in (("x1", x1), ("x2", x2)):
    if not hasattr(x, "shape"):
      x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} must be a floating array; got dtype {x.dtype}.")
    if ndim is not None and x.ndim != ndim:
      hint = " (grey images: add the channel axis with udd_jax.supervised.networks.as_images)" if x.ndim == ndim - 1 else ""
      raise ValueError(f"{name} must have rank {ndim} (n, H, W, C){hint}; got shape {tuple(x.shape)}.")
    if x.ndim < 2:
      raise ValueError(f"{name} must have rank >= 2 (samples first); got shape {tuple(x.shape)}.")
    if x.shape[0] == 0:
      raise ValueError(f"{name} is empty (shape {tuple(x.shape)}).")
    out.append(x)
  if out[0].shape[1:] != out[1].shape[1:]:
    raise ValueError(f"x1 and x2 must have the same trailing shape; got {tuple(out[0].shape)} and {tuple(out[1].shape)}.")
  dtype = jnp.result_type(out[0].dtype, out[1].dtype)
  return out[0].astype(dtype), out[1].astype(dtype)


def _in_row_blocks(fn: KernelFn, x1: jax.Array, x2: jax.Array, block_size: int | None) -> jax.Array:
  """``fn(x1, x2)`` computed ``block_size`` rows of ``x1`` at a time.

  Each block is rematerialised in the backward pass (``jax.checkpoint``), so differentiating
  through a blocked kernel keeps only one block's intermediates alive.
  """
  n1 = x1.shape[0]
  if block_size is None or n1 <= block_size:
    return fn(x1, x2)
  n_blocks = -(-n1 // block_size)
  padded = jnp.concatenate([x1, jnp.zeros((n_blocks * block_size - n1, *x1.shape[1:]), x1.dtype)])
  blocks = jax.lax.map(jax.checkpoint(lambda xb: fn(xb, x2)), padded.reshape(n_blocks, block_size, *x1.shape[1:]))
  return blocks.reshape(n_blocks * block_size, x2.shape[0])[:n1]


def _fc(x1: jax.Array, x2: jax.Array, *, depth: int, kind: str, w_var: float, b_var: float) -> jax.Array:
  d = x1.shape[1]
  k12 = w_var * (x1 @ x2.T) / d + b_var
  k11 = (w_var * jnp.sum(x1 * x1, axis=1) / d + b_var)[:, None]
  k22 = (w_var * jnp.sum(x2 * x2, axis=1) / d + b_var)[None, :]
  ntk = k12
  for _ in range(depth):
    t, tdot = _relu(k12, k11, k22)
    k12 = w_var * t + b_var
    if kind == "ntk":
      ntk = k12 + w_var * tdot * ntk
    # On the diagonal rho = 1, so T = k / 2.
    k11 = w_var * k11 / 2 + b_var
    k22 = w_var * k22 / 2 + b_var
  return ntk if kind == "ntk" else k12


def fc_kernel(
    x1: Float[ArrayLike, "n1 ..."], x2: Float[ArrayLike, "n2 ..."], *, depth: int = 1, kind: str = "ntk",
    w_var: float = 2.0, b_var: float = 0.01, block_size: int | None = None,
) -> Float[Array, "n1 n2"]:
  """Infinite-width kernel of a fully connected ReLU network on flattened inputs.

  The network is ``depth`` hidden layers (dense, ReLU) and a dense readout, in the NTK
  parameterisation. The input layer gives ``K(x, x') = w_var <x, x'> / d + b_var`` and
  each hidden layer applies the ReLU recursion of the module docstring; the readout's
  ``K`` and ``Theta`` are returned (the output's NNGP covariance, or the NTK, whose
  first-layer term is ``K`` itself because the inputs are not trained).

  Args:
    x1: inputs ``(n1, ...)``, flattened to ``(n1, d)``.
    x2: inputs ``(n2, ...)`` with the same trailing shape.
    depth: number of hidden ReLU layers (>= 1).
    kind: ``"ntk"`` (neural tangent kernel) or ``"nngp"`` (Gaussian-process covariance).
    w_var: weight variance ``sigma_w^2`` (2 keeps the ReLU layers' scale).
    b_var: bias variance ``sigma_b^2`` (>= 0).
    block_size: compute at most this many rows of ``x1`` at a time (``None``: all at once).

  Returns:
    The ``(n1, n2)`` kernel matrix.

  Examples:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> k = fc_kernel(x, x, depth=2, kind="ntk")
    >>> bool(jnp.allclose(k, k.T)), k.shape
    (True, (2, 2))
  """
  depth, kind, w_var, b_var = _check_options(depth, kind, w_var, b_var)
  x1, x2 = _check_pair(x1, x2, ndim=None)
  if block_size is not None:
    block_size = _validation.check_positive_int(block_size, "block_size")
  fn = functools.partial(_fc, depth=depth, kind=kind, w_var=w_var, b_var=b_var)
  return _in_row_blocks(fn, x1.reshape(x1.shape[0], -1), x2.reshape(x2.shape[0], -1), block_size)


def _patch_mean(a: jax.Array, filter_size: int) -> jax.Array:
  """Mean of ``a`` (..., H, W) over each ``filter_size`` square window, zero padded as SAME convolution pads.

  The box filter is separable, so two 1-D passes of ``filter_size`` shifted slices do it.
  """
  lo = (filter_size - 1) // 2
  hi = filter_size - 1 - lo
  height, width = a.shape[-2:]
  pad = [(0, 0)] * (a.ndim - 2)
  a = jnp.pad(a, [*pad, (lo, hi), (0, 0)])
  a = sum(a[..., i : i + height, :] for i in range(filter_size))
  a = jnp.pad(a, [*pad, (0, 0), (lo, hi)])
  a = sum(a[..., i : i + width] for i in range(filter_size))
  return a / filter_size**2


def _conv(x1: jax.Array, x2: jax.Array, *, depth: int, kind: str, filter_size: int, w_var: float, b_var: float) -> jax.Array:
  channels = x1.shape[-1]

  def conv_layer(k):
    return w_var * _patch_mean(k, filter_size) + b_var

  k12 = conv_layer(jnp.einsum("ahwc,bhwc->abhw", x1, x2) / channels)
  k11 = conv_layer(jnp.sum(x1 * x1, axis=-1) / channels)[:, None]
  k22 = conv_layer(jnp.sum(x2 * x2, axis=-1) / channels)[None, :]
  ntk = k12
  for layer in range(depth):
    t, tdot = _relu(k12, k11, k22)
    if layer == depth - 1:
      # Flatten then dense: the readout's fan-in is H * W * channels, so it averages positions.
      k12 = w_var * jnp.mean(t, axis=(-2, -1)) + b_var
      if kind == "ntk":
        ntk = k12 + w_var * jnp.mean(tdot * ntk, axis=(-2, -1))
    else:
      k12 = conv_layer(t)
      if kind == "ntk":
        ntk = k12 + w_var * _patch_mean(tdot * ntk, filter_size)
      k11 = conv_layer(k11 / 2)
      k22 = conv_layer(k22 / 2)
  return ntk if kind == "ntk" else k12


def _shifted(a: jax.Array, radius: int, fill: float = 0.0) -> jax.Array:
  """``out[..., dy, dx, h, w] = a[..., h + dy - radius, w + dx - radius]`` (``fill`` outside ``a``).

  ``a`` is ``(..., H, W)``; the result is ``(..., D, D, H, W)`` with ``D = 2 radius + 1``:
  the value at every offset within ``radius`` of each position.
  """
  height, width = a.shape[-2:]
  size = 2 * radius + 1
  pad = [(0, 0)] * (a.ndim - 2) + [(radius, radius)] * 2
  a = jnp.pad(a, pad, constant_values=fill)
  rows = [jnp.stack([a[..., dy : dy + height, dx : dx + width] for dx in range(size)], axis=-3) for dy in range(size)]
  return jnp.stack(rows, axis=-4)


def _avg_pool_offsets(a: jax.Array, radius: int) -> jax.Array:
  """2 x 2 average pooling (stride 2, VALID) of both members of a covariance held at offsets.

  ``a[..., dy, dx, h, w]`` is the covariance of position ``p = (h, w)`` of one input with
  ``p + delta`` of the other, ``delta = (dy, dx) - radius`` (odd ``radius``). The pooled
  covariance of window ``P`` with window ``P + Delta`` averages ``a`` over ``p = 2P + i``
  and ``p + delta = 2P + 2 Delta + j``, ``i, j`` in the 2 x 2 window: ``delta = 2 Delta + j - i``.
  Offsets within ``radius`` give the pooled ones within ``(radius - 1) / 2``.
  """
  height, width = a.shape[-2] // 2, a.shape[-1] // 2
  out = 0.0
  for iy in (0, 1):
    for ix in (0, 1):
      for jy in (0, 1):
        for jx in (0, 1):
          dy, dx = jy - iy + 1, jx - ix + 1  # delta index of Delta index 0
          out = out + a[..., dy : dy + 2 * radius - 1 : 2, dx : dx + 2 * radius - 1 : 2,
                        iy : iy + 2 * height : 2, ix : ix + 2 * width : 2]
  return out / 16


# Pairs per vmapped batch of the pooled kernel: each pair holds (2^(depth+1) - 1)^2 H W covariances
# (176k for 28 x 28 at depth 3) in a few dozen intermediates, so 64 pairs stay within ~2 GB.
_POOLED_PAIR_BATCH = 64


def _input_covariance(a: jax.Array, b: jax.Array, radius: int) -> jax.Array:
  """``<a(p), b(p + delta)> / C`` at every offset within ``radius``: ``(D, D, H, W)`` from images ``(C, H, W)``."""
  return jnp.einsum("chw,cdehw->dehw", a, _shifted(b, radius)) / a.shape[0]


def _pooled_pair(s: jax.Array, variances: tuple[list[jax.Array], list[jax.Array]] | None, *, depth: int, kind: str,
                 filter_size: int, w_var: float, b_var: float, prepend_conv: bool) -> jax.Array | list[jax.Array]:
  """The pooled ConvNet kernel of one pair of images, from their input covariance ``s`` at offsets.

  ``variances`` holds each image's pre-activation variance map of every layer; ``None``
  means the pair is an image with itself, whose zero offset gives them: the list of maps
  is then returned instead of the kernel.
  """

  def conv_layer(a):
    return w_var * _patch_mean(a, filter_size) + b_var

  radius = 2**depth - 1
  own, theta_post = [], None
  for layer, pool in enumerate([False] * prepend_conv + [True] * depth):
    k = conv_layer(s)
    if kind == "ntk":
      theta = k if theta_post is None else k + w_var * _patch_mean(theta_post, filter_size)
    if variances is None:
      v1 = v2 = k[radius, radius]
      own.append(v1)
    else:
      v1, v2 = variances[0][layer], variances[1][layer]
    # Offsets that leave the image pair a position with padding: unit variance, masked below.
    valid = _shifted(jnp.ones_like(v1), radius)
    t, tdot = _relu(k, v1, _shifted(v2, radius, fill=1.0))
    s = t * valid
    if kind == "ntk":
      theta_post = tdot * theta * valid
    if pool:
      s = _avg_pool_offsets(s, radius)
      if kind == "ntk":
        theta_post = _avg_pool_offsets(theta_post, radius)
      radius = (radius - 1) // 2
      valid = _shifted(jnp.ones(s.shape[-2:], s.dtype), radius)
      s = s * valid
      if kind == "ntk":
        theta_post = theta_post * valid
  if variances is None:
    return own
  # Flatten then dense: fan-in H' W' C, so the readout averages the pooled positions.
  k_out = w_var * jnp.mean(s[0, 0]) + b_var
  return k_out if kind == "nngp" else k_out + w_var * jnp.mean(theta_post[0, 0])


def _conv_pooled(x1: jax.Array, x2: jax.Array, *, depth: int, kind: str, filter_size: int, w_var: float,
                 b_var: float, prepend_conv: bool) -> jax.Array:
  """The ConvNet kernel with 2 x 2 average pooling after every ReLU (see :func:`conv_kernel`).

  Each pair's covariances are ``(2^(depth+1) - 1)^2 H W`` numbers, so the pairs are
  computed in vmapped batches (``lax.map``) and rematerialised in the backward pass.
  """
  radius = 2**depth - 1
  options = dict(depth=depth, filter_size=filter_size, w_var=w_var, b_var=b_var, prepend_conv=prepend_conv)
  x1, x2 = jnp.moveaxis(x1, -1, 1), jnp.moveaxis(x2, -1, 1)  # (n, C, H, W)

  @jax.checkpoint
  def own_variances(a):
    return _pooled_pair(_input_covariance(a, a, radius), None, kind="nngp", **options)

  v1 = jax.lax.map(own_variances, x1, batch_size=_POOLED_PAIR_BATCH)
  v2 = jax.lax.map(own_variances, x2, batch_size=_POOLED_PAIR_BATCH)

  def row(a_and_variances):
    a, va = a_and_variances

    @jax.checkpoint
    def pair(b_and_variances):
      b, vb = b_and_variances
      return _pooled_pair(_input_covariance(a, b, radius), (va, vb), kind=kind, **options)

    return jax.lax.map(pair, (x2, v2), batch_size=_POOLED_PAIR_BATCH)

  return jax.lax.map(row, (x1, v1))


def conv_kernel(
    x1: Float[ArrayLike, "n1 H W C"], x2: Float[ArrayLike, "n2 H W C"], *, depth: int = 3, kind: str = "ntk",
    filter_size: int = 3, w_var: float = 2.0, b_var: float = 0.01, pooling: str = "none",
    prepend_conv: bool = False, block_size: int | None = None,
) -> Float[Array, "n1 n2"]:
  """Infinite-width kernel of a ReLU ConvNet with a flatten ("vectorised") readout.

  The network is ``depth`` blocks of [``filter_size`` x ``filter_size`` convolution with
  SAME zero padding, ReLU] (each followed by 2 x 2 average pooling with ``pooling="avg"``),
  then flatten and one dense readout, in the NTK parameterisation (a convolution's fan-in
  is ``C_in * filter_size^2``; padded positions count as zeros).

  Derivation. Write ``K(p, p')`` for the covariance of the pre-activations at spatial
  positions ``p`` of one input and ``p'`` of the other (identical for every channel in the
  infinite-width limit). Filter taps ``W_q`` at different offsets ``q`` are independent, so
  a convolution maps the post-activation covariance ``S`` to
  ``K(p, p') = w_var * mean_q S(p + q, p' + q) + b_var``: positions are only ever paired
  with positions shifted by the same offset. ReLU acts position by position, giving
  ``T(p, p')`` from ``K(p, p'), K(p, p), K(p', p')``. The flatten readout has fan-in
  ``H W C`` and sums ``W_p . relu(h(p))`` with independent weights per position, so it
  only needs ``mean_p T(p, p)``. Hence, starting from the input covariance
  ``S(p, p) = <x(p), x'(p)> / C``, only the *equal-position* covariances ``(n1, n2, H, W)``
  and the two diagonals ``(n, H, W)`` are ever needed, and each layer is a 3 x 3 box
  average of the ReLU expectation: ``O(n1 n2 H W filter_size)`` work per layer instead of
  the ``O(n1 n2 (H W)^2)`` of a readout by global average pooling. The NTK follows the
  same path: ``Theta_next(p) = K_next(p) + w_var * mean_q (T' Theta)(p + q)`` through the
  convolutions, and ``w_var * mean_p (T' Theta)(p)`` at the readout.

  Pooling (the ConvNet of KIP's ConvNet experiments and of DC, without its normalisation)
  averages 2 x 2 windows, so it pairs *different* positions: the pooled covariance at
  ``(P, P')`` averages ``T(p, p')`` over ``p`` in window ``P`` and ``p'`` in ``P'``. The
  covariances are then held at every offset ``delta = p' - p`` within a radius: the
  readout needs offset 0, a pooling needs offsets within ``2 r + 1`` below one within
  ``r``, a convolution keeps the offset (both members shift by the same tap). The first
  layer needs ``2^depth - 1`` (15 x 15 offsets at depth 3): ``(2^(depth+1) - 1)^2`` times
  the work and memory of the unpooled first layer, against ``(H W)^2`` for all position
  pairs. Variances come from the same recursion applied to each input with itself.

  Args:
    x1: images ``(n1, H, W, C)`` (NHWC, like the networks of this package).
    x2: images ``(n2, H, W, C)``.
    depth: number of convolution + ReLU blocks (>= 1).
    kind: ``"ntk"`` or ``"nngp"``.
    filter_size: side of the square filters.
    w_var: weight variance ``sigma_w^2``.
    b_var: bias variance ``sigma_b^2`` (>= 0).
    pooling: ``"none"`` or ``"avg"`` (2 x 2 average pooling after every ReLU, stride 2,
      windows that do not fit dropped; needs ``H, W >= 2^depth``).
    prepend_conv: with ``pooling="avg"``, one more [convolution, ReLU] block without
      pooling before the ``depth`` pooled ones: the KIP authors' ConvNet
      (``prepend_conv_layer=True`` in their finite-network code).
    block_size: compute at most this many rows of ``x1`` at a time; memory is
      ``O(block_size * n2 * H * W)`` (times ``(2^(depth+1) - 1)^2`` with pooling).

  Returns:
    The ``(n1, n2)`` kernel matrix.

  Examples:
    >>> import jax
    >>> x = jax.random.normal(jax.random.key(0), (3, 6, 6, 1))
    >>> k = conv_kernel(x, x, depth=2, kind="nngp")
    >>> k.shape, bool(jnp.allclose(k, k.T, rtol=1e-5))
    ((3, 3), True)
  """
  depth, kind, w_var, b_var = _check_options(depth, kind, w_var, b_var)
  filter_size = _validation.check_positive_int(filter_size, "filter_size")
  pooling = _validation.check_choice(pooling, "pooling", POOLINGS)
  prepend_conv = _validation.check_bool(prepend_conv, "prepend_conv")
  if prepend_conv and pooling == "none":
    raise ValueError("prepend_conv=True needs pooling='avg'; without pooling every block is alike: use depth + 1.")
  x1, x2 = _check_pair(x1, x2, ndim=4)
  if pooling == "avg" and min(x1.shape[1:3]) < 2**depth:
    raise ValueError(f"pooling='avg' halves the images {depth} times (depth); images of shape {tuple(x1.shape[1:3])} "
                     f"are smaller than {2**depth} x {2**depth}.")
  if block_size is not None:
    block_size = _validation.check_positive_int(block_size, "block_size")
  fn = functools.partial(_conv, depth=depth, kind=kind, filter_size=filter_size, w_var=w_var, b_var=b_var)
  if pooling == "avg":
    fn = functools.partial(_conv_pooled, depth=depth, kind=kind, filter_size=filter_size, w_var=w_var, b_var=b_var,
                           prepend_conv=prepend_conv)
  return _in_row_blocks(fn, x1, x2, block_size)


def get_kernel(name: str, **options: Any) -> KernelFn:
  """The kernel function ``k(x1, x2) -> (n1, n2)`` called ``name`` (``"fc"`` or ``"conv"``) with ``options`` bound.

  Equal arguments give the same (cached) function object, so a jitted function that takes
  the kernel as a static argument compiles once per kernel, not once per call.

  Args:
    name: ``"fc"`` for :func:`fc_kernel` or ``"conv"`` for :func:`conv_kernel`.
    **options: keyword options of that function (``depth``, ``kind``, ``w_var``, ...).

  Returns:
    A function of two input arrays; options are checked now, not at the first call.

  Examples:
    >>> import jax.numpy as jnp
    >>> k = get_kernel("fc", depth=2, kind="nngp")
    >>> k(jnp.ones((2, 3)), jnp.ones((4, 3))).shape
    (2, 4)
    >>> k is get_kernel("fc", kind="nngp", depth=2)
    True
  """
  _validation.check_choice(name, "kernel", KERNELS)
  allowed = {"depth", "kind", "w_var", "b_var", "block_size"} | ({"filter_size", "pooling", "prepend_conv"} if name == "conv" else set())
  unknown = sorted(set(options) - allowed)
  if unknown:
    raise TypeError(f"unknown option(s) {unknown} for the {name!r} kernel; valid options are {sorted(allowed)}.")
  try:
    # Types are part of the key: depth=1.0 or depth=True must not find the entry of depth=1.
    return _cached_kernel(name, tuple(sorted((k, type(v).__name__, v) for k, v in options.items())))
  except TypeError as e:
    if "unhashable" not in str(e):
      raise
    raise TypeError(f"kernel options must be numbers or strings; got {options!r}.") from None


@functools.lru_cache(maxsize=64)
def _cached_kernel(name: str, options: tuple[tuple[str, str, Any], ...]) -> KernelFn:
  kwargs = {k: v for k, _, v in options}
  fn = functools.partial(fc_kernel if name == "fc" else conv_kernel, **kwargs)
  # Run the option checks once here so that a typo fails before any tracing (a pooled
  # kernel needs images of at least 2^depth pixels a side).
  depth = kwargs.get("depth", 3)
  size = 2**depth if kwargs.get("pooling") == "avg" and isinstance(depth, int) and 1 < depth <= 8 else 3
  probe = jnp.zeros((1, size, size, 1))
  jax.eval_shape(fn, probe, probe)
  return fn
