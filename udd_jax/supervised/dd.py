"""Dataset Distillation (Wang et al., 2018), random-initialisation variant.

DD learns the images *and* one step size per unrolled gradient step: a fresh network,
trained on the distilled set by ``steps x epochs`` plain gradient steps (step ``s`` of
every epoch on its own slice of the set, with its own learned step size), must classify
real data well. The outer loss is differentiated through the whole unrolled training
(:func:`udd_jax.training.unroll`).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Unpack

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree


from udd_jax import _validation
from udd_jax.supervised import base
from udd_jax.supervised.networks import cross_entropy, get_network, init_params, set_loss
from udd_jax.supervised.result import SupervisedResult
from udd_jax.training import unroll

DEFAULTS = dict(network="lenet")
# The reference code's schedule (github.com/SsnL/dataset-distillation, base_options.py): 400 epochs of the real
# training set in batches of 1024 (about 23,500 iterations on MNIST), the step size halved every 40 epochs.
DEFAULT_EPOCHS, DECAY_EPOCHS, DECAY_FACTOR = 400, 40, 0.5
ADAM_B1 = 0.5  # Adam(betas=(0.5, 0.999)) on the images and the step sizes, as the reference code


def step_batches(n_classes: int, ipc: int, steps: int) -> np.ndarray:
  """DD's layout: which images of a class-major set (``ipc`` per class) each step trains on.

  Step ``s`` takes, from every class, the ``k = ceil(ipc / steps)`` images of within-class
  indices ``s*k, ..., s*k + k - 1`` (mod ``ipc``): at ``ipc = steps`` one image per class
  per step (the paper's MNIST setting, 10 steps x 10 images), at ``ipc = 1`` the whole set
  at every step. Every image is used in every epoch; where ``steps`` does not divide
  ``ipc`` some are used twice, so that all steps have the same batch size (what
  ``lax.scan`` needs).

  Returns:
    ``(steps, n_classes * k)`` int32 indices into the set ``images[c * ipc + i]``.
  """
  k = math.ceil(ipc / steps)
  within = (np.arange(steps)[:, None] * k + np.arange(k)[None, :]) % ipc  # (steps, k)
  return (np.arange(n_classes)[None, :, None] * ipc + within[:, None, :]).reshape(steps, -1).astype(np.int32)


class _DDState(NamedTuple):
  syn: dict[str, Array]  # {"images": (n, H, W, C), "raw_step_sizes": (steps * epochs,)}
  opt_state: optax.OptState


def _step_sizes(raw: Array) -> Array:
  """The step sizes from their unconstrained parameters: ``softplus``, as the reference code."""
  return jax.nn.softplus(raw)


def _raw_step_size(step_size: float) -> float:
  """The inverse of :func:`_step_sizes`: ``log(expm1(step_size))``."""
  return math.log(math.expm1(step_size))


def _make_dd_step(network, optimizer, syn_labels, batches, *, n_inits, batch_real, image_shape):
  def outer_loss(syn, init_keys, x_real, y_real):
    step_sizes = _step_sizes(syn["raw_step_sizes"])

    def one_init(key):
      params0 = init_params(network, key, image_shape)
      params = unroll(set_loss(network), params0, (syn["images"], syn_labels), step_sizes, xs=batches)
      return cross_entropy(network, params, x_real, y_real)

    return jax.vmap(one_init)(init_keys).mean()

  @jax.jit
  def dd_step(state, key, x, y):
    syn, opt_state, loss = base.meta_step(outer_loss, state.syn, state.opt_state, optimizer, key, x, y, n_inits=n_inits,
                                          batch_real=batch_real)
    return _DDState(syn, opt_state), {"loss": loss}

  return dd_step


@_validation.renamed(key="seed", lr_images="image_lr", lr_step_sizes="step_size_lr")
def distill_dd(
    x: Float[ArrayLike, "n H W C"], y: Int[ArrayLike, " n"], *, ipc: int, seed: PRNGKeyArray | int, steps: int = 10,
    epochs: int = 3, n_inits: int = 1, image_lr: float = 0.01, step_size_lr: float = 0.01, init_lr: float = 0.02,
    batch_real: int = 1024, **common: Unpack[base.CommonOptions],
) -> SupervisedResult:
  """Dataset Distillation with random inits (Wang et al., 2018): images and per-step step sizes.

  The set holds ``ipc`` images per class, initialised from N(0, 1) (the paper's random
  init; real images are expected standardised). Each iteration samples ``n_inits`` fresh
  network inits, trains each (vmapped) by ``steps x epochs`` SGD steps on the set laid
  out by :func:`step_batches`, step ``t`` with its own step size ``softplus(raw[t])``,
  and takes the mean cross-entropy of the trained networks on a real batch as the loss;
  Adam (``b1 = 0.5``) updates the images and the raw step sizes, its step size halved
  every 40 epochs of the real data; :func:`retrain_dd` re-trains with the recipe.

  The defaults are the reference code's (docs/SUPERVISED.md, "DD against its reference
  schedule"): one fresh init per iteration, 1024 real images per iteration, initial step
  sizes 0.02, and ``iterations`` 400 epochs of the real data (``400 * ceil(n / batch_real)``,
  about 23,500 on MNIST).

  Args:
    x: real images ``(n, H, W)`` or ``(n, H, W, C)``, in the networks' input space.
    y: integer labels ``(n,)``.
    ipc: images per class of the distilled set.
    seed: int seed or PRNG key of the run.
    steps: gradient steps per epoch over the set.
    epochs: passes over the set; ``steps * epochs`` learned step sizes.
    n_inits: fresh network inits per iteration (each one unrolled training and its backward pass).
    image_lr: Adam step size on the images (halved every 40 epochs of the real data).
    step_size_lr: Adam step size on the step sizes' raw parameters (``softplus(raw)``; halved likewise).
    init_lr: initial value of every step size.
    batch_real: real images per iteration (at most ``n``).
    **common: the options of :func:`udd_jax.supervised.base.setup` (``network``,
      ``width``, ``depth``, ``iterations``, ``n_classes``, ``max_seconds``,
      ``callback``, ``checkpoint``); DD's defaults: ``network="lenet"``, ``iterations`` 400 epochs.

  Returns:
    A :class:`SupervisedResult`: class-major images and labels, the learned step sizes
    ``(steps * epochs,)`` in ``step_sizes``, the loss per iteration in ``history``.
  """
  batch_real = _validation.check_positive_int(batch_real, "batch_real")
  n_real = np.shape(x)[0] if np.ndim(x) else 0  # checked by base.setup below
  epoch = max(1, math.ceil(n_real / batch_real))  # iterations per epoch of the real data
  s = base.setup(x, y, ipc=ipc, seed=seed, **(DEFAULTS | {"iterations": DEFAULT_EPOCHS * epoch} | common))
  steps = _validation.check_positive_int(steps, "steps")
  epochs = _validation.check_positive_int(epochs, "epochs")
  n_inits = _validation.check_positive_int(n_inits, "n_inits")
  batch_real = min(batch_real, s.data.images.shape[0])
  image_lr = _validation.check_positive_float(image_lr, "image_lr")
  step_size_lr = _validation.check_positive_float(step_size_lr, "step_size_lr", allow_zero=True)
  init_lr = _validation.check_positive_float(init_lr, "init_lr")

  syn_labels = s.labels()
  batches = np.tile(step_batches(s.data.n_classes, s.ipc, steps), (epochs, 1))
  key, k_images = jax.random.split(s.key)
  syn = {
      "images": jax.random.normal(k_images, (len(syn_labels), *s.image_shape), dtype=s.dtype),
      "raw_step_sizes": jnp.full((steps * epochs,), _raw_step_size(init_lr), dtype=s.dtype),
  }
  decayed = lambda lr: optax.exponential_decay(lr, DECAY_EPOCHS * epoch, DECAY_FACTOR, staircase=True)
  optimizer = optax.partition(
      {"images": optax.adam(decayed(image_lr), b1=ADAM_B1),
       "raw_step_sizes": optax.adam(decayed(step_size_lr), b1=ADAM_B1)},
      {"images": "images", "raw_step_sizes": "raw_step_sizes"},
  )
  dd_step = _make_dd_step(
      s.network, optimizer, jnp.asarray(syn_labels), jnp.asarray(batches),
      n_inits=n_inits, batch_real=batch_real, image_shape=s.image_shape,
  )
  state = _DDState(syn, optimizer.init(syn))
  state, log = s.run(lambda st, k: dd_step(st, k, s.data.images, s.data.labels), state, key)
  config = s.config(
      "dd", log, steps=steps, epochs=epochs, n_inits=n_inits, image_lr=image_lr, step_size_lr=step_size_lr,
      init_lr=init_lr, batch_real=batch_real, init="random", preprocessing="none", adam_b1=ADAM_B1,
      decay=dict(every_iterations=DECAY_EPOCHS * epoch, factor=DECAY_FACTOR),
  )
  return SupervisedResult(
      images=np.asarray(state.syn["images"], dtype=np.float32),
      labels=syn_labels,
      config=config,
      history=log.history,
      step_sizes=np.asarray(_step_sizes(state.syn["raw_step_sizes"]), dtype=np.float32),
  )


@_validation.renamed(key="seed")
def retrain_dd(result: SupervisedResult, seed: PRNGKeyArray | int) -> PyTree:
  """Trains a fresh network on a DD result with exactly its learned recipe (DD's evaluation).

  The network of ``result.config`` starts from the init drawn with ``seed`` and takes
  ``steps x epochs`` plain SGD steps on the images, step ``t`` on the slice of
  :func:`step_batches` with step size ``result.step_sizes[t]``.

  Args:
    result: what :func:`distill_dd` returned.
    seed: int seed or PRNG key of the network's init.

  Returns:
    The trained network's parameters; apply them with
    ``get_network(config["network"], config["n_classes"], ...)``.
  """
  if not isinstance(result, SupervisedResult) or result.config.get("method") != "dd":
    raise TypeError("result must be the SupervisedResult of distill_dd (config['method'] == 'dd').")
  key, _ = base.as_key(seed)
  cfg = result.config
  net = get_network(cfg["network"], cfg["n_classes"], width=cfg["width"], depth=cfg["depth"])
  batches = np.tile(step_batches(cfg["n_classes"], cfg["ipc"], cfg["steps"]), (cfg["epochs"], 1))
  dtype = jnp.result_type(float)
  loss = set_loss(net)
  train = jax.jit(lambda p0, images, labels, lrs: unroll(loss, p0, (images, labels), lrs, xs=jnp.asarray(batches)))
  return train(
      init_params(net, key, tuple(result.images.shape[1:])),
      jnp.asarray(result.images, dtype),
      jnp.asarray(result.labels),
      jnp.asarray(result.step_sizes, dtype),
  )
