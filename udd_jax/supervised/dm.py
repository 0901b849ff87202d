"""Dataset Condensation with Distribution Matching (DM; Zhao & Bilen, WACV 2023).

DM matches, class by class, the mean embedding of real and synthetic images under
randomly initialised networks that are never trained: the loss is the squared distance
between the two means (the MMD with a linear kernel in the embedding space), summed over
classes, with both batches of a class augmented by one shared DSA transform. No bilevel
optimisation: one forward pass of each batch per iteration.

Examples:
  >>> import numpy as np
  >>> rng = np.random.default_rng(0)
  >>> x, y = rng.normal(size=(40, 8, 8, 1)), np.arange(40) % 2
  >>> result = distill_dm(x, y, ipc=2, key=0, network="mlp", width=4, iterations=3, batch_real=8,
  ...                     dsa_strategy="crop")
  >>> result.images.shape, result.labels.tolist(), len(result.history)
  ((4, 8, 8, 1), [0, 0, 1, 1], 3)
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree, Scalar

from udd_jax.supervised import augment as augment_lib
from udd_jax.supervised.dd import (
    Callback,
    as_key,
    check_budget,
    init_params,
    network_config,
    prepare_data,
    run_outer_loop,
    synthetic_labels,
)
from udd_jax.supervised.matching import IMAGE_MOMENTUM, check_common, class_data, initial_images, sample_class_batches
from udd_jax.supervised.result import SupervisedResult


def dm_loss(
    network: nn.Module,
    params: PyTree,
    real: Float[Array, "classes b H W C"],
    syn: Float[Array, "classes ipc H W C"],
    *,
    aug_keys: PRNGKeyArray | None = None,
    dsa_strategy: str = augment_lib.DSA_STRATEGY_DIGITS,
) -> Scalar:
  """DM's loss: ``sum_c || mean embed(real_c) - mean embed(syn_c) ||^2``.

  Embeddings are ``network.apply(..., method="embed")``; the real ones are constants
  (``stop_gradient``). Classes are ``vmap``-ped. With ``aug_keys`` (one per class) both
  batches of class ``c`` get the DSA transform drawn from ``aug_keys[c]``.

  Args:
    network: flax network with an ``embed`` method.
    params: its parameters.
    real: real batches ``(classes, b, H, W, C)``.
    syn: synthetic images ``(classes, ipc, H, W, C)``.
    aug_keys: ``(classes,)`` PRNG keys, or None for no augmentation.
    dsa_strategy: DSA operations.

  Returns:
    The loss summed over classes.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from udd_jax.supervised.networks import MLP
    >>> net = MLP(n_classes=2, width=4)
    >>> real = jax.random.normal(jax.random.key(0), (2, 5, 3, 3, 1))
    >>> params = net.init(jax.random.key(1), real[0])["params"]
    >>> float(jax.jit(dm_loss, static_argnums=0)(net, params, real, real))
    0.0
  """

  def embed(x):
    return network.apply({"params": params}, x, method="embed")

  def one_class(real_c, syn_c, key):
    if key is not None:
      real_c = augment_lib.dsa(real_c, key, dsa_strategy)
      syn_c = augment_lib.dsa(syn_c, key, dsa_strategy)
    mean_real = jax.lax.stop_gradient(jnp.mean(embed(real_c), axis=0))
    return jnp.sum(jnp.square(mean_real - jnp.mean(embed(syn_c), axis=0)))

  if aug_keys is None:
    return jnp.sum(jax.vmap(lambda r, s: one_class(r, s, None))(real, syn))
  return jnp.sum(jax.vmap(one_class)(real, syn, aug_keys))


class _DMState(NamedTuple):
  images: Array  # (classes * ipc, H, W, C), class-major
  opt_state: optax.OptState


@functools.partial(jax.jit, static_argnames=("network", "ipc", "batch_real", "dsa_strategy"))
def _dm_step(state, key, data, lr_images, *, network, ipc, batch_real, dsa_strategy):
  """One DM iteration: a fresh random network, the loss, one SGD(momentum) step on the images."""
  n_classes = data.starts.shape[0]
  k_net, k_real, k_aug = jax.random.split(key, 3)
  params = init_params(network, k_net, state.images.shape[1:])
  real = sample_class_batches(data, k_real, batch_real)
  dsa_options = {} if dsa_strategy is None else dict(aug_keys=jax.random.split(k_aug, n_classes), dsa_strategy=dsa_strategy)

  def loss_fn(images):
    return dm_loss(network, params, real, images.reshape(n_classes, ipc, *images.shape[1:]), **dsa_options)

  loss, grads = jax.value_and_grad(loss_fn)(state.images)
  tx = optax.sgd(lr_images, momentum=IMAGE_MOMENTUM)
  updates, opt_state = tx.update(grads, state.opt_state, state.images)
  return _DMState(optax.apply_updates(state.images, updates), opt_state), {"loss": loss / n_classes}


def distill_dm(
    x: Float[ArrayLike, "n H W C"],
    y: Int[ArrayLike, " n"],
    *,
    ipc: int,
    key: PRNGKeyArray | int,
    network: str = "convnet",
    width: int = 128,
    depth: int = 3,
    iterations: int = 20000,
    lr_images: float = 1.0,
    batch_real: int = 256,
    dsa: bool = True,
    dsa_strategy: str = augment_lib.DSA_STRATEGY_DIGITS,
    init: str = "real",
    n_classes: int | None = None,
    preprocessing: dict[str, Any] | None = None,
    max_seconds: float | None = None,
    callback: Callback | None = None,
) -> SupervisedResult:
  """Distribution matching (DM): mean embeddings of random networks, class by class.

  Each iteration draws a fresh random init of ``network`` (never trained), samples
  ``batch_real`` real images per class, augments the real batch and the synthetic images
  of each class with one shared DSA transform, and takes one SGD step (momentum 0.5,
  ``lr_images``) on :func:`dm_loss`.

  Args:
    x: real images ``(n, H, W)`` or ``(n, H, W, C)``, preprocessed as the networks will
      see them.
    y: integer labels ``(n,)``.
    ipc: synthetic images per class.
    key: PRNG key or int seed.
    network: ``"convnet"`` (DM's), ``"mlp"`` or ``"lenet"``.
    width: ConvNet channels / MLP hidden units.
    depth: ConvNet blocks.
    iterations: image updates (each with a fresh network).
    lr_images: step size of the SGD(momentum 0.5) on the images (DM's 1.0).
    batch_real: real images per class per iteration (with replacement from a class with
      fewer images).
    dsa: augment with differentiable Siamese augmentation (DM's default).
    dsa_strategy: DSA operations; the default drops ``flip`` (digits); pass
      ``augment.DSA_STRATEGY`` for natural images.
    init: ``"real"`` (random real images of each class) or ``"noise"`` (N(0, 1)).
    n_classes: number of classes; ``max(y) + 1`` when None.
    preprocessing: recorded as ``config["preprocessing"]``.
    max_seconds: stop after this many seconds (checked between iterations).
    callback: called as ``callback(iteration, record)`` after every iteration.

  Returns:
    A :class:`SupervisedResult`, ``ipc`` images per class (class-major), integer labels;
    ``history`` logs the loss averaged over classes (DM's ``loss_avg``).
  """
  ipc, lr_images, batch_real = check_common(
      ipc=ipc, init=init, lr_images=lr_images, batch_real=batch_real, dsa_strategy=dsa_strategy,
      preprocessing=preprocessing,
  )
  if not isinstance(dsa, bool):
    raise TypeError(f"dsa must be a bool; got {type(dsa).__name__}.")
  iterations, max_seconds = check_budget(iterations, max_seconds, callback)
  real = prepare_data(x, y, n_classes=n_classes)
  net, net_config = network_config(network, real.n_classes, width, depth)
  key, seed = as_key(key)

  data = class_data(real.images, real.labels, real.n_classes)
  strategy = dsa_strategy if dsa else None
  lr_images_arr = jnp.asarray(lr_images, real.images.dtype)
  key, k_init = jax.random.split(key)
  images = initial_images(data, k_init, ipc, init)
  state = _DMState(images, optax.sgd(lr_images, momentum=IMAGE_MOMENTUM).init(images))

  def iteration(state, key):
    return _dm_step(state, key, data, lr_images_arr, network=net, ipc=ipc, batch_real=batch_real, dsa_strategy=strategy)

  state, log = run_outer_loop(iteration, state, key, iterations=iterations, max_seconds=max_seconds, callback=callback)
  config = dict(
      method="dm",
      ipc=ipc,
      **net_config,
      n_classes=real.n_classes,
      image_shape=list(real.images.shape[1:]),
      dsa=dsa,
      dsa_strategy=strategy,
      lr_images=lr_images,
      batch_real=batch_real,
      init=init,
      iterations=log.iterations,
      iterations_requested=iterations,
      stopped=log.stopped,
      seconds=log.seconds,
      seed=seed,
      preprocessing=preprocessing,
  )
  return SupervisedResult(
      images=np.asarray(state.images, np.float32),
      labels=np.asarray(synthetic_labels(real.n_classes, ipc)),
      config=config,
      history=log.history,
  )
