"""Infinite-width kernels: Monte-Carlo agreement with wide random networks, PSD, hand values, gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from udd_jax.supervised import kernels
from udd_jax.supervised.kernels import conv_kernel, fc_kernel, get_kernel

W_VAR, B_VAR = 2.0, 0.1  # a large bias variance so that the bias terms of the recursions are tested too


def tiny_images(n=4, size=6, channels=2, seed=1):
  x = jax.random.normal(jax.random.key(seed), (n, size, size, channels))
  # Two strongly correlated images, so that the arc-cosine terms are tested away from rho = 0.
  return x.at[1].set(x[0] + 0.3 * x[1])


# ---------------------------------------------------------------------------
# Finite networks in the NTK parameterisation, as Monte-Carlo oracles for the closed forms.
# Narrow networks and many seeds: the estimate's error falls as 1 / sqrt(width * seeds) while
# the finite-width bias is O(1 / width), and narrow networks are cheap. float32 is plenty for
# an estimate whose standard error is about 1%.
# ---------------------------------------------------------------------------


def fc_net(key, d, width, depth):
  dims = [d] + [width] * depth + [1]
  keys = jax.random.split(key, 2 * len(dims))
  normal = functools.partial(jax.random.normal, dtype=jnp.float32)
  return [(normal(keys[2 * i], (a, b)), normal(keys[2 * i + 1], (b,))) for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))]


def conv_net(key, channels, width, depth, size, filter_size=3):
  """Convolutions as matrices acting on flattened patches (``patches``), weights ``(filter_size^2 C_in, width)``."""
  keys = jax.random.split(key, 2 * depth + 2)
  normal = functools.partial(jax.random.normal, dtype=jnp.float32)
  convs, c_in = [], channels
  for i in range(depth):
    convs.append((normal(keys[2 * i], (filter_size * filter_size * c_in, width)), normal(keys[2 * i + 1], (width,))))
    c_in = width
  return convs, (normal(keys[-2], (size * size * width,)), normal(keys[-1], ()))


def patches(h, filter_size=3):
  """The SAME-padded ``filter_size`` x ``filter_size`` neighbourhood of every position, channels last."""
  lo = (filter_size - 1) // 2
  height, width = h.shape[1:3]
  padded = jnp.pad(h, ((0, 0), (lo, filter_size - 1 - lo), (lo, filter_size - 1 - lo), (0, 0)))
  return jnp.concatenate([padded[:, i : i + height, j : j + width] for i in range(filter_size) for j in range(filter_size)], axis=-1)


def dense(h, w, b):
  return jnp.sqrt(W_VAR / w.shape[0]) * h @ w + jnp.sqrt(B_VAR) * b


def fc_apply(params, x, readout_features=False):
  h = x.reshape(x.shape[0], -1)
  for w, b in params[:-1]:
    h = jax.nn.relu(dense(h, w, b))
  return h if readout_features else dense(h, *params[-1])[:, 0]


def conv_apply(params, x, readout_features=False, pool=False):
  convs, readout = params
  h = x
  for w, b in convs:
    h = jax.nn.relu(dense(patches(h), w, b))
    if pool:  # 2 x 2 average pooling, stride 2
      n, height, width, c = h.shape
      h = h[:, : height // 2 * 2, : width // 2 * 2].reshape(n, height // 2, 2, width // 2, 2, c).mean(axis=(2, 4))
  h = h.reshape(h.shape[0], -1)
  return h if readout_features else dense(h, *readout)


def empirical_kernels(apply, params, x):
  """The NNGP given the last hidden layer (its expectation over the readout) and the exact finite-width NTK."""
  f = apply(params, x, readout_features=True)
  nngp = W_VAR * f @ f.T / f.shape[1] + B_VAR
  jac = jax.jacrev(lambda p: apply(p, x))(params)
  jac = jnp.concatenate([j.reshape(x.shape[0], -1) for j in jax.tree.leaves(jac)], axis=1)
  return nngp, jac @ jac.T


@functools.partial(jax.jit, static_argnames=("make", "apply", "seeds"))
def monte_carlo(x, *, make, apply, seeds):
  keys = jax.random.split(jax.random.key(0), seeds)
  return jax.vmap(lambda k: empirical_kernels(apply, make(k), x.astype(jnp.float32)))(keys)


def assert_close_to_monte_carlo(exact, estimates, tol=0.05):
  exact, estimate = np.asarray(exact), np.asarray(estimates, np.float64).mean(axis=0)
  scale = np.abs(np.diag(exact)).max()
  error = np.abs(exact - estimate).max() / scale
  assert error < tol, f"max |exact - Monte-Carlo| / max diag = {error:.3f}\nexact\n{exact}\nMonte-Carlo\n{estimate}"


@pytest.fixture(scope="module")
def conv_monte_carlo():
  x = tiny_images(size=4, channels=2)
  make = functools.partial(conv_net, channels=2, width=32, depth=2, size=4)
  return x, monte_carlo(x, make=make, apply=conv_apply, seeds=256)


@pytest.mark.slow
def test_fc_kernel_matches_wide_random_networks():
  x = tiny_images(size=4, channels=1)
  make = functools.partial(fc_net, d=16, width=128, depth=2)
  nngp_mc, ntk_mc = monte_carlo(x, make=make, apply=fc_apply, seeds=256)
  assert_close_to_monte_carlo(fc_kernel(x, x, depth=2, kind="nngp", w_var=W_VAR, b_var=B_VAR), nngp_mc)
  assert_close_to_monte_carlo(fc_kernel(x, x, depth=2, kind="ntk", w_var=W_VAR, b_var=B_VAR), ntk_mc)
  with pytest.raises(AssertionError):  # the check can fail: a layer less is far off
    assert_close_to_monte_carlo(fc_kernel(x, x, depth=1, kind="nngp", w_var=W_VAR, b_var=B_VAR), nngp_mc)


@pytest.mark.slow
def test_conv_kernel_matches_wide_random_networks(conv_monte_carlo):
  x, (nngp_mc, ntk_mc) = conv_monte_carlo
  assert_close_to_monte_carlo(conv_kernel(x, x, depth=2, kind="nngp", w_var=W_VAR, b_var=B_VAR), nngp_mc)
  assert_close_to_monte_carlo(conv_kernel(x, x, depth=2, kind="ntk", w_var=W_VAR, b_var=B_VAR), ntk_mc)


@pytest.mark.slow
def test_pooled_conv_kernel_matches_wide_random_pooled_networks():
  x = tiny_images(size=4, channels=2)
  make = functools.partial(conv_net, channels=2, width=32, depth=2, size=1)  # 4 -> 2 -> 1 positions
  nngp_mc, ntk_mc = monte_carlo(x, make=make, apply=functools.partial(conv_apply, pool=True), seeds=256)
  options = dict(depth=2, w_var=W_VAR, b_var=B_VAR, pooling="avg")
  assert_close_to_monte_carlo(conv_kernel(x, x, kind="nngp", **options), nngp_mc)
  assert_close_to_monte_carlo(conv_kernel(x, x, kind="ntk", **options), ntk_mc)
  with pytest.raises(AssertionError):  # the check can fail: the unpooled kernel is far off
    assert_close_to_monte_carlo(conv_kernel(x, x, kind="nngp", depth=2, w_var=W_VAR, b_var=B_VAR), nngp_mc)


def relu_expectations(k12, k11, k22):
  """Cho & Saul's arc-cosine expectations, written out again in numpy (independent of ``kernels._relu``)."""
  norm = np.sqrt(k11 * k22)
  angle = np.arccos(np.clip(k12 / norm, -1.0, 1.0))
  return norm * (np.sin(angle) + (np.pi - angle) * np.cos(angle)) / (2 * np.pi), (np.pi - angle) / (2 * np.pi)


def pooled_kernel_over_all_position_pairs(x, *, depth, kind, prepend_conv, filter_size=3):
  """The pooled ConvNet kernel by brute force: covariances of every position with every position.

  ``K[a, h, w, b, k, l]`` pairs position ``(h, w)`` of image ``a`` with ``(k, l)`` of image ``b``; a
  convolution averages the 3 x 3 taps shifted together on both sides, pooling averages 2 x 2
  windows on both sides, the readout averages equal positions.
  """
  n, lo = x.shape[0], (filter_size - 1) // 2
  hi = filter_size - 1 - lo
  s = np.einsum("ahwc,bklc->ahwbkl", x, x) / x.shape[-1]

  def conv(a):
    size = a.shape[1]
    a = np.pad(a, [(0, 0), (lo, hi), (lo, hi), (0, 0), (lo, hi), (lo, hi)])
    taps = [a[:, i : i + size, j : j + size, :, i : i + size, j : j + size] for i in range(filter_size) for j in range(filter_size)]
    return np.mean(taps, axis=0)

  def pool(a):
    h = a.shape[1] // 2
    a = a[:, : 2 * h, : 2 * h, :, : 2 * h, : 2 * h]
    return a.reshape(n, h, 2, h, 2, n, h, 2, h, 2).mean(axis=(2, 4, 7, 9))

  theta_post = None
  for pooled in [False] * prepend_conv + [True] * depth:
    k = W_VAR * conv(s) + B_VAR
    theta = k if theta_post is None else k + W_VAR * conv(theta_post)
    var = np.einsum("ahwahw->ahw", k)
    t, tdot = relu_expectations(k, var[:, :, :, None, None, None], var[None, None, None])
    s, theta_post = (pool(t), pool(tdot * theta)) if pooled else (t, tdot * theta)
  out = W_VAR * np.einsum("ahwbhw->ab", s) / s.shape[1] ** 2 + B_VAR
  return out if kind == "nngp" else out + W_VAR * np.einsum("ahwbhw->ab", theta_post) / s.shape[1] ** 2


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nngp", "ntk"])
@pytest.mark.parametrize("prepend_conv", [False, True])
def test_pooled_conv_kernel_equals_the_sum_over_all_position_pairs(kind, prepend_conv):
  # 7 x 7 images: the second pooling drops a row and a column (7 -> 3 -> 1), as 28 -> 14 -> 7 -> 3 does.
  x = np.asarray(tiny_images(n=4, size=7, channels=2), np.float64)
  kernel = jax.jit(functools.partial(conv_kernel, depth=2, kind=kind, w_var=W_VAR, b_var=B_VAR, pooling="avg",
                                     prepend_conv=prepend_conv))
  expected = pooled_kernel_over_all_position_pairs(x, depth=2, kind=kind, prepend_conv=prepend_conv)
  np.testing.assert_allclose(kernel(x[:3], x[1:]), expected[:3, 1:], rtol=1e-10)
  unpooled = conv_kernel(x[:3], x[1:], depth=2 + prepend_conv, kind=kind, w_var=W_VAR, b_var=B_VAR)
  assert np.abs(np.asarray(unpooled) - expected[:3, 1:]).max() > 0.01 * np.abs(expected).max()


@pytest.mark.slow
def test_pooled_kernel_gradients_match_finite_differences():
  x1 = jax.random.normal(jax.random.key(7), (2, 4, 4, 1))
  x2 = jax.random.normal(jax.random.key(8), (2, 4, 4, 1))
  kernel = get_kernel("conv", kind="ntk", depth=2, pooling="avg", prepend_conv=True)
  check_grads(jax.jit(kernel), (x1, x2), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("wrong", [dict(depth=2, filter_size=1), dict(depth=1), dict(depth=2, b_var=0.0)])
def test_monte_carlo_check_rejects_nearby_architectures(conv_monte_carlo, wrong):
  x, (nngp_mc, _) = conv_monte_carlo
  options = dict(kind="nngp", w_var=W_VAR, b_var=B_VAR) | wrong
  with pytest.raises(AssertionError):
    assert_close_to_monte_carlo(conv_kernel(x, x, **options), nngp_mc)


# ---------------------------------------------------------------------------
# Closed-form values and structure.
# ---------------------------------------------------------------------------


def test_fc_nngp_by_hand_for_orthogonal_and_parallel_inputs():
  x = jnp.array([[3.0, 0.0], [0.0, 1.0], [6.0, 0.0]])
  k = fc_kernel(x, x, depth=1, kind="nngp", w_var=2.0, b_var=0.0)
  # First layer: K = 2 <x, x'> / 2 = <x, x'>. ReLU of parallel inputs: T = K / 2, so the output is K again;
  # orthogonal inputs: rho = 0, T = sqrt(k11 k22) / (2 pi), output 2 T = sqrt(k11 k22) / pi.
  expected = np.array([[9.0, 3.0 / np.pi, 18.0], [3.0 / np.pi, 1.0, 6.0 / np.pi], [18.0, 6.0 / np.pi, 36.0]])
  np.testing.assert_allclose(k, expected, rtol=1e-12)
  ntk = fc_kernel(x, x, depth=1, kind="ntk", w_var=2.0, b_var=0.0)
  # NTK = K_out + w_var T' K_in with T' = 1/2 (parallel) or 1/4 (orthogonal).
  np.testing.assert_allclose(ntk, expected + 2.0 * np.array([[0.5, 0.25, 0.5], [0.25, 0.5, 0.25], [0.5, 0.25, 0.5]]) * (x @ x.T), rtol=1e-12)


@pytest.mark.slow
def test_conv_kernel_with_1x1_filters_is_the_position_average_of_fc_kernels():
  # With 1x1 filters every position is an FC network on the channel vector and the flatten
  # readout averages over positions: an exact check of the position-diagonal recursion.
  x = tiny_images(n=3, size=3, channels=4)
  positions = x.reshape(3, 9, 4)
  for kind in ("nngp", "ntk"):
    conv = jax.jit(functools.partial(conv_kernel, depth=3, kind=kind, filter_size=1))(x, x)
    per_position = jax.jit(jax.vmap(functools.partial(fc_kernel, depth=3, kind=kind), in_axes=(1, 1)))(positions, positions)
    # Diagonal entries sit at rho = 1, where arccos turns a 1e-16 rounding of rho into 1e-8.
    np.testing.assert_allclose(conv, per_position.mean(axis=0), rtol=1e-7)


@pytest.mark.parametrize("name", ["fc", "conv"])
@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_kernel_matrices_are_symmetric_positive_semidefinite(name, kind):
  x = jax.random.normal(jax.random.key(3), (12, 5, 5, 1))
  x = x.at[5].set(x[4])  # an exact duplicate: the matrix is singular, not indefinite
  k = np.asarray(jax.jit(get_kernel(name, kind=kind, depth=2))(x, x))
  np.testing.assert_allclose(k, k.T, rtol=1e-12)
  eigenvalues = np.linalg.eigvalsh(k)
  assert eigenvalues.min() > -1e-10 * eigenvalues.max()
  assert eigenvalues.min() < 1e-8 * eigenvalues.max()  # the duplicate makes it singular


@pytest.mark.slow
def test_blocked_kernel_equals_the_plain_one_with_gradients():
  x1 = jax.random.normal(jax.random.key(4), (7, 4, 4, 1))
  x2 = jax.random.normal(jax.random.key(5), (5, 4, 4, 1))
  plain = get_kernel("conv", depth=2)
  blocked = get_kernel("conv", depth=2, block_size=3)  # 7 rows: two full blocks and a padded one
  np.testing.assert_allclose(jax.jit(blocked)(x1, x2), jax.jit(plain)(x1, x2), rtol=1e-12)
  weights = jax.random.normal(jax.random.key(6), (7, 5))
  grad = lambda kernel: jax.jit(jax.grad(lambda a: jnp.sum(weights * kernel(a, x2))))(x1)  # noqa: E731
  np.testing.assert_allclose(grad(blocked), grad(plain), rtol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fc", "conv"])
def test_kernel_gradients_match_finite_differences(name):
  x1 = jax.random.normal(jax.random.key(7), (3, 4, 4, 1))
  x2 = jax.random.normal(jax.random.key(8), (2, 4, 4, 1))
  kernel = get_kernel(name, kind="ntk", depth=2)  # the NTK recursion runs through the NNGP one
  check_grads(jax.jit(kernel), (x1, x2), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def fc_diagonal_by_hand(x, depth):
  """The FC NTK of every input with itself: at rho = 1, T = K / 2 and T' = 1 / 2."""
  k = W_VAR * jnp.sum(x.reshape(x.shape[0], -1) ** 2, axis=1) / x[0].size + B_VAR
  ntk = k
  for _ in range(depth):
    k = W_VAR * k / 2 + B_VAR
    ntk = k + W_VAR * ntk / 2
  return ntk


def test_gradient_through_the_diagonal_is_finite_and_exact():
  # K(x, x) has rho = 1 where arccos is not differentiable; the custom JVPs keep the gradient finite and exact.
  x = jax.random.normal(jax.random.key(9), (3, 4, 4, 1))
  kernel = get_kernel("fc", kind="ntk", depth=2, w_var=W_VAR, b_var=B_VAR)
  # rho = 1 - O(1e-16) gives arccos an O(1e-8) error: the diagonal of the closed form is that accurate.
  np.testing.assert_allclose(jnp.diag(jax.jit(kernel)(x, x)), fc_diagonal_by_hand(x, 2), rtol=1e-7)
  grad = jax.jit(jax.grad(lambda a: jnp.trace(kernel(a, a))))(x)
  np.testing.assert_allclose(grad, jax.grad(lambda a: jnp.sum(fc_diagonal_by_hand(a, 2)))(x), rtol=1e-7)
  conv = get_kernel("conv", kind="ntk", depth=2)
  assert np.all(np.isfinite(jax.jit(jax.grad(lambda a: jnp.sum(conv(a, a))))(x)))


def test_zero_images_and_zero_bias_give_zero_kernel_not_nan():
  x = jnp.zeros((2, 3, 3, 1)).at[1].set(1.0)
  k = jax.jit(functools.partial(conv_kernel, depth=2, b_var=0.0))(x, x)
  assert np.all(np.isfinite(k)) and abs(float(k[0, 0])) < 1e-100 and float(k[1, 1]) > 1.0


# ---------------------------------------------------------------------------
# Argument checks.
# ---------------------------------------------------------------------------


def test_bad_arguments_are_named():
  x = jnp.ones((2, 3, 3, 1))
  with pytest.raises(ValueError, match="unknown kind 'gp'"):
    fc_kernel(x, x, depth=1, kind="gp")
  with pytest.raises(ValueError, match="depth must be a positive integer"):
    conv_kernel(x, x, depth=0)
  with pytest.raises(ValueError, match="w_var must be a finite positive number"):
    fc_kernel(x, x, w_var=-1.0)
  with pytest.raises(ValueError, match="same trailing shape"):
    fc_kernel(x, jnp.ones((2, 4, 3, 1)))
  with pytest.raises(ValueError, match="x1 must have rank 4.*as_images"):
    conv_kernel(jnp.ones((2, 3, 3)), jnp.ones((2, 3, 3)))
  with pytest.raises(TypeError, match="x2 must be a floating array"):
    fc_kernel(x, jnp.ones((2, 3, 3, 1), jnp.int32))
  with pytest.raises(ValueError, match="unknown kernel 'rbf'"):
    get_kernel("rbf")
  with pytest.raises(TypeError, match=r"unknown option\(s\) \['filter_size'\]"):
    get_kernel("fc", filter_size=3)
  with pytest.raises(ValueError, match="b_var"):
    get_kernel("conv", b_var=float("nan"))
  with pytest.raises(ValueError, match="unknown pooling 'max'"):
    get_kernel("conv", pooling="max")
  with pytest.raises(ValueError, match=r"halves the images 3 times.*smaller than 8 x 8"):
    conv_kernel(jnp.ones((2, 7, 7, 1)), jnp.ones((2, 7, 7, 1)), pooling="avg")
  with pytest.raises(ValueError, match="prepend_conv=True needs pooling='avg'"):
    conv_kernel(x, x, prepend_conv=True)
  assert kernels.KINDS == ("ntk", "nngp")
