"""Differentiable Siamese augmentation (DSA; Zhao & Bilen, ICML 2021).

DSA augments the real and the synthetic batch of a matching step with *the same* randomly
sampled transform, and every operation is differentiable in the images, so the matching
loss back-propagates through the augmentation to the synthetic images.

The operations and their ranges are those of the DSA code (``ParamDiffAug``):

* ``color``: brightness ``x + (u - 0.5) * 1.0``, then saturation (deviation from the
  channel mean times ``2u``; the identity on grey images), then contrast (deviation from
  the image mean times ``u + 0.5``);
* ``crop``: integer translation by up to ``round(0.125 * side)`` pixels, zero padding;
* ``cutout``: a zeroed square of half the image side at a random centre;
* ``flip``: left-right mirror with probability 0.5;
* ``scale``: independent x and y scaling of the sampling grid by ``s`` in
  ``[1 / 1.2, 1.2]``;
* ``rotate``: rotation by up to 15 degrees either way.

Geometric operations (``scale``, ``rotate``) build an affine sampling grid as
``torch.nn.functional.affine_grid`` does (``align_corners=False``, the default the DSA code
runs with) and sample it bilinearly with zero padding, written in ``jnp`` gathers, so the
result is differentiable (and linear) in the images.

**One operation per call.** The DSA code's default mode (``ParamDiffAug.aug_mode = 'S'``)
draws *one* operation of the strategy per call and applies it; mode ``'M'`` applies them
all in sequence. :func:`sample_dsa_params` does the former by default
(``mode="single"``) and the latter with ``mode="all"``.

**Siamese (batch) mode.** One transform per call, shared by every image of the batch (the
DSA code's ``Siamese``/batch mode): calling :func:`dsa` with the same key on the real and
on the synthetic batch applies exactly the same transform to both. :func:`dsa_per_image`
draws an independent transform for every image instead, as the DSA code does when it
trains networks on synthetic data (``DiffAugment`` without a seed).

Strategies: :data:`DSA_STRATEGY` (``"color_crop_cutout_flip_scale_rotate"``) is DSA's
default. Digits are not mirror-symmetric (a mirrored 2, 3 or 7 is no digit), so for MNIST,
USPS and the other digit sets use :data:`DSA_STRATEGY_DIGITS`
(``"color_crop_cutout_scale_rotate"``), the default of the distillation methods of this
package (:func:`udd_jax.supervised.dc.distill_dc`,
:func:`udd_jax.supervised.dm.distill_dm`).

Examples:
  >>> import jax, jax.numpy as jnp
  >>> real, syn = jnp.ones((8, 12, 12, 1)), jnp.zeros((2, 12, 12, 1))
  >>> key = jax.random.key(0)
  >>> dsa(real, key).shape, dsa(syn, key).shape
  ((8, 12, 12, 1), (2, 12, 12, 1))
  >>> bool(jnp.all(dsa(real, key)[:2] == dsa(real[:2], key)))  # Siamese: same transform
  True
"""

from __future__ import annotations

import functools
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, PRNGKeyArray

from udd_jax import _validation

OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")
"""Every DSA operation, in the order ``mode="all"`` applies them."""

DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"
"""DSA's default strategy (natural images)."""

DSA_STRATEGY_DIGITS = "color_crop_cutout_scale_rotate"
"""DSA without ``flip``, for digits (MNIST, USPS, ...), which mirroring does not preserve."""

MODES = ("single", "all")

# The DSA code's ParamDiffAug ranges.
PROB_FLIP = 0.5
RATIO_SCALE = 1.2
RATIO_ROTATE = 15.0  # degrees
RATIO_CROP_PAD = 0.125
RATIO_CUTOUT = 0.5
BRIGHTNESS = 1.0
SATURATION = 2.0
CONTRAST = 0.5


class DSAParams(NamedTuple):
  """One sampled DSA transform, independent of the image size (a pytree of scalars and pairs).

  Attributes:
    active: ``(len(OPS),)`` booleans: which operations apply, in :data:`OPS` order.
    brightness: added to every pixel.
    saturation: factor on each pixel's deviation from its channel mean.
    contrast: factor on each pixel's deviation from its image mean.
    crop: ``(2,)`` uniforms in ``[0, 1)`` that pick the ``(row, column)`` translation among
      the ``2 s + 1`` integers in ``[-s, s]``, ``s = round(0.125 * side)``; 0.5 is no shift.
    cutout: ``(2,)`` uniforms in ``[0, 1)`` that pick the ``(row, column)`` centre of the
      cut-out square among the DSA code's integer offsets.
    flip: mirror left-right.
    scale: ``(2,)`` factors ``(s_x, s_y)`` of the sampling grid (> 1 shrinks the content).
    rotate: angle in radians (the sampling grid is rotated by it).
  """

  active: Bool[Array, " ops"]
  brightness: Float[Array, ""]
  saturation: Float[Array, ""]
  contrast: Float[Array, ""]
  crop: Float[Array, "2"]
  cutout: Float[Array, "2"]
  flip: Bool[Array, ""]
  scale: Float[Array, "2"]
  rotate: Float[Array, ""]


def parse_strategy(strategy: str) -> tuple[str, ...]:
  """The operations of a strategy string such as ``"color_crop_cutout_flip_scale_rotate"``.

  Raises:
    TypeError: ``strategy`` is not a string.
    ValueError: empty, an unknown operation, or an operation named twice.

  Examples:
    >>> parse_strategy("crop_flip")
    ('crop', 'flip')
  """
  if not isinstance(strategy, str):
    raise TypeError(f"strategy must be a string such as {DSA_STRATEGY!r}; got {type(strategy).__name__}.")
  ops = tuple(strategy.split("_"))
  if strategy == "" or any(op not in OPS for op in ops):
    raise ValueError(f"unknown DSA strategy {strategy!r}: it must join operations of {list(OPS)} with '_'.")
  if len(set(ops)) != len(ops):
    raise ValueError(f"DSA strategy {strategy!r} names an operation twice.")
  return ops


def identity_dsa_params(dtype=jnp.float32) -> DSAParams:
  """Neutral values for every operation, with no operation active.

  Activating any operation but ``cutout`` (which has no neutral value) keeps the identity,
  which the tests use to check that every operation is exact at its neutral value.
  """
  zero, one = jnp.zeros((), dtype), jnp.ones((), dtype)
  return DSAParams(
      active=jnp.zeros(len(OPS), bool),
      brightness=zero,
      saturation=one,
      contrast=one,
      crop=jnp.full(2, 0.5, dtype),
      cutout=jnp.full(2, 0.5, dtype),
      flip=jnp.zeros((), bool),
      scale=jnp.ones(2, dtype),
      rotate=zero,
  )


@functools.partial(jax.jit, static_argnames=("strategy", "mode"))
def sample_dsa_params(
    key: PRNGKeyArray, strategy: str = DSA_STRATEGY, *, mode: Literal["single", "all"] = "single"
) -> DSAParams:
  """Draws one DSA transform with the DSA code's distributions.

  Pure and traceable: ``key`` may be a tracer (``jit``, ``vmap`` over keys); the strategy
  and mode are static.

  Args:
    key: PRNG key.
    strategy: operations joined by ``'_'`` (see :func:`parse_strategy`).
    mode: ``"single"`` activates one operation of the strategy drawn uniformly (DSA's
      default ``'S'`` mode); ``"all"`` activates all of them (``'M'`` mode).

  Returns:
    The transform's :class:`DSAParams`.

  Examples:
    >>> import jax
    >>> p = sample_dsa_params(jax.random.key(0), "crop_flip", mode="all")
    >>> p.active.tolist()
    [False, True, False, True, False, False]
  """
  ops = parse_strategy(strategy)
  _validation.check_choice(mode, "mode", MODES)
  # One draw of 12 independent uniforms: far fewer PRNG kernels to compile than a split
  # and a draw per field.
  u = jax.random.uniform(key, (12,))
  in_strategy = jnp.array([op in ops for op in OPS])
  if mode == "all":
    active = in_strategy
  else:
    positions = jnp.array([OPS.index(op) for op in ops])
    chosen = positions[jnp.clip(jnp.floor(u[0] * len(ops)).astype(jnp.int32), 0, len(ops) - 1)]
    active = jnp.arange(len(OPS)) == chosen
  return DSAParams(
      active=active,
      brightness=(u[1] - 0.5) * BRIGHTNESS,
      saturation=u[2] * SATURATION,
      contrast=u[3] + CONTRAST,
      crop=u[4:6],
      cutout=u[6:8],
      flip=u[8] < PROB_FLIP,
      scale=u[9:11] * (RATIO_SCALE - 1.0 / RATIO_SCALE) + 1.0 / RATIO_SCALE,
      rotate=(u[11] - 0.5) * 2.0 * math.radians(RATIO_ROTATE),
  )


def _color(x: jax.Array, p: DSAParams) -> jax.Array:
  x = x + p.brightness
  channel_mean = jnp.mean(x, axis=-1, keepdims=True)
  x = (x - channel_mean) * p.saturation + channel_mean
  image_mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  return (x - image_mean) * p.contrast + image_mean


def _uniform_to_int(u: jax.Array, low: int, n: int) -> jax.Array:
  """The integer ``low + floor(u n)`` (uniform on ``low .. low + n - 1`` for uniform ``u``)."""
  return low + jnp.clip(jnp.floor(u * n).astype(jnp.int32), 0, n - 1)


def _crop(x: jax.Array, p: DSAParams) -> jax.Array:
  _, h, w, _ = x.shape
  sh, sw = int(h * RATIO_CROP_PAD + 0.5), int(w * RATIO_CROP_PAD + 0.5)
  dy = _uniform_to_int(p.crop[0], -sh, 2 * sh + 1)
  dx = _uniform_to_int(p.crop[1], -sw, 2 * sw + 1)
  # out[i, j] = x[i + dy, j + dx], zero outside: a window of the zero-padded image.
  padded = jnp.pad(x, ((0, 0), (sh, sh), (sw, sw), (0, 0)))
  zero = jnp.zeros((), jnp.int32)
  return jax.lax.dynamic_slice(padded, (zero, sh + dy, sw + dx, zero), x.shape)


def _cutout(x: jax.Array, p: DSAParams) -> jax.Array:
  _, h, w, _ = x.shape
  ch, cw = int(h * RATIO_CUTOUT + 0.5), int(w * RATIO_CUTOUT + 0.5)
  # The DSA code's offsets: randint(0, side + 1 - size % 2); the square starts size // 2 before.
  top = _uniform_to_int(p.cutout[0], 0, h + 1 - ch % 2) - ch // 2
  left = _uniform_to_int(p.cutout[1], 0, w + 1 - cw % 2) - cw // 2
  rows = jnp.arange(h)
  cols = jnp.arange(w)
  in_rows = (rows >= top) & (rows < top + ch)
  in_cols = (cols >= left) & (cols < left + cw)
  mask = 1.0 - (in_rows[:, None] & in_cols[None, :]).astype(x.dtype)
  return x * mask[None, :, :, None]


def _flip(x: jax.Array, p: DSAParams) -> jax.Array:
  return jnp.where(p.flip, x[:, :, ::-1, :], x)


def _affine(x: jax.Array, theta: jax.Array) -> jax.Array:
  """``grid_sample(x, affine_grid(theta))`` with bilinear interpolation, zero padding and
  ``align_corners=False``; ``theta`` is the ``(2, 2)`` linear map on normalised ``(x, y)``."""
  _, h, w, _ = x.shape
  dtype = x.dtype
  xn = (2.0 * jnp.arange(w, dtype=dtype) + 1.0) / w - 1.0
  yn = (2.0 * jnp.arange(h, dtype=dtype) + 1.0) / h - 1.0
  gx, gy = jnp.meshgrid(xn, yn)  # (h, w) each: column and row coordinates of the output
  theta = theta.astype(dtype)
  sx = theta[0, 0] * gx + theta[0, 1] * gy
  sy = theta[1, 0] * gx + theta[1, 1] * gy
  col = ((sx + 1.0) * w - 1.0) / 2.0
  row = ((sy + 1.0) * h - 1.0) / 2.0
  r0, c0 = jnp.floor(row), jnp.floor(col)
  fr, fc = row - r0, col - c0
  r0, c0 = r0.astype(jnp.int32), c0.astype(jnp.int32)
  out = jnp.zeros_like(x)
  for dr, wr in ((0, 1.0 - fr), (1, fr)):
    for dc, wc in ((0, 1.0 - fc), (1, fc)):
      r, c = r0 + dr, c0 + dc
      inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
      weight = jnp.where(inside, wr * wc, 0.0)
      out = out + x[:, jnp.clip(r, 0, h - 1), jnp.clip(c, 0, w - 1), :] * weight[None, :, :, None]
  return out


def _scale(x: jax.Array, p: DSAParams) -> jax.Array:
  return _affine(x, jnp.diag(p.scale))


def _rotate(x: jax.Array, p: DSAParams) -> jax.Array:
  cos, sin = jnp.cos(p.rotate), jnp.sin(p.rotate)
  return _affine(x, jnp.array([[cos, -sin], [sin, cos]]))


_APPLY = {"color": _color, "crop": _crop, "cutout": _cutout, "flip": _flip, "scale": _scale, "rotate": _rotate}


def _identity(x: jax.Array, p: DSAParams) -> jax.Array:
  return x


def _to_dtype(dtype):
  def cast(a):
    a = jnp.asarray(a)
    return a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a

  return cast


@jax.jit
def dsa_apply(x: Float[Array, "n H W C"], params: DSAParams) -> Float[Array, "n H W C"]:
  """Applies the transform ``params`` to every image of the batch ``x``.

  Every active operation is applied in :data:`OPS` order; the result is differentiable
  (and, but for the data-dependent means of ``color``, linear) in ``x``. Pure and traceable.

  Args:
    x: images ``(n, H, W, C)``.
    params: a transform from :func:`sample_dsa_params` (or built by hand).

  Returns:
    The augmented images, same shape and dtype as ``x``.
  """
  return _apply_ops(x, params, OPS)


def _apply_ops(x: jax.Array, params: DSAParams, ops: tuple[str, ...]) -> jax.Array:
  """:func:`dsa_apply` restricted to ``ops`` (the others must be inactive): a strategy's
  transform compiles only its own operations."""
  x = jnp.asarray(x)
  if x.ndim != 4:
    raise ValueError(f"x must be images of shape (n, H, W, C); got shape {x.shape}.")
  if not isinstance(params, DSAParams):
    raise TypeError(f"params must be DSAParams (from sample_dsa_params); got {type(params).__name__}.")
  # Parameters drawn in float64 (x64 mode) must not promote float32 images.
  params = jax.tree.map(_to_dtype(x.dtype), params)
  for i, op in enumerate(OPS):
    if op in ops:
      x = jax.lax.cond(params.active[i], _APPLY[op], _identity, x, params)
  return x


@functools.partial(jax.jit, static_argnames=("strategy", "mode"))
def dsa(
    x: Float[Array, "n H W C"], key: PRNGKeyArray, strategy: str = DSA_STRATEGY, *,
    mode: Literal["single", "all"] = "single",
) -> Float[Array, "n H W C"]:
  """Siamese DSA: one transform drawn from ``key``, applied to the whole batch.

  ``dsa(real, key)`` and ``dsa(syn, key)`` transform both batches identically.

  Args:
    x: images ``(n, H, W, C)``.
    key: PRNG key of the transform.
    strategy: operations joined by ``'_'``.
    mode: ``"single"`` (one operation per call, DSA's default) or ``"all"``.

  Returns:
    ``dsa_apply(x, sample_dsa_params(key, strategy, mode=mode))``.
  """
  return _apply_ops(x, sample_dsa_params(key, strategy, mode=mode), parse_strategy(strategy))


@functools.partial(jax.jit, static_argnames=("strategy", "mode"))
def dsa_per_image(
    x: Float[ArrayLike, "n H W C"], key: PRNGKeyArray, strategy: str = DSA_STRATEGY, *,
    mode: Literal["single", "all"] = "single",
) -> Float[Array, "n H W C"]:
  """DSA with an independent transform for every image (for training networks on a set).

  Every image also draws its own operation in ``"single"`` mode (the DSA code's
  non-Siamese call draws one operation per batch and per-image parameters for it).

  Its signature ``(x, key)`` (with the strategy bound by ``functools.partial``) fits the
  ``augment`` argument of :func:`udd_jax.supervised.train.evaluate_synset`.
  """
  x = jnp.asarray(x)
  keys = jax.random.split(key, x.shape[0])
  return jax.vmap(lambda xi, k: dsa(xi[None], k, strategy, mode=mode)[0])(x, keys)
