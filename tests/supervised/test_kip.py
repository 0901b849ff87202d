"""KIP: the KRR loss at its closed-form optima, its gradients, the training step, and distill_kip end to end."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import udd_jax
from udd_jax.supervised import base
from udd_jax.supervised.kernels import get_kernel
from udd_jax.supervised.kip import KipState, distill_kip, kip_accuracy, kip_init, kip_step
from udd_jax.supervised.krr import centred_one_hot, kip_loss, krr_predict
from udd_jax.supervised.zca import kip_preprocessing
from udd_jax.supervised.result import SupervisedResult

KERNEL_NAMES = ["fc", "conv"]


def images(key, n, size=4, channels=1):
  return jax.random.normal(jax.random.key(key), (n, size, size, channels))


def small_kernel(name):
  return get_kernel(name, depth=2, kind="ntk")


# ---------------------------------------------------------------------------
# The loss at closed-form optima.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_krr_on_the_support_set_reproduces_its_labels(name):
  x_s = images(0, 6)
  y_s = jax.random.normal(jax.random.key(1), (6, 3))
  kernel_fn = small_kernel(name)
  loss = jax.jit(functools.partial(kip_loss, kernel_fn=kernel_fn))
  assert float(loss(x_s, y_s, x_s, y_s, reg=1e-12)) < 1e-14
  np.testing.assert_allclose(krr_predict(x_s, y_s, x_s, kernel_fn, reg=1e-12), y_s, atol=1e-6)
  # Ridge shrinks the fit: the same check with a large reg has a clearly positive loss.
  assert float(loss(x_s, y_s, x_s, y_s, reg=0.5)) > 1e-3


def test_loss_matches_a_hand_computation():
  x_s, x_t = images(2, 3), images(3, 5)
  y_s, y_t = jax.random.normal(jax.random.key(4), (3, 2)), jax.random.normal(jax.random.key(5), (5, 2))
  kernel_fn = small_kernel("fc")
  k_ss, k_ts = (np.asarray(k) for k in jax.jit(lambda: (kernel_fn(x_s, x_s), kernel_fn(x_t, x_s)))())
  ridge = 0.01 * np.trace(k_ss) / 3
  pred = k_ts @ np.linalg.inv(k_ss + ridge * np.eye(3)) @ np.asarray(y_s)
  expected = 0.5 * np.mean((pred - np.asarray(y_t)) ** 2)
  assert float(jax.jit(functools.partial(kip_loss, kernel_fn=kernel_fn, reg=0.01))(x_s, y_s, x_t, y_t)) == pytest.approx(expected, rel=1e-8)


def test_label_gradient_vanishes_at_the_least_squares_labels(name="fc"):
  x_s, x_t = images(6, 4), images(7, 12)
  y_t = centred_one_hot(jnp.arange(12) % 3, 3)
  kernel_fn = small_kernel(name)
  k_ss, k_ts = (np.asarray(k) for k in jax.jit(lambda: (kernel_fn(x_s, x_s), kernel_fn(x_t, x_s)))())
  reg = 1e-3
  a = k_ts @ np.linalg.inv(k_ss + reg * np.trace(k_ss) / 4 * np.eye(4))
  y_star = np.linalg.lstsq(a, np.asarray(y_t), rcond=None)[0]
  grad_fn = jax.jit(jax.grad(lambda y: kip_loss(x_s, y, x_t, y_t, kernel_fn=kernel_fn, reg=reg)))
  grad_at_optimum = np.asarray(grad_fn(jnp.asarray(y_star)))
  y_off = y_star + 0.1 * np.asarray(jax.random.normal(jax.random.key(8), y_star.shape))
  grad_off = np.asarray(grad_fn(jnp.asarray(y_off)))
  # The closed-form gradient of 0.5 mean((A y - y_t)^2) is A^T (A y - y_t) / (n_t C).
  # (K_ss + ridge) has a condition number near 1e3 here, so agreement is to about 1e-6.
  scale = np.abs(grad_off).max()
  np.testing.assert_allclose(grad_off, a.T @ (a @ y_off - np.asarray(y_t)) / y_t.size, rtol=1e-5, atol=1e-6 * scale)
  assert np.abs(grad_at_optimum).max() < 1e-6 * scale, (np.abs(grad_at_optimum).max(), scale)
  assert scale > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_loss_gradient_wrt_support_images_matches_finite_differences(name):
  x_s, x_t = images(9, 3), images(10, 5)
  y_s, y_t = centred_one_hot(jnp.array([0, 1, 1]), 2), centred_one_hot(jnp.array([0, 1, 0, 1, 1]), 2)
  loss = jax.jit(functools.partial(kip_loss, x_target=x_t, y_target=y_t, kernel_fn=small_kernel(name), reg=1e-3))
  check_grads(loss, (x_s, y_s), order=1, modes=["rev"], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------
# The training step.
# ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("learn_labels", [True, False])
def test_kip_step_is_adam_on_the_loss_lowers_it_and_compiles_once(learn_labels):
  x_s, x_t = images(11, 4), images(12, 20)
  y_t = centred_one_hot(jnp.arange(20) % 2, 2)
  lr = 0.05
  optimizer = optax.adam(lr)
  state = kip_init(x_s, centred_one_hot(jnp.array([0, 0, 1, 1]), 2), optimizer, learn_labels=learn_labels)
  kernel_fn = small_kernel("fc")
  step = functools.partial(kip_step, kernel_fn=kernel_fn, optimizer=optimizer, reg=1e-6, learn_labels=learn_labels)
  traces = []

  def traced_step(state, x, y):
    traces.append(1)
    return step(state, x, y)

  jitted = jax.jit(traced_step)
  new_state, first_loss = jitted(state, x_t, y_t)
  # Oracle: the loss and its gradients, and Adam's first update -lr * g / (|g| + eps) (bias corrections cancel).
  loss_fn = jax.jit(functools.partial(kip_loss, x_target=x_t, y_target=y_t, kernel_fn=kernel_fn, reg=1e-6))
  g_images, g_labels = jax.grad(loss_fn, argnums=(0, 1))(state.images, state.labels)
  assert float(first_loss) == pytest.approx(float(loss_fn(state.images, state.labels)), rel=1e-10)
  np.testing.assert_allclose(new_state.images, state.images - lr * g_images / (jnp.abs(g_images) + 1e-8), rtol=1e-6, atol=1e-9)
  if learn_labels:
    np.testing.assert_allclose(new_state.labels, state.labels - lr * g_labels / (jnp.abs(g_labels) + 1e-8), rtol=1e-6, atol=1e-9)
  else:
    np.testing.assert_array_equal(new_state.labels, state.labels)
  assert isinstance(new_state, KipState)
  losses = [float(first_loss)]
  for _ in range(20):
    new_state, loss = jitted(new_state, x_t, y_t)
    losses.append(float(loss))
  assert len(traces) == 1
  assert losses[-1] < 0.9 * losses[0]


# ---------------------------------------------------------------------------
# distill_kip end to end.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_digits():
  """Digits 5 and 9 of the offline 8x8 digits data, standardised: one real image per class does badly."""
  (x, y), (x_test, y_test) = udd_jax.load_dataset("digits")
  keep, keep_test = np.isin(y, [5, 9]), np.isin(y_test, [5, 9])
  x, y, x_test, y_test = x[keep], (y[keep] == 9).astype(np.int32), x_test[keep_test], (y_test[keep_test] == 9).astype(np.int32)
  mean, std = x.mean(), x.std()
  return ((x - mean) / std)[..., None], y, ((x_test - mean) / std)[..., None], y_test


def test_kip_raises_krr_test_accuracy_over_its_initial_support_set(two_digits):
  x, y, x_test, y_test = two_digits
  options = dict(ipc=1, seed=jax.random.key(0), kernel="fc", batch_target=100)
  # Adam moves each pixel by about lr per step, so lr=1e-9 leaves the initial real images in place.
  initial = distill_kip(x, y, iterations=1, lr=1e-9, **options)
  result = distill_kip(x, y, iterations=100, lr=0.01, **options)
  np.testing.assert_allclose(initial.labels, [[0.5, -0.5], [-0.5, 0.5]], atol=1e-8)
  before = kip_accuracy(initial, (x_test, y_test))
  after = kip_accuracy(result, (x_test, y_test))
  assert after > max(before + 0.1, 0.9), (before, after)
  losses = [r["loss"] for r in result.history]
  assert np.mean(losses[-3:]) < 0.5 * losses[0]


def test_result_config_history_and_callback():
  x = np.concatenate([np.asarray(images(13, 6, size=3)), np.asarray(images(14, 6, size=3)) + 1.0])
  y = np.repeat([0, 1], 6)
  calls = []
  result = distill_kip(
      x, y, ipc=2, seed=0, kernel="conv", depth=1, iterations=7, log_every=3, learn_labels=False, callback=lambda i, r: calls.append((i, r["loss"]))
  )
  assert isinstance(result, SupervisedResult)
  assert result.images.shape == (4, 3, 3, 1) and result.images.dtype == np.float32
  np.testing.assert_array_equal(result.labels, [[0.5, -0.5]] * 2 + [[-0.5, 0.5]] * 2)  # labels not learned
  assert result.labels.dtype == np.float32
  assert [i for i, _ in calls] == [0, 3, 6]
  assert [r["iteration"] for r in result.history] == [0.0, 3.0, 6.0]
  config = result.config
  assert config["method"] == "kip" and config["ipc"] == 2 and config["iterations"] == 7
  assert config["kernel"] == "conv" and config["kernel_options"] == {"depth": 1, "kind": "ntk", "w_var": 2.0, "b_var": 1e-4, "filter_size": 3,
                                                                 "pooling": "none", "prepend_conv": False}
  assert config["batch_target"] == 12 and config["learn_labels"] is False and config["preprocessing"] == "none"
  assert config["seed"] == np.asarray(jax.random.key_data(jax.random.key(0))).tolist()
  assert config["seconds"] > 0


@pytest.mark.slow
def test_pooled_conv_kernel_is_recorded_and_rebuilt_from_the_config():
  x = np.concatenate([np.asarray(images(21, 6, size=4)), np.asarray(images(22, 6, size=4)) + 1.0])
  y = np.repeat([0, 1], 6)
  result = distill_kip(x, y, ipc=1, seed=0, kernel="conv", depth=1, pooling="avg", prepend_conv=True, iterations=3)
  assert result.config["kernel_options"]["pooling"] == "avg" and result.config["kernel_options"]["prepend_conv"] is True
  losses = [r["loss"] for r in result.history]
  assert np.isfinite(losses).all() and losses[-1] < losses[0]
  # kip_accuracy rebuilds its kernel from the config as get_kernel(kernel, **kernel_options): the pooled one
  # (get_kernel returns one cached object per set of options), not the default unpooled conv kernel.
  pooled = get_kernel("conv", depth=1, kind="ntk", w_var=2.0, b_var=1e-4, filter_size=3, pooling="avg", prepend_conv=True)
  rebuilt = get_kernel(result.config["kernel"], **result.config["kernel_options"])
  assert rebuilt is pooled and rebuilt is not get_kernel("conv", depth=1, kind="ntk", w_var=2.0, b_var=1e-4)
  with pytest.raises(ValueError, match="pooling='avg' and prepend_conv=False need kernel='conv'"):
    distill_kip(x, y, ipc=1, seed=0, kernel="fc", pooling="avg")


def test_same_key_same_result_other_key_or_init_other_result():
  x = np.asarray(images(15, 10, size=3))
  y = np.arange(10) % 2
  a = distill_kip(x, y, ipc=1, seed=5, iterations=4)
  b = distill_kip(x, y, ipc=1, seed=5, iterations=4)
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(a.labels, b.labels)
  assert not np.allclose(distill_kip(x, y, ipc=1, seed=6, iterations=4).images, a.images)
  noise = distill_kip(x, y, ipc=1, seed=5, iterations=4, init="random")
  assert not np.allclose(noise.images, a.images)
  assert noise.config["init"] == "random"


def test_max_seconds_stops_early():
  x = np.asarray(images(16, 10, size=3))
  result = distill_kip(x, np.arange(10) % 2, ipc=1, seed=0, iterations=10_000, max_seconds=1e-3)
  assert 1 <= result.config["iterations"] < 10_000
  assert result.history[-1]["iteration"] == result.config["iterations"] - 1


def test_krr_predict_in_blocks_equals_one_block():
  x_s, x_q = images(17, 5), images(18, 11)
  y_s = jax.random.normal(jax.random.key(19), (5, 3))
  kernel_fn = small_kernel("fc")
  np.testing.assert_allclose(krr_predict(x_s, y_s, x_q, kernel_fn, block_size=4), krr_predict(x_s, y_s, x_q, kernel_fn, block_size=100), rtol=1e-12)


# ---------------------------------------------------------------------------
# Preprocessing.
# ---------------------------------------------------------------------------


def test_kip_preprocessing_normalises_each_image_then_whitens():
  x = np.random.default_rng(0).uniform(size=(200, 3, 3)) * np.linspace(0.5, 2.0, 9).reshape(3, 3)
  prep = kip_preprocessing(x, zca_reg=0.1)
  z = prep.apply(x).reshape(200, -1).astype(np.float64)
  # Reference: per-image centring and unit norm, then the regularised ZCA of their covariance.
  flat = x.reshape(200, -1)
  flat = flat - flat.mean(axis=1, keepdims=True)
  flat = flat / np.linalg.norm(flat, axis=1, keepdims=True)
  centred = flat - flat.mean(axis=0)
  eigvals, eigvecs = np.linalg.eigh(centred.T @ centred / 200)
  eigvals = np.clip(eigvals, 0, None)
  shrunk = eigvals / (eigvals + 0.1 * eigvals.mean())
  np.testing.assert_allclose(np.cov(z.T, bias=True), (eigvecs * shrunk) @ eigvecs.T, atol=1e-5)
  assert prep.apply(x).shape == x.shape
  assert prep.config() == {"method": "kip_zca", "zca_reg": 0.1, "layer_norm": True, "centred": True}
  result = distill_kip(prep.apply(x)[:20], np.arange(20) % 2, ipc=1, seed=0, iterations=2, preprocessing=prep)
  assert result.config["preprocessing"]["zca_reg"] == 0.1


# ---------------------------------------------------------------------------
# Argument checks.
# ---------------------------------------------------------------------------


def test_bad_arguments_are_named():
  x = np.asarray(images(20, 6, size=3))
  y = np.arange(6) % 2
  with pytest.raises(ValueError, match="ipc must be a positive integer"):
    distill_kip(x, y, ipc=0, seed=0)
  with pytest.raises(ValueError, match="unknown kernel 'rbf'"):
    distill_kip(x, y, ipc=1, seed=0, kernel="rbf")
  with pytest.raises(ValueError, match="unknown init 'zeros'"):
    distill_kip(x, y, ipc=1, seed=0, init="zeros")
  with pytest.raises(ValueError, match="ipc=4 exceeds the examples of class"):
    distill_kip(x, y, ipc=4, seed=0)
  with pytest.raises(ValueError, match=r"no example of class\(es\) \[1\]"):
    distill_kip(x, np.array([0, 0, 0, 2, 2, 2]), ipc=1, seed=0)
  with pytest.raises(ValueError, match="y has 5 labels but the inputs have 6 rows"):
    distill_kip(x, y[:5], ipc=1, seed=0)
  with pytest.raises(ValueError, match="x contains 1 non-finite"):
    distill_kip(np.where(np.arange(x.size).reshape(x.shape) == 0, np.nan, x), y, ipc=1, seed=0)
  with pytest.raises(ValueError, match="batch_target must be at least the number of classes"):
    distill_kip(x, y, ipc=1, seed=0, batch_target=1)
  with pytest.raises(TypeError, match="seed must be a PRNG key"):
    distill_kip(x, y, ipc=1, seed="seed")
  with pytest.raises(TypeError, match="preprocessing must be"):
    distill_kip(x, y, ipc=1, seed=0, preprocessing="zca")
  with pytest.raises(ValueError, match="x must be images"):
    distill_kip(x.reshape(6, -1), y, ipc=1, seed=0)
  result = SupervisedResult(x[:2], np.eye(2) - 0.5, {"kernel": "fc", "kernel_options": {"depth": 1}})
  with pytest.raises(ValueError, match=r"test x must have the distilled images' shape \(n, 3, 3, 1\)"):
    kip_accuracy(result, (np.ones((2, 4, 4, 1)), np.array([0, 1])))
  with pytest.raises(ValueError, match="test y has label 2 but the distilled labels cover 2 classes"):
    kip_accuracy(result, (x[:3], np.array([0, 1, 2])))
  with pytest.raises(ValueError, match="equal n_classes"):
    kip_loss(x[:2], jnp.ones((2, 2)), x, jnp.ones((6, 3)), kernel_fn=small_kernel("fc"))
  assert base.INITS == ("real", "random")
