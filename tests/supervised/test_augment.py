"""DSA: Siamese batches, exact operations at hand-made parameters, gradients in the images."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from udd_jax.supervised import augment as A

OP = {op: i for i, op in enumerate(A.OPS)}


def only(op, **values):
  """Identity parameters with just ``op`` active and the given values."""
  p = A.identity_dsa_params(jnp.float64)._replace(active=jnp.arange(len(A.OPS)) == OP[op])
  return p._replace(**{k: jnp.asarray(v) for k, v in values.items()})


@pytest.fixture(scope="module")
def x():
  return jax.random.normal(jax.random.key(0), (5, 8, 8, 2), jnp.float64)


@pytest.mark.parametrize("mode", ["single", "all"])
def test_same_key_same_transform_on_two_batches(x, mode):
  # Every operation acts on each image alone, so the first rows of a transformed batch
  # are what a batch of those rows alone gets if, and only if, the transform is shared.
  changed = 0
  for seed in range(12):
    key = jax.random.key(seed)
    real = A.dsa(x, key, A.DSA_STRATEGY, mode=mode)
    np.testing.assert_array_equal(real[:2], A.dsa(x[:2], key, A.DSA_STRATEGY, mode=mode))
    changed += not np.allclose(real, x)
  assert changed >= 10  # the transforms do something (a flip-free flip draw does not)


def test_inactive_and_neutral_parameters_are_the_identity(x):
  np.testing.assert_array_equal(A.dsa_apply(x, A.identity_dsa_params(jnp.float64)), x)
  neutral = A.identity_dsa_params(jnp.float64)._replace(active=jnp.array([op != "cutout" for op in A.OPS]))
  np.testing.assert_allclose(A.dsa_apply(x, neutral), x, atol=1e-12)


def test_flip_twice_is_the_identity(x):
  p = only("flip", flip=True)
  once = A.dsa_apply(x, p)
  np.testing.assert_array_equal(once, x[:, :, ::-1, :])
  np.testing.assert_array_equal(A.dsa_apply(once, p), x)


def test_rotation_by_90_degrees_is_rot90(x):
  out = A.dsa_apply(x, only("rotate", rotate=math.pi / 2))
  np.testing.assert_allclose(out, jnp.rot90(x, 1, axes=(1, 2)), atol=1e-12)


def test_scale_by_two_samples_the_centre_half():
  img = jnp.arange(16.0).reshape(1, 4, 4, 1)
  out = A.dsa_apply(img, only("scale", scale=[0.5, 0.5]))  # grid shrunk: content enlarged 2x
  # Output pixel (i, j) samples input row/col (i - 1.5) / 2 + 1.5 (align_corners=False).
  coords = (np.arange(4) - 1.5) / 2 + 1.5
  rows, cols = np.meshgrid(coords, coords, indexing="ij")
  lo_r, lo_c = np.floor(rows).astype(int), np.floor(cols).astype(int)
  expect = np.zeros((4, 4))
  base = np.arange(16.0).reshape(4, 4)
  for dr in (0, 1):
    for dc in (0, 1):
      w = (1 - abs(rows - lo_r - dr)) * (1 - abs(cols - lo_c - dc))
      expect += w * base[lo_r + dr, lo_c + dc]
  np.testing.assert_allclose(out[0, :, :, 0], expect, atol=1e-12)


def test_crop_translates_with_zero_padding():
  img = jnp.arange(64.0).reshape(1, 8, 8, 1) + 1
  # shift s = round(0.125 * 8) = 1: u = 0.99 picks +1, u = 0 picks -1.
  out = A.dsa_apply(img, only("crop", crop=[0.99, 0.0]))[0, :, :, 0]
  base = np.asarray(img[0, :, :, 0])
  expect = np.zeros((8, 8))
  expect[:7, 1:] = base[1:, :7]
  np.testing.assert_array_equal(out, expect)


def test_cutout_zeroes_a_square_of_half_the_side():
  out = A.dsa_apply(jnp.ones((2, 8, 8, 3)), only("cutout", cutout=[0.5, 0.5]))
  # offsets = floor(0.5 * 9) = 4, square of side 4 starting at 4 - 2 = 2.
  expect = np.ones((8, 8))
  expect[2:6, 2:6] = 0
  np.testing.assert_array_equal(out, np.broadcast_to(expect[None, :, :, None], (2, 8, 8, 3)))


def test_color_matches_the_dsa_formulas(x):
  b, s, c = 0.3, 1.7, 0.8
  out = A.dsa_apply(x, only("color", brightness=b, saturation=s, contrast=c))
  ref = np.asarray(x) + b
  m = ref.mean(axis=-1, keepdims=True)
  ref = (ref - m) * s + m
  m = ref.mean(axis=(1, 2, 3), keepdims=True)
  np.testing.assert_allclose(out, (ref - m) * c + m, atol=1e-12)


def test_gradients_in_x_match_finite_differences(x):
  params = A.sample_dsa_params(jax.random.key(3), A.DSA_STRATEGY, mode="all")
  # Non-integer geometric parameters, so bilinear sampling is exercised away from the grid.
  params = params._replace(rotate=jnp.asarray(0.2), scale=jnp.asarray([1.1, 0.9]), flip=jnp.asarray(True))
  check_grads(lambda v: A.dsa_apply(v, params), (x[:2],), order=1, modes=["rev"])


def test_sampled_parameters_follow_the_dsa_ranges():
  keys = jax.random.split(jax.random.key(0), 400)
  p = jax.vmap(lambda k: A.sample_dsa_params(k, A.DSA_STRATEGY_DIGITS))(keys)
  active = np.asarray(p.active)
  np.testing.assert_array_equal(active.sum(1), 1)  # one operation per call
  assert not active[:, OP["flip"]].any()  # not in the digits strategy
  assert all(active[:, OP[op]].mean() > 0.1 for op in A.parse_strategy(A.DSA_STRATEGY_DIGITS))
  assert np.all((p.scale >= 1 / 1.2) & (p.scale <= 1.2))
  assert np.all(np.abs(p.rotate) <= math.radians(15)) and np.abs(p.rotate).max() > math.radians(14)
  assert np.all((p.contrast >= 0.5) & (p.contrast <= 1.5)) and np.all(np.abs(p.brightness) <= 0.5)
  assert 0.4 < float(np.mean(p.flip)) < 0.6
  all_mode = A.sample_dsa_params(jax.random.key(0), "crop_rotate", mode="all")
  np.testing.assert_array_equal(all_mode.active, [op in ("crop", "rotate") for op in A.OPS])


def test_per_image_transforms_are_independent():
  x = jnp.broadcast_to(jax.random.normal(jax.random.key(1), (1, 8, 8, 1), jnp.float64), (6, 8, 8, 1))
  key = jax.random.key(2)
  out = A.dsa_per_image(x, key, A.DSA_STRATEGY, mode="all")
  keys = jax.random.split(key, 6)
  for i in range(6):
    np.testing.assert_allclose(out[i], A.dsa(x[i : i + 1], keys[i], A.DSA_STRATEGY, mode="all")[0], atol=1e-12)
  assert not np.allclose(out[0], out[1])


def test_bad_arguments_are_rejected(x):
  with pytest.raises(ValueError, match="unknown DSA strategy"):
    A.sample_dsa_params(jax.random.key(0), "crop_blur")
  with pytest.raises(ValueError, match="twice"):
    A.parse_strategy("crop_crop")
  with pytest.raises(TypeError, match="strategy"):
    A.parse_strategy(None)
  with pytest.raises(ValueError, match="mode"):
    A.sample_dsa_params(jax.random.key(0), mode="some")
  with pytest.raises(ValueError, match=r"\(n, H, W, C\)"):
    A.dsa(x[0], jax.random.key(0))
