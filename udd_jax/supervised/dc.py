"""Dataset Condensation with gradient matching (DC; Zhao, Mopuri & Bilen, ICLR 2021) and
its differentiable Siamese augmentation variant (DSA; Zhao & Bilen, ICML 2021).

DC learns ``ipc`` images per class so that, at every point of a network's training, the
gradient of the cross-entropy on the synthetic images of a class points where the
gradient on real images of that class points (:mod:`udd_jax.supervised.gradient_matching`).

Schedule (DC's Algorithm 1 and code): each iteration draws a fresh network init; for
``outer_loop`` rounds it (i) sums the matching loss over classes and takes one
SGD(momentum 0.5) step on the images, then (ii) except after the last round, trains the
network for ``inner_loop`` SGD steps on the synthetic set. DSA is the same with both
batches of a class augmented by one shared random transform
(:mod:`udd_jax.supervised.augment`); the inner training then augments each synthetic image
independently, as the DSA code does.

Examples:
  >>> import numpy as np
  >>> rng = np.random.default_rng(0)
  >>> x, y = rng.normal(size=(40, 8, 8, 1)), np.arange(40) % 2
  >>> result = distill_dc(x, y, ipc=1, seed=0, network="mlp", width=4, iterations=2, batch_real=8)
  >>> result.images.shape, result.labels.tolist(), result.config["iterations"]
  ((2, 8, 8, 1), [0, 1], 2)
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Unpack

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike
from jaxtyping import Array, Float, Int, PRNGKeyArray

from udd_jax import _validation
from udd_jax.supervised import augment as augment_lib
from udd_jax.supervised import base, image_updates
from udd_jax.supervised.gradient_matching import dc_loss
from udd_jax.supervised.labelled import class_data, initial_images
from udd_jax.supervised.networks import cross_entropy, init_params
from udd_jax.supervised.result import SupervisedResult

LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
"""DC's ``get_loops``: ``ipc -> (outer_loop, inner_loop)``."""

DEFAULTS = dict(network="convnet", iterations=1000)


class _DCState(NamedTuple):
  images: Array  # (classes * ipc, H, W, C), class-major
  opt_state: optax.OptState


_MATCH_STATIC = ("network", "ipc", "batch_real", "dsa_strategy")


@functools.partial(jax.jit, static_argnames=_MATCH_STATIC)
def _dc_match_step(state, params, key, data, image_lr, *, network, ipc, batch_real, dsa_strategy):
  """One image update: the matching loss summed over classes, one SGD(momentum) step."""
  n_classes = data.starts.shape[0]
  k_real, k_aug = jax.random.split(key)
  real, dsa_options = image_updates.real_batches(data, k_real, k_aug, batch_real, dsa_strategy)

  def loss_fn(images):
    return dc_loss(network, params, real, images.reshape(n_classes, ipc, *images.shape[1:]), **dsa_options)

  images, opt_state, loss = image_updates.image_step(loss_fn, state.images, state.opt_state, image_lr)
  return _DCState(images, opt_state), loss


@functools.partial(jax.jit, static_argnames=("network", "dsa_strategy"))
def _dc_train_step(params, images, labels, key, network_lr, *, network, dsa_strategy):
  """One full-batch SGD step of the network on the (detached) synthetic set."""
  x = images if dsa_strategy is None else augment_lib.dsa_per_image(images, key, dsa_strategy)
  grads = jax.grad(cross_entropy, argnums=1)(network, params, x, labels)
  tx = optax.sgd(network_lr)  # no momentum: its state is empty and need not be carried
  updates, _ = tx.update(grads, tx.init(params), params)
  return optax.apply_updates(params, updates)


_fresh_params = jax.jit(init_params, static_argnums=(0, 2))


def _dc_iteration(state, key, data, syn_labels, image_lr, network_lr, *, network, ipc, batch_real, outer_loop, inner_loop,
                  dsa_strategy):
  """One DC iteration: a fresh init, then ``outer_loop`` rounds of [image update; ``inner_loop``
  network steps (skipped after the last round)].

  The rounds and steps loop on the host around jitted steps, for the reason given in
  :func:`udd_jax.supervised.train.train_network` (convolutions in loop bodies are slow on the CPU).
  """
  k_net, k_rounds = jax.random.split(key)
  params = _fresh_params(network, k_net, tuple(state.images.shape[1:]))
  keys = jax.random.split(k_rounds, (outer_loop, 2))
  losses = []
  for r in range(outer_loop):
    state, loss = _dc_match_step(state, params, keys[r, 0], data, image_lr, network=network, ipc=ipc,
                                 batch_real=batch_real, dsa_strategy=dsa_strategy)
    losses.append(loss)
    if r < outer_loop - 1:
      images = jax.lax.stop_gradient(state.images)
      for k in jax.random.split(keys[r, 1], inner_loop):
        params = _dc_train_step(params, images, syn_labels, k, network_lr, network=network, dsa_strategy=dsa_strategy)
  return state, {"loss": jnp.mean(jnp.stack(losses)) / data.starts.shape[0]}


def _loops(ipc: int, outer_loop: Any, inner_loop: Any) -> tuple[int, int]:
  if (outer_loop is None or inner_loop is None) and ipc not in LOOPS:
    raise ValueError(f"DC has no default outer_loop/inner_loop for ipc={ipc} (only {sorted(LOOPS)}); pass both.")
  default_outer, default_inner = LOOPS.get(ipc, (None, None))
  outer_loop = _validation.check_positive_int(default_outer if outer_loop is None else outer_loop, "outer_loop")
  inner_loop = _validation.check_non_negative_int(default_inner if inner_loop is None else inner_loop, "inner_loop")
  return outer_loop, inner_loop


@_validation.renamed(key="seed", lr_images="image_lr", lr_network="network_lr")
def distill_dc(
    x: Float[ArrayLike, "n H W C"], y: Int[ArrayLike, " n"], *, ipc: int, seed: PRNGKeyArray | int, dsa: bool = False,
    dsa_strategy: str = augment_lib.DSA_STRATEGY_DIGITS, image_lr: float = 0.1, network_lr: float = 0.01,
    batch_real: int = 256, init: str = "real", outer_loop: int | None = None, inner_loop: int | None = None,
    preprocessing: dict[str, Any] | None = None, **common: Unpack[base.CommonOptions],
) -> SupervisedResult:
  """Dataset condensation by gradient matching (DC), or DSA with ``dsa=True``; the schedule is
  the module docstring's: per iteration a fresh init, ``outer_loop`` rounds of [one image
  step on :func:`~udd_jax.supervised.gradient_matching.dc_loss`; ``inner_loop`` network steps].

  Args:
    x: real images ``(n, H, W)`` or ``(n, H, W, C)``, preprocessed as the networks will
      see them (DC standardises with the dataset mean and std).
    y: integer labels ``(n,)``.
    ipc: synthetic images per class.
    seed: int seed or PRNG key of the run.
    dsa: use differentiable Siamese augmentation (the DSA method).
    dsa_strategy: DSA operations; the default drops ``flip``, which digits do not
      tolerate; pass ``augment.DSA_STRATEGY`` for natural images.
    image_lr: step size of the SGD(momentum 0.5) on the images.
    network_lr: step size of the inner network training.
    batch_real: real images per class per round (sampled with replacement from a class
      with fewer images).
    init: ``"real"`` (random real images of each class) or ``"random"`` (random images:
      N(0, 1) noise, the space of standardised inputs).
    outer_loop: rounds per iteration; DC's value for ``ipc`` (:data:`LOOPS`) when None.
    inner_loop: network steps between rounds; DC's value when None. The steps are
      full-batch; DC's code runs ``inner_loop`` epochs of mini-batches of 256, which is
      the same for sets of at most 256 images (ipc <= 25 with 10 classes).
    preprocessing: recorded as ``config["preprocessing"]`` (e.g. the mean and std used).
    **common: the options of :func:`udd_jax.supervised.base.setup` (``network``,
      ``width``, ``depth``, ``iterations``, ``n_classes``, ``max_seconds``,
      ``callback``, ``checkpoint``); DC's defaults: ``network="convnet"``, ``iterations=1000``.

  Returns:
    A :class:`SupervisedResult` with ``ipc`` images per class (class-major) and integer
    labels; ``history`` logs per iteration the matching loss averaged over classes and
    rounds (DC's ``loss_avg``).

  Raises:
    ValueError: unknown option, ``ipc`` not in :data:`LOOPS` without explicit loops, a
      class without images, bad shapes or non-finite inputs.
  """
  image_lr, batch_real = image_updates.check_options(
      init=init, image_lr=image_lr, batch_real=batch_real, dsa=dsa, dsa_strategy=dsa_strategy,
      preprocessing=preprocessing,
  )
  network_lr = _validation.check_positive_float(network_lr, "network_lr")
  s = base.setup(x, y, ipc=ipc, seed=seed, **(DEFAULTS | common))
  outer_loop, inner_loop = _loops(s.ipc, outer_loop, inner_loop)

  data, syn_labels = class_data(s.data.images, s.data.labels, s.data.n_classes), jnp.asarray(s.labels())
  strategy = dsa_strategy if dsa else None
  image_lr_arr, network_lr_arr = jnp.asarray(image_lr, s.dtype), jnp.asarray(network_lr, s.dtype)
  key, k_init = jax.random.split(s.key)
  images = initial_images(data, k_init, s.ipc, init)
  state = _DCState(images, image_updates.image_optimizer(image_lr).init(images))

  def iteration(state, key):
    return _dc_iteration(
        state, key, data, syn_labels, image_lr_arr, network_lr_arr, network=s.network, ipc=s.ipc,
        batch_real=batch_real, outer_loop=outer_loop, inner_loop=inner_loop, dsa_strategy=strategy,
    )

  state, log = s.run(iteration, state, key)
  config = s.config(
      "dsa" if dsa else "dc", log, dsa=dsa, dsa_strategy=strategy, image_lr=image_lr, network_lr=network_lr,
      batch_real=batch_real, init=init, outer_loop=outer_loop, inner_loop=inner_loop, preprocessing=preprocessing,
  )
  return SupervisedResult(images=np.asarray(state.images, np.float32), labels=np.asarray(syn_labels), config=config,
                          history=log.history)
