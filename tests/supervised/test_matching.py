"""DC / DSA: the gradient distance against hand computations, the Siamese loss, the schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from udd_jax.supervised import augment, dc, gradient_matching, image_updates, labelled, networks

from .images import blob_images

CENTERS = ((2, 2), (5, 5))  # one blob per class on an 8x8 image


def blobs(n_per_class, seed, noise=0.3):
  """2 classes of 8x8 grey images: a Gaussian blob at a class-specific place, plus noise."""
  return blob_images(CENTERS, n_per_class, seed, noise)


NET = networks.get_network("convnet", 2, width=4, depth=1)
# distill_dc compiles one program per configuration (seconds on CPU): the runs share few.
CONV = dict(network="convnet", width=4, depth=1, batch_real=8)
TINY = dict(network="mlp", width=8, batch_real=8)
distance = jax.jit(gradient_matching.match_distance, static_argnames="eps")


def hand_distance(a, b, eps=1e-6):
  """DC's distance_wb for one flax kernel, with a Python loop over output channels."""
  a, b = np.asarray(a), np.asarray(b)
  total = 0.0
  for i in range(a.shape[-1]):
    u, v = a[..., i].ravel(), b[..., i].ravel()
    total += 1 - u @ v / (np.linalg.norm(u) * np.linalg.norm(v) + eps)
  return total


def test_distance_matches_a_hand_computation():
  rng = np.random.default_rng(0)
  real = {"conv": {"kernel": rng.normal(size=(3, 3, 2, 4)), "bias": rng.normal(size=4)}, "dense": {"kernel": rng.normal(size=(5, 3))}}
  syn = jax.tree.map(lambda g: g + rng.normal(size=g.shape), real)
  expect = hand_distance(real["conv"]["kernel"], syn["conv"]["kernel"]) + hand_distance(real["dense"]["kernel"], syn["dense"]["kernel"])
  np.testing.assert_allclose(distance(real, syn), expect, rtol=1e-12)
  # Channels are flax's last (output) axis; grouping by the first (input) axis differs.
  by_input = hand_distance(real["dense"]["kernel"].T, syn["dense"]["kernel"].T)
  assert abs(distance(real["dense"], syn["dense"]) - by_input) > 1e-2


def test_distance_is_zero_for_equal_and_twice_the_channels_for_opposite_gradients():
  g = {
      "conv": jax.random.normal(jax.random.key(0), (3, 3, 1, 4)),
      "dense": jax.random.normal(jax.random.key(1), (6, 2)),
      "bias": jnp.ones(2),
  }
  np.testing.assert_allclose(distance(g, g, eps=0.0), 0.0, atol=1e-12)
  opposite = jax.tree.map(lambda a: -a, g)
  np.testing.assert_allclose(distance(g, opposite, eps=0.0), 2 * (4 + 2), atol=1e-12)
  # Only the direction matters, and biases never count.
  scaled = jax.tree.map(lambda a: 3.0 * a, g) | {"bias": -g["bias"]}
  np.testing.assert_allclose(distance(g, scaled, eps=0.0), 0.0, atol=1e-12)
  # DC's eps = 1e-6 in the denominator leaves sum_i eps / (|g_i|^2 + eps) for equal gradients.
  sq = [np.sum(np.asarray(g[k]).reshape(-1, g[k].shape[-1]) ** 2, 0) for k in ("conv", "dense")]
  np.testing.assert_allclose(distance(g, g), sum(np.sum(1e-6 / (q + 1e-6)) for q in sq), rtol=1e-6)


def test_distance_gradients_are_right_and_finite_at_a_dead_channel():
  rng = np.random.default_rng(1)
  real = {"kernel": jnp.asarray(rng.normal(size=(2, 2, 1, 3)))}
  syn = {"kernel": jnp.asarray(rng.normal(size=(2, 2, 1, 3)))}
  check_grads(lambda s: distance(real, s), (syn,), order=1, modes=["rev"])
  dead = {"kernel": syn["kernel"].at[..., 0].set(0.0)}
  g = jax.grad(lambda s: distance(real, s))(dead)["kernel"]
  assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g[..., 1:]).sum()) > 0


def test_distance_rejects_mismatched_gradients():
  with pytest.raises(ValueError, match="structure"):
    gradient_matching.match_distance({"a": jnp.ones((2, 2))}, {"b": jnp.ones((2, 2))})
  with pytest.raises(ValueError, match="shape"):
    gradient_matching.match_distance({"a": jnp.ones((2, 2))}, {"a": jnp.ones((2, 3))})


@pytest.fixture(scope="module")
def batches():
  x, y = blobs(6, seed=0)
  real = jnp.asarray(x.reshape(2, 6, 8, 8, 1))
  params = jax.tree.map(lambda p: p.astype(jnp.float64), jax.jit(NET.init)(jax.random.key(0), real[0])["params"])
  return real, params


def test_dc_loss_is_the_class_sum_of_distances(batches):
  real, params = batches
  syn = real[:, :2] + 0.5
  grad = jax.jit(jax.grad(lambda p, x, c: networks.cross_entropy(NET, p, x, jnp.full(x.shape[0], c))))
  expect = sum(float(distance(grad(params, real[c], c), grad(params, syn[c], c))) for c in range(2))
  np.testing.assert_allclose(jax.jit(gradient_matching.dc_loss, static_argnums=0)(NET, params, real, syn), expect, rtol=1e-9)


def test_dsa_loss_uses_one_transform_for_both_batches(batches):
  real, params = batches
  strategy = "crop_rotate"

  @jax.jit
  def losses(keys, other_keys):
    aug = jax.vmap(lambda b, k: augment.dsa(b, k, strategy, mode="all"))
    return (
        gradient_matching.dc_loss(NET, params, real, real, aug_keys=keys, dsa_strategy=strategy),
        gradient_matching.dc_loss(NET, params, real, -real, aug_keys=keys, dsa_strategy=strategy),
        gradient_matching.dc_loss(NET, params, aug(real, keys), aug(real, other_keys)),
    )

  shared, other_images, independent = losses(jax.random.split(jax.random.key(3), 2), jax.random.split(jax.random.key(4), 2))
  # The synthetic set *is* the real batch: one shared transform keeps the gradients equal
  # (up to DC's eps in the cosine's denominator) ...
  assert float(shared) < 1e-3
  # ... where other images, or the same images transformed independently, do not match.
  assert float(other_images) > 0.1 and float(independent) > 0.1


@pytest.mark.parametrize("dsa", [False, True])
def test_unrolled_and_mapped_class_loops_agree_in_value_and_gradient(batches, dsa):
  real, params = batches
  syn = real[:, :2] + 0.5
  aug_keys, strategy = (jax.random.split(jax.random.key(5), 2), "crop_rotate") if dsa else (None, "crop_rotate")
  grad = jax.grad(lambda p, x, c: networks.cross_entropy(NET, p, x, jnp.full(x.shape[0], c)))

  def one_class(real_c, syn_c, label):
    return distance(jax.lax.stop_gradient(grad(params, real_c, label)), grad(params, syn_c, label))

  def total(syn, loop):
    return image_updates.sum_over_classes(one_class, real, syn, aug_keys, strategy, loop=loop)

  unrolled = jax.jit(jax.value_and_grad(lambda s: total(s, "unroll")))(syn)
  mapped = jax.jit(jax.value_and_grad(lambda s: total(s, "map")))(syn)
  assert float(unrolled[0]) > 0.1 and float(jnp.max(jnp.abs(unrolled[1]))) > 0
  np.testing.assert_allclose(mapped[0], unrolled[0], rtol=1e-10)
  np.testing.assert_allclose(mapped[1], unrolled[1], rtol=1e-8, atol=1e-12)
  with pytest.raises(ValueError, match="loop"):
    total(syn, "vmap")


def test_class_batches_are_balanced_and_distinct():
  y = np.array([1, 0, 1, 1, 0, 1, 1, 1, 2])
  x = (y * 10 + np.arange(9))[:, None, None, None].astype(np.float64)  # value encodes (class, row)
  data = labelled.class_data(x, y, 3)
  sample = jax.jit(labelled.sample_class_batches, static_argnames="batch")
  out = np.asarray(sample(data, jax.random.key(0), batch=4))[..., 0, 0, 0]
  assert out.shape == (3, 4)
  np.testing.assert_array_equal(out // 10, np.arange(3)[:, None] * np.ones((1, 4)))  # every row of its class
  assert len(set(out[1])) == 4  # class 1 has 6 images: drawn without replacement
  assert set(out[0]) <= {1, 4} and set(out[2]) == {28}  # short classes: with replacement


@pytest.mark.slow
def test_dc_decreases_the_matching_loss_and_moves_the_images():
  x, y = blobs(20, seed=1)
  res = dc.distill_dc(x, y, ipc=2, seed=0, iterations=30, init="random", image_lr=0.5, outer_loop=2, inner_loop=2, **CONV)
  assert res.images.shape == (4, 8, 8, 1) and res.labels.tolist() == [0, 0, 1, 1]
  assert res.config["method"] == "dc" and res.config["iterations"] == 30 and len(res.history) == 30
  losses = np.array([h["loss"] for h in res.history])
  assert losses[-10:].mean() < 0.8 * losses[:5].mean()
  # Same seed, one iteration: the images keep moving after it.
  first = dc.distill_dc(x, y, ipc=2, seed=0, iterations=1, init="random", image_lr=0.5, outer_loop=2, inner_loop=2, **CONV)
  assert np.abs(res.images - first.images).max() > 0.1


def test_same_seed_same_result_and_no_recompilation():
  x, y = blobs(20, seed=2)  # the shapes and options of the test above: its compilation is reused
  runs = [dc.distill_dc(x, y, ipc=2, seed=7, iterations=3, outer_loop=2, inner_loop=2, **CONV) for _ in range(2)]
  np.testing.assert_array_equal(runs[0].images, runs[1].images)
  steps = (dc._fresh_params, dc._dc_match_step, dc._dc_train_step)
  sizes = [f._cache_size() for f in steps]
  other = dc.distill_dc(x, y, ipc=2, seed=8, iterations=4, outer_loop=2, inner_loop=2, image_lr=0.3, **CONV)
  assert [f._cache_size() for f in steps] == sizes
  assert not np.allclose(other.images, runs[0].images)


def test_dsa_runs_and_records_its_options():
  x, y = blobs(10, seed=3)
  seen = []
  res = dc.distill_dc(
      x, y, ipc=1, seed=1, iterations=3, dsa=True, dsa_strategy="crop", callback=lambda i, r: seen.append(i), **TINY
  )
  assert res.config["method"] == "dsa" and res.config["dsa_strategy"] == "crop"
  assert (res.config["outer_loop"], res.config["inner_loop"]) == (1, 1) and seen == [1, 2, 3]
  assert np.all(np.isfinite(res.images)) and all(np.isfinite(h["loss"]) for h in res.history)


def test_bad_arguments_are_rejected():
  x, y = blobs(4, seed=0)
  with pytest.raises(ValueError, match="ipc"):
    dc.distill_dc(x, y, ipc=0, seed=0)
  with pytest.raises(ValueError, match="outer_loop"):
    dc.distill_dc(x, y, ipc=3, seed=0)
  with pytest.raises(ValueError, match="init"):
    dc.distill_dc(x, y, ipc=1, seed=0, init="zeros")
  with pytest.raises(ValueError, match="network"):
    dc.distill_dc(x, y, ipc=1, seed=0, network="resnet")
  with pytest.raises(ValueError, match="DSA strategy"):
    dc.distill_dc(x, y, ipc=1, seed=0, dsa=True, dsa_strategy="blur")
  with pytest.raises(ValueError, match="non-finite"):
    dc.distill_dc(np.where(x > 1, np.nan, x), y, ipc=1, seed=0)
  with pytest.raises(ValueError, match="class 1 has 0"):
    dc.distill_dc(x, np.where(y == 1, 2, y), ipc=1, seed=0)
