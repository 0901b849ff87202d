"""GTN: the generator and meta-learning through unrolled learner training, on a tiny setting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from udd_jax.supervised import gtn
from udd_jax.supervised.networks import get_network, init_params, set_loss
from udd_jax.training import unroll


def test_generator_maps_noise_and_label_to_images():
  g = gtn.Generator(n_classes=3, image_shape=(8, 8, 1), hidden=16)
  z = jnp.zeros((2, 4))
  params = g.init(jax.random.key(0), z, jnp.array([0, 0]))["params"]
  images = g.apply({"params": params}, z, jnp.array([0, 2]))
  assert images.shape == (2, 8, 8, 1)
  assert not np.allclose(images[0], images[1])  # same noise, different labels
  # Weight-normalised layers: rescaling a direction leaves the output unchanged.
  scaled = jax.tree_util.tree_map_with_path(
      lambda path, p: 3.0 * p if jax.tree_util.keystr(path).endswith("['kernel']") else p, params)
  np.testing.assert_allclose(g.apply({"params": scaled}, z, jnp.array([0, 2])), images, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def gtn_run(digits3):
  x, y = digits3
  return gtn.distill_gtn(
      x, y, ipc=2, seed=0, learner="mlp", width=16, inner_steps=4, n_inits=2, noise_dim=8, hidden=32,
      iterations=40, generator_lr=1e-2, curriculum_lr=1e-2, inner_lr_lr=3e-2, init_inner_lr=0.05, batch_real=128,
  )


@pytest.mark.slow
def test_distill_gtn_reduces_its_meta_loss_and_learns_the_step_size(gtn_run):
  losses = np.array([h["loss"] for h in gtn_run.history])
  assert len(losses) == 40
  assert losses[-5:].mean() < losses[:5].mean() - 0.2, (losses[:5], losses[-5:])
  assert gtn_run.step_sizes.shape == (1,) and gtn_run.step_sizes[0] > 0.06


@pytest.mark.slow
def test_distill_gtn_images_teach_a_fresh_learner(gtn_run, digits3):
  # The shipped images with the shipped step size train a new learner well above chance (1/3).
  r = gtn_run
  assert r.images.shape == (6, 8, 8, 1) and r.labels.tolist() == [0, 0, 1, 1, 2, 2]
  net = get_network("mlp", 3, width=16)
  x, y = digits3
  accuracies = []
  for seed in range(3):
    params = unroll(set_loss(net), init_params(net, jax.random.key(100 + seed), (8, 8, 1)),
                    (jnp.asarray(r.images), jnp.asarray(r.labels)), jnp.full((r.config["inner_steps"],), r.step_sizes[0]))
    accuracies.append(float((net.apply({"params": params}, jnp.asarray(x)).argmax(-1) == y).mean()))
  assert min(accuracies) > 0.6, accuracies


def test_distill_gtn_config(gtn_run):
  c = gtn_run.config
  assert (c["method"], c["network"], c["ipc"], c["inner_steps"], c["iterations"], c["stopped"]) == (
      "gtn", "mlp", 2, 4, 40, "iterations")
  assert c["noise_dim"] == 8 and c["hidden"] == 32 and c["seed"] == 0


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(ipc=0), ValueError, "ipc"),
        (dict(learner="vgg"), ValueError, "network"),
        (dict(inner_steps=0), ValueError, "inner_steps"),
        (dict(noise_dim=2.0), TypeError, "noise_dim"),
        (dict(generator_lr=float("nan")), ValueError, "generator_lr"),
        (dict(max_seconds=0), ValueError, "max_seconds"),
    ],
)
def test_distill_gtn_rejects_bad_arguments(digits3, change, error, match):
  x, y = digits3
  with pytest.raises(error, match=match):
    gtn.distill_gtn(x, y, **(dict(ipc=1, seed=0, learner="mlp", iterations=1) | change))
