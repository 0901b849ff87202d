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
  (2, 2048)
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree, Scalar

from udd_jax import _validation

NETWORKS = ("convnet", "mlp", "lenet")
LENET_MIN_SIZE = 12
GREY_PADDING = 3  # the first convolution's padding on one-channel inputs (the authors' ConvNet)


class _Classifier(nn.Module):
  """A network whose logits are a ``classifier`` layer on its ``embed`` features."""

  def __call__(self, x: Float[Array, "n H W C"]) -> Float[Array, "n classes"]:
    return self.classifier(self.embed(x))


class ConvNet(_Classifier):
  """The ConvNet of DC/DSA/DM/MTT: ``depth`` blocks of [3x3 conv (``width`` channels),
  instance norm, ReLU, 2x2 average pooling], then one linear layer.

  As in the authors' code (DC/DSA/DM's ``networks.py``), the first convolution pads a
  one-channel input by 3 pixels instead of 1: MNIST's 28x28 becomes 32x32, then 16, 8 and
  4 after the poolings (``width x 4 x 4`` features), where padding 1 would give 14, 7 and 3
  and drop the last row and column at the third pooling (docs/SUPERVISED.md, "Parity").
  """

  n_classes: int
  width: int = 128
  depth: int = 3

  def setup(self):
    self.convs = [nn.Conv(self.width, (3, 3), padding=1) for _ in range(self.depth)]
    # Instance norm: statistics per image and channel over H x W. flax's InstanceNorm gives the
    # values of GroupNorm(group_size=1) and the same parameters, with a backward pass twice as
    # fast on XLA:CPU (docs/BENCHMARKS.md (t)).
    self.norms = [nn.InstanceNorm(epsilon=1e-5) for _ in range(self.depth)]
    self.classifier = nn.Dense(self.n_classes)

  def embed(self, x: Float[Array, "n H W C"]) -> Float[Array, "n f"]:
    if x.shape[-1] == 1:  # with the conv's own padding of 1: padding 3, as the authors' ConvNet on grey images
      x = jnp.pad(x, ((0, 0), (GREY_PADDING - 1,) * 2, (GREY_PADDING - 1,) * 2, (0, 0)))
    for conv, norm in zip(self.convs, self.norms):
      x = nn.avg_pool(nn.relu(norm(conv(x))), (2, 2), strides=(2, 2))
    return x.reshape(x.shape[0], -1)


class MLP(_Classifier):
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


class LeNet(_Classifier):
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


def init_params(network: nn.Module, key: PRNGKeyArray, image_shape: tuple[int, ...]) -> PyTree:
  """Fresh parameters of ``network`` for images of ``image_shape`` (in JAX's default float dtype).

  The params depend only on the key and the input shape, never on input values, so the
  outer gradient never flows through an init.
  """
  params = network.init(key, jnp.zeros((1, *image_shape)))["params"]
  return jax.tree.map(lambda p: p.astype(jnp.result_type(float)), params)


def cross_entropy(
    network: nn.Module,
    params: PyTree,
    images: Float[Array, "n H W C"],
    labels: Int[Array, " n"],
) -> Scalar:
  """Mean softmax cross-entropy of ``network`` with ``params`` on a labelled batch."""
  logits = network.apply({"params": params}, images)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def set_loss(network: nn.Module) -> Callable[..., Scalar]:
  """``loss(params, (images, labels)[, idx])``: the cross-entropy on a set, or on its rows ``idx``.

  The loss DD, MTT and GTN train their networks with through
  :func:`udd_jax.training.unroll` (``theta`` the set, ``xs`` the mini-batch indices).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from udd_jax.training import unroll
    >>> net = MLP(n_classes=2, width=4)
    >>> x, y = jnp.ones((4, 3, 3, 1)), jnp.array([0, 1, 0, 1])
    >>> p0 = net.init(jax.random.key(0), x)["params"]
    >>> p = unroll(set_loss(net), p0, (x, y), jnp.full((5,), 0.1), xs=jnp.array([[0, 1]] * 5))
    >>> bool(cross_entropy(net, p, x, y) < cross_entropy(net, p0, x, y))
    True
  """

  def loss(params: PyTree, data: tuple[Array, Array], idx: Array | None = None) -> Scalar:
    images, labels = data
    if idx is not None:
      images, labels = images[idx], labels[idx]
    return cross_entropy(network, params, images, labels)

  return loss
