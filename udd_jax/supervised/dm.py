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
  >>> result = distill_dm(x, y, ipc=2, seed=0, network="mlp", width=4, iterations=3, batch_real=8,
  ...                     dsa_strategy="crop")
  >>> result.images.shape, result.labels.tolist(), len(result.history)
  ((4, 8, 8, 1), [0, 0, 1, 1], 3)
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Unpack

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree, Scalar

from udd_jax import _validation
from udd_jax.supervised import augment as augment_lib
from udd_jax.supervised import base, image_updates
from udd_jax.supervised.labelled import class_data, initial_images
from udd_jax.supervised.networks import init_params
from udd_jax.supervised.result import SupervisedResult

DEFAULTS = dict(network="convnet", iterations=20000)


def dm_loss(network: nn.Module, params: PyTree, real: Float[Array, "classes b H W C"],
            syn: Float[Array, "classes ipc H W C"], *, aug_keys: PRNGKeyArray | None = None,
            dsa_strategy: str = augment_lib.DSA_STRATEGY_DIGITS) -> Scalar:
  """DM's loss: ``sum_c || mean embed(real_c) - mean embed(syn_c) ||^2``.

  Embeddings are ``network.apply(..., method="embed")``; the real ones are constants
  (``stop_gradient``). Classes run one at a time under ``lax.map``
  (:func:`~udd_jax.supervised.image_updates.sum_over_classes`). With ``aug_keys`` (one per
  class) both batches of class ``c`` get the DSA transform drawn from ``aug_keys[c]``.

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

  def one_class(real_c, syn_c, label):
    del label  # every class is compared with itself alone
    mean_real = jax.lax.stop_gradient(jnp.mean(embed(real_c), axis=0))
    return jnp.sum(jnp.square(mean_real - jnp.mean(embed(syn_c), axis=0)))

  return image_updates.sum_over_classes(one_class, real, syn, aug_keys, dsa_strategy, loop="map")


class _DMState(NamedTuple):
  images: Array  # (classes * ipc, H, W, C), class-major
  opt_state: optax.OptState


@functools.partial(jax.jit, static_argnames=("network", "ipc", "batch_real", "dsa_strategy"))
def _dm_step(state, key, data, image_lr, *, network, ipc, batch_real, dsa_strategy):
  """One DM iteration: a fresh random network, the loss, one SGD(momentum) step on the images."""
  n_classes = data.starts.shape[0]
  k_net, k_real, k_aug = jax.random.split(key, 3)
  params = init_params(network, k_net, state.images.shape[1:])
  real, dsa_options = image_updates.real_batches(data, k_real, k_aug, batch_real, dsa_strategy)

  def loss_fn(images):
    return dm_loss(network, params, real, images.reshape(n_classes, ipc, *images.shape[1:]), **dsa_options)

  images, opt_state, loss = image_updates.image_step(loss_fn, state.images, state.opt_state, image_lr)
  return _DMState(images, opt_state), {"loss": loss / n_classes}


@_validation.renamed(key="seed", lr_images="image_lr")
def distill_dm(
    x: Float[ArrayLike, "n H W C"], y: Int[ArrayLike, " n"], *, ipc: int, seed: PRNGKeyArray | int,
    image_lr: float = 1.0, batch_real: int = 256, dsa: bool = True,
    dsa_strategy: str = augment_lib.DSA_STRATEGY_DIGITS, init: str = "real",
    preprocessing: dict[str, Any] | None = None, **common: Unpack[base.CommonOptions],
) -> SupervisedResult:
  """Distribution matching (DM): mean embeddings of random networks, class by class.

  Each iteration draws a fresh random init of ``network`` (never trained), samples
  ``batch_real`` real images per class, augments the real batch and the synthetic images
  of each class with one shared DSA transform, and takes one SGD step (momentum 0.5,
  ``image_lr``) on :func:`dm_loss`.

  Args:
    x: real images ``(n, H, W)`` or ``(n, H, W, C)``, preprocessed as the networks will
      see them.
    y: integer labels ``(n,)``.
    ipc: synthetic images per class.
    seed: int seed or PRNG key of the run.
    image_lr: step size of the SGD(momentum 0.5) on the images (DM's 1.0).
    batch_real: real images per class per iteration (with replacement from a class with
      fewer images).
    dsa: augment with differentiable Siamese augmentation (DM's default).
    dsa_strategy: DSA operations; the default drops ``flip`` (digits); pass
      ``augment.DSA_STRATEGY`` for natural images.
    init: ``"real"`` (random real images of each class) or ``"random"`` (random images:
      N(0, 1) noise, the space of standardised inputs).
    preprocessing: recorded as ``config["preprocessing"]``.
    **common: the options of :func:`udd_jax.supervised.base.setup` (``network``,
      ``width``, ``depth``, ``iterations``, ``n_classes``, ``max_seconds``,
      ``callback``, ``checkpoint``); DM's defaults: ``network="convnet"``, ``iterations=20000``.

  Returns:
    A :class:`SupervisedResult`, ``ipc`` images per class (class-major), integer labels;
    ``history`` logs the loss averaged over classes (DM's ``loss_avg``).
  """
  image_lr, batch_real = image_updates.check_options(
      init=init, image_lr=image_lr, batch_real=batch_real, dsa=dsa, dsa_strategy=dsa_strategy,
      preprocessing=preprocessing,
  )
  s = base.setup(x, y, ipc=ipc, seed=seed, **(DEFAULTS | common))
  data = class_data(s.data.images, s.data.labels, s.data.n_classes)
  strategy = dsa_strategy if dsa else None
  image_lr_arr = jnp.asarray(image_lr, s.dtype)
  key, k_init = jax.random.split(s.key)
  images = initial_images(data, k_init, s.ipc, init)
  state = _DMState(images, image_updates.image_optimizer(image_lr).init(images))

  def iteration(state, key):
    return _dm_step(state, key, data, image_lr_arr, network=s.network, ipc=s.ipc, batch_real=batch_real,
                    dsa_strategy=strategy)

  state, log = s.run(iteration, state, key)
  config = s.config("dm", log, dsa=dsa, dsa_strategy=strategy, image_lr=image_lr, batch_real=batch_real, init=init,
                    preprocessing=preprocessing)
  return SupervisedResult(images=np.asarray(state.images, np.float32), labels=np.asarray(s.labels()), config=config,
                          history=log.history)
