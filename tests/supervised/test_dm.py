"""DM: the mean-embedding loss against a hand computation, its zero, its gradient, the run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from udd_jax.supervised import dm, networks

from .images import blob_images

CENTERS = ((2, 2), (5, 5))  # one blob per class on an 8x8 image


def blobs(n_per_class, seed, noise=0.3):
  """2 classes of 8x8 grey images: a Gaussian blob at a class-specific place, plus noise."""
  return blob_images(CENTERS, n_per_class, seed, noise)


MLP = networks.get_network("mlp", 2, width=6)
CONVNET = networks.get_network("convnet", 2, width=4, depth=1)
# One distill_dm configuration for every run below: one compilation (seconds on CPU).
RUN = dict(network="convnet", width=4, depth=1, batch_real=8, dsa_strategy="crop")


@pytest.fixture(scope="module")
def real():
  x, _ = blobs(5, seed=0)
  return jnp.asarray(x.reshape(2, 5, 8, 8, 1))


def float64_params(net, x):
  return jax.tree.map(lambda p: p.astype(jnp.float64), jax.jit(net.init)(jax.random.key(0), x)["params"])


def test_loss_matches_a_hand_computation(real):
  params = float64_params(MLP, real[0])
  syn = real[:, :2] * 0.5 + 0.1

  def embed(x):  # the MLP's two hidden ReLU layers, by hand
    h = np.asarray(x).reshape(x.shape[0], -1)
    for layer in ("hidden_0", "hidden_1"):
      h = np.maximum(h @ np.asarray(params[layer]["kernel"]) + np.asarray(params[layer]["bias"]), 0)
    return h

  expect = sum(np.sum((embed(real[c]).mean(0) - embed(syn[c]).mean(0)) ** 2) for c in range(2))
  loss = jax.jit(dm.dm_loss, static_argnums=0)
  np.testing.assert_allclose(loss(MLP, params, real, syn), expect, rtol=1e-10)
  check_grads(lambda s: dm.dm_loss(MLP, params, real, s), (syn,), order=1, modes=["rev"])


@pytest.mark.slow
def test_loss_is_zero_when_the_synthetic_set_is_the_real_batch(real):
  params = float64_params(CONVNET, real[0])

  @jax.jit
  def losses(syn, keys):
    return dm.dm_loss(CONVNET, params, real, syn), dm.dm_loss(CONVNET, params, real, syn, aug_keys=keys, dsa_strategy="crop_scale")

  keys = jax.random.split(jax.random.key(1), 2)
  plain, augmented = losses(real, keys)
  assert float(plain) < 1e-20 and float(augmented) < 1e-20  # the same network and transform
  plain, augmented = losses(real + 0.3 * jax.random.normal(jax.random.key(2), real.shape), keys)
  assert float(plain) > 1e-4 and float(augmented) > 1e-4


@pytest.mark.slow
def test_dm_decreases_the_loss_and_moves_the_images():
  x, y = blobs(20, seed=1)
  res = dm.distill_dm(x, y, ipc=2, seed=0, iterations=40, init="random", **RUN)
  assert res.images.shape == (4, 8, 8, 1) and res.labels.tolist() == [0, 0, 1, 1]
  assert res.config["method"] == "dm" and res.config["dsa_strategy"] == "crop" and res.config["iterations"] == 40
  losses = np.array([h["loss"] for h in res.history])
  assert losses[-10:].mean() < 0.5 * losses[:3].mean()
  first = dm.distill_dm(x, y, ipc=2, seed=0, iterations=1, init="random", **RUN)
  assert np.abs(res.images - first.images).max() > 0.1


def test_same_seed_same_result_and_no_recompilation():
  x, y = blobs(20, seed=2)
  runs = [dm.distill_dm(x, y, ipc=2, seed=3, iterations=3, **RUN) for _ in range(2)]
  np.testing.assert_array_equal(runs[0].images, runs[1].images)
  size = dm._dm_step._cache_size()
  seen = []
  other = dm.distill_dm(x, y, ipc=2, seed=4, iterations=4, image_lr=0.5, callback=lambda i, r: seen.append(i), **RUN)
  assert dm._dm_step._cache_size() == size and seen == [1, 2, 3, 4]
  assert not np.allclose(other.images, runs[0].images)


def test_max_seconds_stops_the_run():
  x, y = blobs(20, seed=2)
  res = dm.distill_dm(x, y, ipc=2, seed=3, iterations=1000, max_seconds=1e-9, **RUN)
  assert res.config["iterations"] == 1 and res.config["stopped"] == "max_seconds"


def test_bad_arguments_are_rejected():
  x, y = blobs(4, seed=0)
  with pytest.raises(ValueError, match="ipc"):
    dm.distill_dm(x, y, ipc=-1, seed=0)
  with pytest.raises(TypeError, match="dsa"):
    dm.distill_dm(x, y, ipc=1, seed=0, dsa="yes")
  with pytest.raises(ValueError, match="image_lr"):
    dm.distill_dm(x, y, ipc=1, seed=0, image_lr=0.0)
  with pytest.raises(ValueError, match="rank"):
    dm.distill_dm(x[:, 0, 0, 0], y, ipc=1, seed=0)
  with pytest.raises(ValueError, match="labels"):
    dm.distill_dm(x, y[:-1], ipc=1, seed=0)
