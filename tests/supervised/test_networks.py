"""The ConvNet against a by-hand forward pass: the authors' padding of grey inputs, instance norm, pooling."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from udd_jax.supervised import networks


def by_hand_embed(params, x, *, depth):
  """DC/DSA/DM's ConvNet ``embed`` written out: the first conv pads a one-channel input by 3, the others by 1."""
  for d in range(depth):
    pad = 3 if d == 0 and x.shape[-1] == 1 else 1
    conv = params[f"convs_{d}"]
    x = jax.lax.conv_general_dilated(x, conv["kernel"], (1, 1), [(pad, pad), (pad, pad)],
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + conv["bias"]
    mean = x.mean(axis=(1, 2), keepdims=True)
    var = x.var(axis=(1, 2), keepdims=True)
    norm = params[f"norms_{d}"]
    x = jnp.maximum((x - mean) / jnp.sqrt(var + 1e-5) * norm["scale"] + norm["bias"], 0.0)
    n, h, w, c = x.shape
    x = x[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
  return x.reshape(x.shape[0], -1)


@pytest.mark.parametrize("shape, features", [((28, 28, 1), 4 * 4), ((28, 28, 3), 3 * 3), ((16, 16, 1), 2 * 2)])
def test_convnet_embed_matches_the_authors_layout(shape, features):
  net = networks.get_network("convnet", 10, width=4)
  x = jax.random.normal(jax.random.key(0), (2, *shape))
  params = net.init(jax.random.key(1), x)["params"]
  # Non-trivial norm parameters, so that the check covers them.
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)
  got = net.apply({"params": params}, x, method="embed")
  assert got.shape == (2, 4 * features)
  np.testing.assert_allclose(got, by_hand_embed(params, x, depth=3), rtol=1e-4, atol=1e-5)


def test_convnet_gradients_match_the_by_hand_network_in_float64():
  """The instance norm's backward pass too: input and parameter gradients against the written-out network."""
  net = networks.get_network("convnet", 10, width=4)
  x = jax.random.normal(jax.random.key(0), (3, 12, 12, 1), jnp.float64)
  params = net.init(jax.random.key(1), x)["params"]  # flax initialises in float32
  params = jax.tree.map(lambda p: p.astype(jnp.float64) + 0.1 * jax.random.normal(jax.random.key(2), p.shape, jnp.float64),
                        params)
  weights = jax.random.normal(jax.random.key(3), (3, 4 * 2 * 2), jnp.float64)

  def ours(p, x):
    return jnp.sum(weights * net.apply({"params": p}, x, method="embed"))

  def theirs(p, x):
    return jnp.sum(weights * by_hand_embed(p, x, depth=3))

  got, want = jax.grad(ours, argnums=(0, 1))(params, x), jax.grad(theirs, argnums=(0, 1))(params, x)
  chex.assert_trees_all_close(got, want, rtol=1e-9, atol=1e-12)


def test_convnet_forward_mode_and_second_derivatives_match_the_by_hand_network_in_float64():
  """Forward mode, and DC's gradient of a parameter-gradient match, against the written-out network."""
  net = networks.get_network("convnet", 10, width=4)
  x = jax.random.normal(jax.random.key(0), (3, 12, 12, 1), jnp.float64)
  params = net.init(jax.random.key(1), x)["params"]
  params = jax.tree.map(lambda p: p.astype(jnp.float64) + 0.1 * jax.random.normal(jax.random.key(2), p.shape, jnp.float64),
                        params)
  labels = jnp.arange(3)
  tangent_x = jax.random.normal(jax.random.key(4), x.shape, jnp.float64)
  tangent_p = jax.tree.map(lambda p: jax.random.normal(jax.random.key(5), p.shape, jnp.float64), params)

  def logits(embed):
    return lambda p, x: embed(p, x) @ jnp.ones((16, 10), jnp.float64) * jnp.arange(10.0)

  ours = logits(lambda p, x: net.apply({"params": p}, x, method="embed"))
  theirs = logits(lambda p, x: by_hand_embed(p, x, depth=3))
  got = jax.jvp(ours, (params, x), (tangent_p, tangent_x))
  want = jax.jvp(theirs, (params, x), (tangent_p, tangent_x))
  chex.assert_trees_all_close(got, want, rtol=1e-9, atol=1e-12)

  def matching(fn):  # DC: the images' gradient of a distance between parameter gradients
    def loss(p, x):
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(fn(p, x), labels))
    target = jax.grad(loss)(params, x[::-1])
    return jax.grad(lambda x: sum(jnp.sum((a - b) ** 2) for a, b in zip(
        jax.tree.leaves(jax.grad(loss)(params, x)), jax.tree.leaves(target))))(x)

  chex.assert_trees_all_close(matching(ours), matching(theirs), rtol=1e-8, atol=1e-12)
  assert float(jnp.abs(matching(ours)).max()) > 1e-6  # the check is not of zeros
