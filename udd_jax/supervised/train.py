"""DC-BENCH evaluation: train networks from scratch on a (distilled) set, test on real data.

The schedule is the one DC, DSA and DM evaluate with: SGD with momentum 0.9 and weight
decay 5e-4, learning rate 0.01 divided by 10 half-way, mini-batches of 256 reshuffled every
epoch, 300 epochs. Integer labels train with softmax cross-entropy; float label vectors
(learned labels, KIP) with the mean squared error on the logits, as KIP trains its networks.

A training run is, on the CPU, a host loop over one jitted SGD step (compiled once per
network, set size and schedule), far faster there for ConvNets than one ``lax.scan`` over the
whole run; on GPU and TPU it is that one ``lax.scan``, with no dispatch per step (the ``loop``
option, :func:`udd_jax.training.resolve_loop`). Runs follow one another with the same
compiled code, and both loops take the same steps.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> x = jnp.concatenate([jnp.zeros((4, 8, 8, 1)), jnp.ones((4, 8, 8, 1))])
  >>> y = jnp.array([0] * 4 + [1] * 4)
  >>> report = evaluate_synset(x, y, (x, y), network="mlp", runs=2, seed=jax.random.key(0), epochs=20)
  >>> report["accuracies"]
  [1.0, 1.0]
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from typing import Any, TypedDict, Unpack

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import ArrayLike, Float, Int, PRNGKeyArray, PyTree

from udd_jax import _validation
from udd_jax.supervised.base import as_key, as_keys
from udd_jax.supervised.networks import NETWORKS, get_network
from udd_jax.training import loops

Augment = Callable[[jax.Array, jax.Array], jax.Array]
LR_DECAY = 0.1
TEST_CHUNK = 500  # test images per forward pass: 10k MNIST images at once would not fit


def eval_optimizer(
    *, lr: float | jax.Array, momentum: float | jax.Array, weight_decay: float | jax.Array, epochs: int, steps_per_epoch: int
) -> optax.GradientTransformation:
  """SGD with momentum and weight decay, learning rate ``lr`` times 0.1 from epoch ``epochs // 2`` on.

  Weight decay is added to the gradient before the momentum, as ``torch.optim.SGD`` does
  in the reference implementations. ``lr``, ``momentum`` and ``weight_decay`` may be traced,
  so that changing them does not recompile.

  Args:
    lr: initial learning rate.
    momentum: heavy-ball momentum.
    weight_decay: L2 coefficient added to the gradient.
    epochs: total epochs of training.
    steps_per_epoch: mini-batches per epoch (the schedule counts steps).

  Returns:
    The optax transformation.

  Examples:
    >>> import jax.numpy as jnp
    >>> tx = eval_optimizer(lr=0.1, momentum=0.0, weight_decay=0.0, epochs=4, steps_per_epoch=1)
    >>> state = tx.init(jnp.zeros(1))
    >>> for _ in range(3):
    ...   updates, state = tx.update(jnp.ones(1), state, jnp.zeros(1))
    ...   print(f"{float(updates[0]):.3f}")
    -0.100
    -0.100
    -0.010
  """
  return optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.sgd(eval_lr_schedule(lr, epochs=epochs, steps_per_epoch=steps_per_epoch), momentum=momentum),
  )


def eval_lr_schedule(lr: float | jax.Array, *, epochs: int, steps_per_epoch: int) -> optax.Schedule:
  """The step-indexed learning rate of :func:`eval_optimizer`: ``lr``, then ``0.1 * lr`` from epoch ``epochs // 2``."""
  return optax.piecewise_constant_schedule(lr, {(epochs // 2) * steps_per_epoch: LR_DECAY})


def _loss(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
  if labels.ndim == 2:  # learned label vectors: regression on the logits
    per_example = jnp.mean(jnp.square(logits - labels), axis=-1)
  else:
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return jnp.sum(weights * per_example) / jnp.sum(weights)


@functools.partial(jax.jit, static_argnames=("network",))
def _init(key: jax.Array, example: jax.Array, *, network: nn.Module) -> tuple[PyTree, jax.Array]:
  """A fresh init in the images' precision (float64 tests then train in float64) and the run's data key."""
  k_init, k_data = jax.random.split(key)
  params = network.init(k_init, example)["params"]
  return jax.tree.map(lambda p: p.astype(example.dtype), params), k_data


def _batches(k_data: jax.Array, epoch: jax.Array, *, n: int, batch: int, steps_per_epoch: int):
  """The epoch's mini-batch indices ``(steps, batch)`` (a fresh permutation, padded) and augmentation keys."""
  k_perm, k_aug = jax.random.split(jax.random.fold_in(k_data, epoch))
  padding = steps_per_epoch * batch - n
  order = jnp.concatenate([jax.random.permutation(k_perm, n), jnp.zeros(padding, jnp.int32)])
  return order.reshape(steps_per_epoch, batch), jax.random.split(k_aug, steps_per_epoch)


_epoch_batches = jax.jit(_batches, static_argnames=("n", "batch", "steps_per_epoch"))

_STATIC = ("network", "epochs", "steps_per_epoch", "augment")


def _sgd_step(params, opt_state, images, labels, idx, weights, k_aug, hyper, *, network, epochs, steps_per_epoch,
              augment):
  """One SGD step on the mini-batch ``images[idx]`` (padding rows have weight 0)."""
  tx = eval_optimizer(epochs=epochs, steps_per_epoch=steps_per_epoch, **hyper)
  x = images[idx]
  if augment is not None:
    x = augment(x, k_aug)
  grads = jax.grad(lambda p: _loss(network.apply({"params": p}, x), labels[idx], weights))(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


_train_step = jax.jit(_sgd_step, static_argnames=_STATIC, donate_argnums=(0, 1))


@functools.partial(jax.jit, static_argnames=(*_STATIC, "n", "batch"), donate_argnums=(0, 1))
def _train_scan(params, opt_state, images, labels, weights, k_data, hyper, *, network, epochs, steps_per_epoch, augment,
                n, batch):
  """The whole run as one ``lax.scan`` over epochs of a ``lax.scan`` over their steps; returns ``(params, opt_state)``."""
  static = dict(network=network, epochs=epochs, steps_per_epoch=steps_per_epoch, augment=augment)

  def epoch_body(carry, epoch):
    order, aug_keys = _batches(k_data, epoch, n=n, batch=batch, steps_per_epoch=steps_per_epoch)

    def step_body(carry, xs):
      idx, w, k_aug = xs
      return _sgd_step(*carry, images, labels, idx, w, k_aug, hyper, **static), None

    return jax.lax.scan(step_body, carry, (order, weights, aug_keys))[0], None

  return jax.lax.scan(epoch_body, (params, opt_state), jnp.arange(epochs))[0]


def _train_one(key, images, labels, hyper, *, network, epochs, batch_size, augment, loop) -> PyTree:
  """One training run from the init drawn from ``key``, by the resolved ``loop`` (``"host"`` or ``"scan"``).

  ``"host"`` loops over epochs and mini-batches on the host around one jitted step: XLA:CPU
  runs convolutions inside ``scan``/``while`` bodies an order of magnitude slower than as a
  jitted step of their own (jax-ml/jax#12868; docs/BENCHMARKS.md (g)), and a ConvNet step
  is long enough that the dispatch costs nothing in comparison. ``"scan"`` compiles the run
  into one ``lax.scan``, the fast choice on GPU and TPU, where per-step dispatch is the cost.
  """
  n = images.shape[0]
  batch = min(batch_size, n)
  steps_per_epoch = math.ceil(n / batch)
  # The last mini-batch of an epoch is short when batch does not divide n: it is padded to a
  # fixed shape (one compiled step) and the padding gets weight 0 in the loss.
  weights = (jnp.arange(steps_per_epoch * batch) < n).astype(images.dtype).reshape(steps_per_epoch, batch)
  params, k_data = _init(key, images[:1], network=network)
  opt_state = eval_optimizer(epochs=epochs, steps_per_epoch=steps_per_epoch, **hyper).init(params)
  static = dict(network=network, epochs=epochs, steps_per_epoch=steps_per_epoch, augment=augment)
  if loop == "scan":
    params, _ = _train_scan(params, opt_state, images, labels, weights, k_data, hyper, n=n, batch=batch, **static)
    return params
  for epoch in range(epochs):
    order, aug_keys = _epoch_batches(k_data, epoch, n=n, batch=batch, steps_per_epoch=steps_per_epoch)
    for s in range(steps_per_epoch):
      params, opt_state = _train_step(params, opt_state, images, labels, order[s], weights[s], aug_keys[s], hyper,
                                      **static)
  return params


@functools.partial(jax.jit, static_argnames=("network",))
def _count_correct(params, x, y, valid, *, network):
  """Correct predictions of one network on one chunk of test images (padding rows have ``valid`` False)."""
  return jnp.sum((jnp.argmax(network.apply({"params": params}, x), -1) == y) & valid)


def _check_images(images: Any, name: str = "images") -> np.ndarray:
  arr = _validation.check_array(images, name, floating=True)
  if arr.ndim != 4:
    raise ValueError(
        f"{name} must have shape (n, H, W, C); got shape {arr.shape}"
        + (" (grey images: add the channel axis with udd_jax.supervised.networks.as_images)." if arr.ndim == 3 else ".")
    )
  return arr if arr.dtype.kind == "f" else arr.astype(np.float32)


def _check_targets(labels: Any, n: int) -> np.ndarray:
  """Integer class labels ``(n,)`` or float target vectors ``(n, C)``."""
  arr = _validation.check_array(labels, "labels", floating=True)
  if arr.ndim == 2:
    if arr.dtype.kind != "f":
      raise TypeError(f"labels of shape (n, C) must be float target vectors; got dtype {arr.dtype}.")
    if arr.shape[0] != n:
      raise ValueError(f"labels has {arr.shape[0]} rows but images has {n}.")
    return arr
  if arr.ndim != 1:
    raise ValueError(f"labels must be class labels (n,) or target vectors (n, C); got shape {arr.shape}.")
  return _validation.check_labels(arr, "labels", n=n)


def _resolve_network(network: Any, labels: np.ndarray, n_classes: int | None, extra_max_label: int = -1) -> nn.Module:
  """The flax module to train and checks that its outputs cover the labels."""
  needed = labels.shape[1] if labels.ndim == 2 else int(labels.max()) + 1
  needed = max(needed, extra_max_label + 1)
  if n_classes is not None:
    n_classes = _validation.check_positive_int(n_classes, "n_classes")
    if n_classes < needed:
      raise ValueError(f"n_classes={n_classes} but the labels need at least {needed} classes.")
  if isinstance(network, str):
    return get_network(_validation.check_choice(network, "network", NETWORKS), n_classes or needed)
  if not isinstance(network, nn.Module):
    raise TypeError(f"network must be one of {list(NETWORKS)} or a flax module; got {type(network).__name__}.")
  outputs = getattr(network, "n_classes", None)
  if outputs is not None:
    if labels.ndim == 2 and labels.shape[1] != outputs:
      raise ValueError(f"labels are {labels.shape[1]}-dimensional target vectors but the network has {outputs} outputs.")
    if outputs < needed:
      raise ValueError(f"the network has {outputs} outputs but the labels need {needed} classes.")
  return network


def _check_options(epochs, lr, momentum, weight_decay, batch_size, augment) -> dict[str, float]:
  _validation.check_positive_int(epochs, "epochs")
  _validation.check_positive_int(batch_size, "batch_size")
  momentum = _validation.check_positive_float(momentum, "momentum", allow_zero=True)
  if momentum >= 1:
    raise ValueError(f"momentum must be in [0, 1); got {momentum}.")
  if augment is not None and not callable(augment):
    raise TypeError(f"augment must be a function (x, key) -> x or None; got {type(augment).__name__}.")
  return dict(
      lr=_validation.check_positive_float(lr, "lr"),
      momentum=momentum,
      weight_decay=_validation.check_positive_float(weight_decay, "weight_decay", allow_zero=True),
  )


def _hyper_arrays(hyper: dict[str, float], dtype: Any) -> dict[str, jax.Array]:
  return {k: jnp.asarray(v, dtype) for k, v in hyper.items()}


class TrainOptions(TypedDict, total=False):
  """The options of :func:`train_network` and :func:`train_networks`."""

  epochs: int
  lr: float
  momentum: float
  weight_decay: float
  batch_size: int
  augment: Augment | None
  n_classes: int | None
  loop: str


def _prepare(network, images, labels, *, epochs=300, lr=0.01, momentum=0.9, weight_decay=5e-4, batch_size=256, augment=None,
             n_classes=None, loop="auto"):
  """Checks a training run's arguments: the device arrays, the traced hyperparameters and the static options."""
  images = _check_images(images)
  labels = _check_targets(labels, images.shape[0])
  module = _resolve_network(network, labels, n_classes)
  hyper = _check_options(epochs, lr, momentum, weight_decay, batch_size, augment)
  static = dict(network=module, epochs=epochs, batch_size=batch_size, augment=augment, loop=loops.resolve_loop(loop))
  return jnp.asarray(images), jnp.asarray(labels), _hyper_arrays(hyper, images.dtype), static


@_validation.renamed(key="seed")
def train_network(
    network: str | nn.Module,
    images: Float[ArrayLike, "n H W C"],
    labels: Int[ArrayLike, " n"] | Float[ArrayLike, "n classes"],
    seed: PRNGKeyArray | int,
    **options: Unpack[TrainOptions],
) -> PyTree:
  """Trains a fresh init of ``network`` from scratch on ``(images, labels)`` with the DC evaluation schedule.

  Args:
    network: a name in :data:`NETWORKS` (built with ``n_classes`` outputs and default
      width) or a flax module mapping ``(n, H, W, C)`` to logits.
    images: the training set, ``(n, H, W, C)``.
    labels: integer class labels ``(n,)`` (softmax cross-entropy) or float target vectors
      ``(n, C)`` (mean squared error on the logits).
    seed: int seed or PRNG key of the init, the shuffling and the augmentation.
    **options: the training options (defaults in parentheses):
      epochs: passes over the set (300); the learning rate drops to ``0.1 * lr`` at ``epochs // 2``.
      lr: initial learning rate (0.01).
      momentum: SGD momentum (0.9).
      weight_decay: L2 coefficient (5e-4).
      batch_size: mini-batch size (256); the whole set is one batch when it is smaller.
      augment: optional pure function ``(x, key) -> x`` applied to every mini-batch (e.g.
      DSA with a fixed strategy).
      n_classes: outputs of a network given by name (default: the largest label + 1).
      loop: ``"auto"`` (the default: ``"host"`` on the CPU, ``"scan"`` on GPU and TPU),
      ``"host"`` (a host loop over one jitted step) or ``"scan"`` (one ``lax.scan`` over
      the run); both take the same steps.

  Returns:
    The trained flax parameters.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> x = jnp.concatenate([jnp.zeros((2, 4, 4, 1)), jnp.ones((2, 4, 4, 1))])
    >>> params = train_network("mlp", x, jnp.array([0, 0, 1, 1]), jax.random.key(0), epochs=10)
    >>> logits = get_network("mlp", 2).apply({"params": params}, x)
    >>> jnp.argmax(logits, -1).tolist()
    [0, 0, 1, 1]
  """
  params = train_networks(network, images, labels, as_key(seed)[0][None], **options)
  return jax.tree.map(lambda a: a[0], params)


def train_networks(
    network: str | nn.Module,
    images: Float[ArrayLike, "n H W C"],
    labels: Int[ArrayLike, " n"] | Float[ArrayLike, "n classes"],
    keys: PRNGKeyArray,
    **options: Unpack[TrainOptions],
) -> PyTree:
  """:func:`train_network` for every key of ``keys`` (shape ``(runs,)``), one after the other with one compiled step.

  Run ``r`` gives the same parameters as ``train_network(..., keys[r])``.

  Returns:
    The trained parameters, every leaf stacked over the runs (leading axis ``runs``).
  """
  images, labels, hyper, static = _prepare(network, images, labels, **options)
  keys = as_keys(keys)
  if keys.ndim != 1:
    raise ValueError(f"keys must be a 1-d array of PRNG keys (runs,); got shape {keys.shape}.")
  runs = [_train_one(k, images, labels, hyper, **static) for k in keys]
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *runs)


def accuracy(
    network: nn.Module, params: PyTree, x: Float[ArrayLike, "m H W C"], y: Int[ArrayLike, " m"], *, chunk: int = TEST_CHUNK
) -> np.ndarray:
  """Accuracy on ``(x, y)`` of every run of ``params`` (leaves stacked over runs), forward in chunks.

  Returns:
    ``(runs,)`` float64 accuracies.
  """
  if not isinstance(network, nn.Module):
    raise TypeError(f"network must be the flax module the params belong to; got {type(network).__name__}.")
  x = _check_images(x, "x")
  y = _validation.check_labels(y, "y", n=x.shape[0])
  chunk = min(_validation.check_positive_int(chunk, "chunk"), x.shape[0])
  pad = -x.shape[0] % chunk
  valid = np.arange(x.shape[0] + pad) < x.shape[0]
  x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
  y = np.concatenate([y, np.zeros(pad, y.dtype)])
  # Host loops over runs and chunks (convolutions in a lax.map body are slow on the CPU); the
  # test set goes to the device once and the counts come back in one transfer.
  x, y, valid = jnp.asarray(x), jnp.asarray(y), jnp.asarray(valid)
  runs = jax.tree.leaves(params)[0].shape[0]
  counts = [[_count_correct(jax.tree.map(lambda a: a[r], params), x[i:i + chunk], y[i:i + chunk], valid[i:i + chunk],
                            network=network) for i in range(0, x.shape[0], chunk)] for r in range(runs)]
  correct = np.asarray(jax.device_get(counts), np.int64).sum(axis=1)
  return correct / int(valid.sum())


@_validation.renamed(key="seed")
def evaluate_synset(
    images: Float[ArrayLike, "n H W C"],
    labels: Int[ArrayLike, " n"] | Float[ArrayLike, "n classes"],
    test: tuple[Float[ArrayLike, "m H W C"], Int[ArrayLike, " m"]],
    *,
    seed: PRNGKeyArray | int,
    network: str | nn.Module = "convnet",
    runs: int = 5,
    epochs: int = 300,
    augment: Augment | None = None,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 256,
    n_classes: int | None = None,
    test_chunk: int = TEST_CHUNK,
    loop: str = "auto",
) -> dict[str, Any]:
  """DC-BENCH evaluation of a set: ``runs`` networks trained from scratch on it, tested on real data.

  Args:
    images: the (distilled) training set ``(n, H, W, C)``, preprocessed like ``test``.
    labels: integer labels ``(n,)`` or float target vectors ``(n, C)``.
    test: the real test set ``(x_test, y_test)``, ``x_test`` of shape ``(m, H, W, C)``.
    seed: int seed or PRNG key; run ``r`` trains with ``jax.random.split(key, runs)[r]`` (``key``
      the seed as a PRNG key).
    network: a name in :data:`NETWORKS` or a flax module (cross-architecture evaluation).
    runs: independent inits, trained one after the other.
    epochs, augment, lr, momentum, weight_decay, batch_size, n_classes, loop: as in :func:`train_network`.
    test_chunk: test images per forward pass.

  Returns:
    A JSON-serialisable dict: ``accuracies`` (one per run), their ``mean`` and ``std``,
    ``runs``, ``epochs``, ``network``, ``augment`` (whether one was used) and ``seconds``
    (wall time, compilation included).
  """
  t0 = time.perf_counter()
  images = _check_images(images)
  labels = _check_targets(labels, images.shape[0])
  if not isinstance(test, (tuple, list)) or len(test) != 2:
    raise TypeError("test must be a pair (x_test, y_test).")
  x_test = _check_images(test[0], "test x")
  y_test = _validation.check_labels(test[1], "test y", n=x_test.shape[0])
  if x_test.shape[1:] != images.shape[1:]:
    raise ValueError(f"test x has images of shape {x_test.shape[1:]} but images are {images.shape[1:]}.")
  runs = _validation.check_positive_int(runs, "runs")
  module = _resolve_network(network, labels, n_classes, extra_max_label=int(y_test.max()))
  keys = jax.random.split(as_key(seed)[0], runs)
  params = train_networks(
      module, images, labels, keys, epochs=epochs, lr=lr, momentum=momentum,
      weight_decay=weight_decay, batch_size=batch_size, augment=augment, loop=loop,
  )
  accuracies = accuracy(module, params, x_test.astype(images.dtype), y_test, chunk=test_chunk)
  return dict(
      accuracies=[float(a) for a in accuracies],
      mean=float(np.mean(accuracies)),
      std=float(np.std(accuracies)),
      runs=runs,
      epochs=epochs,
      network=network if isinstance(network, str) else type(network).__name__,
      augment=augment is not None,
      seconds=time.perf_counter() - t0,
  )
