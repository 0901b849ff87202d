"""Networks of the supervised distillation literature, in flax: ConvNet, MLP, LeNet.

Every network maps images ``(n, H, W, C)`` to logits ``(n, n_classes)`` and has an
``embed`` method giving the features before the final linear layer (what distribution
matching compares). No batch statistics: ``apply`` is a pure function of
``{"params": params}`` and the input, so networks can be ``vmap``-ped over inits.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> net = get_network("convnet", n_classes=10)
  >>> x = jnp.zeros((2, 28, 28, 1))
  >>> params = net.init(jax.random.key(0), x)["params"]
  >>> net.apply({"params": params}, x).shape
  (2, 10)
  >>> net.apply({"params": params}, x, method="embed").shape
  (2, 1152)
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from udd_jax import _validation

NETWORKS = ("convnet", "mlp", "lenet")
LENET_MIN_SIZE = 12


class ConvNet(nn.Module):
  """The ConvNet of DC/DSA/DM/MTT: ``depth`` blocks of [3x3 conv (``width`` channels),
  instance norm, ReLU, 2x2 average pooling], then one linear layer."""

  n_classes: int
  width: int = 128
  depth: int = 3

  def setup(self):
    self.convs = [nn.Conv(self.width, (3, 3), padding=1) for _ in range(self.depth)]
    # Instance norm: one group per channel, statistics over each image's H x W.
    self.norms = [nn.GroupNorm(num_groups=None, group_size=1, epsilon=1e-5) for _ in range(self.depth)]
    self.classifier = nn.Dense(self.n_classes)

  def embed(self, x: Float[Array, "n H W C"]) -> Float[Array, "n f"]:
    for conv, norm in zip(self.convs, self.norms):
      x = nn.avg_pool(nn.relu(norm(conv(x))), (2, 2), strides=(2, 2))
    return x.reshape(x.shape[0], -1)

  def __call__(self, x: Float[Array, "n H W C"]) -> Float[Array, "n classes"]:
    return self.classifier(self.embed(x))


class MLP(nn.Module):
  """Two hidden layers of ``width`` ReLU units on the flattened image."""

  n_classes: int
  width: int = 128

  def setup(self):
    self.hidden = [nn.Dense(self.width), nn.Dense(self.width)]
    self.classifier = nn.Dense(self.n_classes)

  def embed(self, x: Float[Array, "n H W C"]) -> Float[Array, "n f"]:
    x = x.reshape(x.shape[0], -1)
    for layer in self.hidden:
      x = nn.relu(layer(x))
    return x

  def __call__(self, x: Float[Array, "n H W C"]) -> Float[Array, "n classes"]:
    return self.classifier(self.embed(x))


class LeNet(nn.Module):
  """LeNet-5 as in DC's code: conv 6@5x5 (padding 2 on 28x28 inputs), ReLU, max pool,
  conv 16@5x5, ReLU, max pool, dense 120, ReLU, dense 84, ReLU, dense n_classes."""

  n_classes: int

  def setup(self):
    self.conv1 = nn.Conv(6, (5, 5), padding=2)
    self.conv2 = nn.Conv(16, (5, 5), padding=0)
    self.dense = [nn.Dense(120), nn.Dense(84)]
    self.classifier = nn.Dense(self.n_classes)

  def embed(self, x: Float[Array, "n H W C"]) -> Float[Array, "n f"]:
    if min(x.shape[1:3]) < LENET_MIN_SIZE:
      raise ValueError(f"LeNet needs images of at least {LENET_MIN_SIZE}x{LENET_MIN_SIZE} pixels (two 2x2 poolings around "
                       f"a 5x5 valid convolution); got {x.shape[1]}x{x.shape[2]}. Use the convnet or the mlp.")
    x = nn.max_pool(nn.relu(self.conv1(x)), (2, 2), strides=(2, 2))
    x = nn.max_pool(nn.relu(self.conv2(x)), (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    for layer in self.dense:
      x = nn.relu(layer(x))
    return x

  def __call__(self, x: Float[Array, "n H W C"]) -> Float[Array, "n classes"]:
    return self.classifier(self.embed(x))


def get_network(name: str, n_classes: int, *, width: int = 128, depth: int = 3) -> nn.Module:
  """The network called ``name`` (``"convnet"``, ``"mlp"``, ``"lenet"``) with ``n_classes`` outputs.

  ``width`` is the ConvNet's channels / the MLP's hidden units; ``depth`` the ConvNet's blocks.
  """
  _validation.check_choice(name, "network", NETWORKS)
  n_classes = _validation.check_positive_int(n_classes, "n_classes")
  width = _validation.check_positive_int(width, "width")
  depth = _validation.check_positive_int(depth, "depth")
  if name == "convnet":
    return ConvNet(n_classes, width=width, depth=depth)
  if name == "mlp":
    return MLP(n_classes, width=width)
  return LeNet(n_classes)


def as_images(x: Float[Array, "n ..."]) -> Float[Array, "n H W C"]:
  """``(n, H, W)`` grey images (as ``udd_jax.load_dataset`` returns them) to ``(n, H, W, 1)``."""
  x = jnp.asarray(x)
  return x[..., None] if x.ndim == 3 else x
