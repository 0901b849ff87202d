"""Dataset Condensation with gradient matching (DC; Zhao, Mopuri & Bilen, ICLR 2021) and
its differentiable Siamese augmentation variant (DSA; Zhao & Bilen, ICML 2021).

DC learns ``ipc`` images per class so that, at every point of a network's training, the
gradient of the cross-entropy on the synthetic images of a class points where the
gradient on real images of that class points. The distance between two gradients is
layer-wise: for each weight tensor, the sum over output channels of ``1 - cosine`` between
the per-channel flattened gradients (:func:`match_distance`, DC's ``distance_wb``).

Schedule (DC's Algorithm 1 and code): each iteration draws a fresh network init; for
``outer_loop`` rounds it (i) sums the matching loss over classes and takes one
SGD(momentum 0.5) step on the images, then (ii) except after the last round, trains the
network for ``inner_loop`` SGD steps on the synthetic set. DSA is the same with both
batches of a class augmented by one shared random transform
(:mod:`udd_jax.supervised.augment`); the inner training then augments each synthetic image
independently, as the DSA code does.

This module also holds what DC, DSA and DM share: class-balanced real batches
(:class:`ClassData`, :func:`sample_class_batches`) and the real-image initialisation.

Examples:
  >>> import numpy as np
  >>> rng = np.random.default_rng(0)
  >>> x, y = rng.normal(size=(40, 8, 8, 1)), np.arange(40) % 2
  >>> result = distill_dc(x, y, ipc=1, key=0, network="mlp", width=4, iterations=2, batch_real=8)
  >>> result.images.shape, result.labels.tolist(), result.config["iterations"]
  ((2, 8, 8, 1), [0, 1], 2)
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

from udd_jax import _validation
from udd_jax.supervised import augment as augment_lib
from udd_jax.supervised.dd import (
    Callback,
    as_key,
    check_budget,
    cross_entropy,
    init_params,
    network_config,
    prepare_data,
    run_outer_loop,
    synthetic_labels,
)
from udd_jax.supervised.result import SupervisedResult

LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
"""DC's ``get_loops``: ``ipc -> (outer_loop, inner_loop)``."""

INITS = ("real", "noise")
IMAGE_MOMENTUM = 0.5  # DC/DSA/DM: torch.optim.SGD([image_syn], lr, momentum=0.5)


def _safe_norm(a: jax.Array, axis: int) -> jax.Array:
  """Euclidean norm whose gradient at 0 is 0 (as torch's) instead of NaN: a channel whose
  gradient vanishes (all its ReLUs off) must not poison the image update."""
  sq = jnp.sum(jnp.square(a), axis=axis)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def match_distance(grads_real: PyTree, grads_syn: PyTree, *, eps: float = 1e-6) -> Scalar:
  """DC's layer-wise gradient distance (``distance_wb`` summed over layers).

  For every weight tensor ``G`` (rank >= 2), with ``A`` and ``B`` the real and synthetic
  gradients reshaped to ``(out_channels, -1)``, the distance is
  ``sum_i (1 - <A_i, B_i> / (|A_i| |B_i| + eps))``. Flax keeps the output axis last
  (``Conv`` kernels ``(kh, kw, in, out)``, ``Dense`` kernels ``(in, out)``), so that axis
  is moved first. Biases and other rank-1 parameters (norm scales) contribute 0, as in
  DC's code; ``eps`` is DC's ``0.000001``.

  Args:
    grads_real: gradient pytree (e.g. w.r.t. flax params) on real data.
    grads_syn: gradient pytree with the same structure and shapes, on synthetic data.
    eps: added to the product of norms.

  Returns:
    The scalar distance: 0 for parallel gradients, ``2 * channels`` for opposite ones.

  Examples:
    >>> import jax.numpy as jnp
    >>> g = {"kernel": jnp.array([[1.0, 0.0], [0.0, 1.0]]), "bias": jnp.array([1.0, -1.0])}
    >>> h = {"kernel": jnp.array([[1.0, 0.0], [0.0, -1.0]]), "bias": jnp.array([5.0, 5.0])}
    >>> round(float(match_distance(g, h)), 4)  # channel 0: cos 1; channel 1: cos -1
    2.0
  """
  leaves_real, tree_real = jax.tree.flatten(grads_real)
  leaves_syn, tree_syn = jax.tree.flatten(grads_syn)
  if tree_real != tree_syn:
    raise ValueError(f"grads_real and grads_syn must have the same structure; got {tree_real} and {tree_syn}.")
  total = jnp.zeros(())
  for path, a, b in zip(jax.tree_util.tree_flatten_with_path(grads_real)[0], leaves_real, leaves_syn):
    if jnp.shape(a) != jnp.shape(b):
      name = jax.tree_util.keystr(path[0])
      raise ValueError(f"gradient {name} has shape {jnp.shape(a)} in grads_real but {jnp.shape(b)} in grads_syn.")
    if jnp.ndim(a) < 2:
      continue
    a = jnp.moveaxis(a, -1, 0).reshape(a.shape[-1], -1)
    b = jnp.moveaxis(b, -1, 0).reshape(b.shape[-1], -1)
    cosine = jnp.sum(a * b, axis=-1) / (_safe_norm(a, -1) * _safe_norm(b, -1) + eps)
    total = total + jnp.sum(1.0 - cosine)
  return total


def dc_loss(
    network: nn.Module,
    params: PyTree,
    real: Float[Array, "classes b H W C"],
    syn: Float[Array, "classes ipc H W C"],
    *,
    aug_keys: PRNGKeyArray | None = None,
    dsa_strategy: str = augment_lib.DSA_STRATEGY_DIGITS,
) -> Scalar:
  """DC's matching loss: ``sum_c match_distance(grad CE(real_c), grad CE(syn_c))``.

  Class ``c``'s batches are labelled ``c``; the gradients are w.r.t. the network
  parameters; the real gradient is a constant (``stop_gradient``), as in DC. Classes are
  ``vmap``-ped. With ``aug_keys`` (one key per class), both batches of class ``c`` are
  augmented by the same DSA transform drawn from ``aug_keys[c]`` (DSA).

  Args:
    network: flax network.
    params: its parameters.
    real: real batches, class-major ``(classes, b, H, W, C)``.
    syn: synthetic images, class-major ``(classes, ipc, H, W, C)``.
    aug_keys: ``(classes,)`` PRNG keys for DSA, or None for no augmentation (DC).
    dsa_strategy: DSA operations.

  Returns:
    The loss summed over classes.
  """
  n_classes = real.shape[0]
  grad_fn = jax.grad(cross_entropy, argnums=1)

  def one_class(real_c, syn_c, key, label):
    if key is not None:
      real_c = augment_lib.dsa(real_c, key, dsa_strategy)
      syn_c = augment_lib.dsa(syn_c, key, dsa_strategy)
    g_real = jax.lax.stop_gradient(grad_fn(network, params, real_c, jnp.full(real_c.shape[0], label)))
    g_syn = grad_fn(network, params, syn_c, jnp.full(syn_c.shape[0], label))
    return match_distance(g_real, g_syn)

  labels = jnp.arange(n_classes)
  if aug_keys is None:
    return jnp.sum(jax.vmap(lambda r, s, c: one_class(r, s, None, c))(real, syn, labels))
  return jnp.sum(jax.vmap(one_class)(real, syn, aug_keys, labels))


class ClassData(NamedTuple):
  """Real images sorted by class, for class-balanced sampling inside ``jit``.

  Attributes:
    images: ``(n, H, W, C)``, class ``c`` at rows ``starts[c] .. starts[c] + counts[c] - 1``.
    starts: ``(classes,)`` first row of each class.
    counts: ``(classes,)`` images per class.
  """

  images: Array
  starts: Array
  counts: Array


def class_data(images: ArrayLike, labels: ArrayLike, n_classes: int) -> ClassData:
  """Sorts ``(images, labels)`` by class into a :class:`ClassData` (every class non-empty)."""
  labels = np.asarray(labels)
  order = np.argsort(labels, kind="stable")
  counts = np.bincount(labels, minlength=n_classes)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  return ClassData(jnp.asarray(images)[order], jnp.asarray(starts, jnp.int32), jnp.asarray(counts, jnp.int32))


def sample_class_batches(data: ClassData, key: PRNGKeyArray, batch: int) -> Float[Array, "classes batch H W C"]:
  """``batch`` random real images of every class, class-major.

  Without replacement (DC's ``permutation[:n]``) from classes with at least ``batch``
  images, with replacement from smaller ones, so that every class gives the same static
  shape. Pure and ``jit``-able (``batch`` static).
  """
  n_rows = data.images.shape[0]
  starts, counts = data.starts[:, None], data.counts[:, None]
  k_norep, k_rep = jax.random.split(key)
  # Without replacement: the rows of the `batch` largest of i.i.d. uniforms over the class.
  scores = jnp.where(jnp.arange(n_rows) < counts, jax.random.uniform(k_norep, (counts.shape[0], n_rows)), -1.0)
  distinct = jax.lax.top_k(scores, min(batch, n_rows))[1]
  if batch > n_rows:  # no class can fill the batch: every class samples with replacement
    distinct = jnp.zeros((counts.shape[0], batch), jnp.int32)
  repeated = jnp.minimum(jnp.floor(jax.random.uniform(k_rep, (counts.shape[0], batch)) * counts), counts - 1)
  return data.images[starts + jnp.where(counts >= batch, distinct, repeated.astype(jnp.int32))]


@functools.partial(jax.jit, static_argnames=("ipc", "init"))
def initial_images(data: ClassData, key: PRNGKeyArray, ipc: int, init: str) -> Float[Array, "n H W C"]:
  """The starting set, class-major: ``ipc`` random real images per class (``"real"``) or
  standard normal noise (``"noise"``, DC's ``torch.randn`` in the standardised space)."""
  n_classes = data.starts.shape[0]
  if init == "noise":
    return jax.random.normal(key, (n_classes * ipc, *data.images.shape[1:]), data.images.dtype)
  return sample_class_batches(data, key, ipc).reshape(n_classes * ipc, *data.images.shape[1:])


def check_common(
    *, ipc: Any, init: Any, lr_images: Any, batch_real: Any, dsa_strategy: Any, preprocessing: Any
) -> tuple[int, float, int]:
  """Checks the options DC, DSA and DM share; returns ``(ipc, lr_images, batch_real)``."""
  ipc = _validation.check_positive_int(ipc, "ipc")
  _validation.check_choice(init, "init", INITS)
  lr_images = _validation.check_positive_float(lr_images, "lr_images")
  batch_real = _validation.check_positive_int(batch_real, "batch_real")
  augment_lib.parse_strategy(dsa_strategy)
  if preprocessing is not None and not isinstance(preprocessing, dict):
    raise TypeError(f"preprocessing must be a JSON-serialisable dict or None; got {type(preprocessing).__name__}.")
  return ipc, lr_images, batch_real


class _DCState(NamedTuple):
  images: Array  # (classes * ipc, H, W, C), class-major
  opt_state: optax.OptState


_MATCH_STATIC = ("network", "ipc", "batch_real", "dsa_strategy")


@functools.partial(jax.jit, static_argnames=_MATCH_STATIC)
def _dc_match_step(state, params, key, data, lr_images, *, network, ipc, batch_real, dsa_strategy):
  """One image update: the matching loss summed over classes, one SGD(momentum) step."""
  n_classes = data.starts.shape[0]
  k_real, k_aug = jax.random.split(key)
  real = sample_class_batches(data, k_real, batch_real)
  dsa_options = {} if dsa_strategy is None else dict(aug_keys=jax.random.split(k_aug, n_classes), dsa_strategy=dsa_strategy)

  def loss_fn(images):
    return dc_loss(network, params, real, images.reshape(n_classes, ipc, *images.shape[1:]), **dsa_options)

  loss, grads = jax.value_and_grad(loss_fn)(state.images)
  tx = optax.sgd(lr_images, momentum=IMAGE_MOMENTUM)
  updates, opt_state = tx.update(grads, state.opt_state, state.images)
  return _DCState(optax.apply_updates(state.images, updates), opt_state), loss


@functools.partial(jax.jit, static_argnames=("network", "dsa_strategy"))
def _dc_train_step(params, images, labels, key, lr_network, *, network, dsa_strategy):
  """One full-batch SGD step of the network on the (detached) synthetic set."""
  x = images if dsa_strategy is None else augment_lib.dsa_per_image(images, key, dsa_strategy)
  grads = jax.grad(cross_entropy, argnums=1)(network, params, x, labels)
  tx = optax.sgd(lr_network)  # no momentum: its state is empty and need not be carried
  updates, _ = tx.update(grads, tx.init(params), params)
  return optax.apply_updates(params, updates)


_fresh_params = jax.jit(init_params, static_argnums=(0, 2))


def _dc_iteration(state, key, data, syn_labels, lr_images, lr_network, *, network, ipc, batch_real, outer_loop, inner_loop,
                  dsa_strategy):
  """One DC iteration: a fresh init, then ``outer_loop`` rounds of [image update; ``inner_loop``
  network steps (skipped after the last round)].

  The rounds and steps loop on the host around jitted steps, for the reason given in
  :func:`udd_jax.supervised.train._train_one` (convolutions in loop bodies are slow on the CPU).
  """
  k_net, k_rounds = jax.random.split(key)
  params = _fresh_params(network, k_net, tuple(state.images.shape[1:]))
  keys = jax.random.split(k_rounds, (outer_loop, 2))
  losses = []
  for r in range(outer_loop):
    state, loss = _dc_match_step(state, params, keys[r, 0], data, lr_images, network=network, ipc=ipc,
                                 batch_real=batch_real, dsa_strategy=dsa_strategy)
    losses.append(loss)
    if r < outer_loop - 1:
      images = jax.lax.stop_gradient(state.images)
      for k in jax.random.split(keys[r, 1], inner_loop):
        params = _dc_train_step(params, images, syn_labels, k, lr_network, network=network, dsa_strategy=dsa_strategy)
  return state, {"loss": jnp.mean(jnp.stack(losses)) / data.starts.shape[0]}


def distill_dc(
    x: Float[ArrayLike, "n H W C"],
    y: Int[ArrayLike, " n"],
    *,
    ipc: int,
    key: PRNGKeyArray | int,
    network: str = "convnet",
    width: int = 128,
    depth: int = 3,
    iterations: int = 1000,
    dsa: bool = False,
    dsa_strategy: str = augment_lib.DSA_STRATEGY_DIGITS,
    lr_images: float = 0.1,
    lr_network: float = 0.01,
    batch_real: int = 256,
    init: str = "real",
    outer_loop: int | None = None,
    inner_loop: int | None = None,
    n_classes: int | None = None,
    preprocessing: dict[str, Any] | None = None,
    max_seconds: float | None = None,
    callback: Callback | None = None,
) -> SupervisedResult:
  """Dataset condensation by gradient matching (DC), or DSA with ``dsa=True``.

  Each iteration draws a fresh network init; for ``outer_loop`` rounds: per class, the
  CE gradients (w.r.t. the network parameters) on a real class batch of ``batch_real``
  images and on the class's synthetic images are compared by :func:`match_distance`; the
  loss summed over classes takes one SGD step (momentum 0.5, ``lr_images``) on the images;
  then, except after the last round, the network trains ``inner_loop`` full-batch SGD
  steps (``lr_network``) on the synthetic set. With ``dsa=True`` both batches of a class
  share one DSA transform per round, and the inner training augments every synthetic
  image independently (DSA code).

  Args:
    x: real images ``(n, H, W)`` or ``(n, H, W, C)``, preprocessed as the networks will
      see them (DC standardises with the dataset mean and std).
    y: integer labels ``(n,)``.
    ipc: synthetic images per class.
    key: PRNG key or int seed.
    network: ``"convnet"`` (DC's), ``"mlp"`` or ``"lenet"``.
    width: ConvNet channels / MLP hidden units.
    depth: ConvNet blocks.
    iterations: outer iterations (fresh network inits).
    dsa: use differentiable Siamese augmentation (the DSA method).
    dsa_strategy: DSA operations; the default drops ``flip``, which digits do not
      tolerate; pass ``augment.DSA_STRATEGY`` for natural images.
    lr_images: step size of the SGD(momentum 0.5) on the images.
    lr_network: step size of the inner network training.
    batch_real: real images per class per round (sampled with replacement from a class
      with fewer images).
    init: ``"real"`` (random real images of each class) or ``"noise"`` (N(0, 1)).
    outer_loop: rounds per iteration; DC's value for ``ipc`` (:data:`LOOPS`) when None.
    inner_loop: network steps between rounds; DC's value when None. The steps are
      full-batch; DC's code runs ``inner_loop`` epochs of mini-batches of 256, which is
      the same for sets of at most 256 images (ipc <= 25 with 10 classes).
    n_classes: number of classes; ``max(y) + 1`` when None.
    preprocessing: recorded as ``config["preprocessing"]`` (e.g. the mean and std used).
    max_seconds: stop after this many seconds (checked between iterations).
    callback: called as ``callback(iteration, record)`` after every iteration.

  Returns:
    A :class:`SupervisedResult` with ``ipc`` images per class (class-major) and integer
    labels; ``history`` logs per iteration the matching loss averaged over classes and
    rounds (DC's ``loss_avg``).

  Raises:
    ValueError: unknown option, ``ipc`` not in :data:`LOOPS` without explicit loops, a
      class without images, bad shapes or non-finite inputs.
  """
  ipc, lr_images, batch_real = check_common(
      ipc=ipc, init=init, lr_images=lr_images, batch_real=batch_real, dsa_strategy=dsa_strategy,
      preprocessing=preprocessing,
  )
  if not isinstance(dsa, bool):
    raise TypeError(f"dsa must be a bool; got {type(dsa).__name__}.")
  lr_network = _validation.check_positive_float(lr_network, "lr_network")
  if (outer_loop is None or inner_loop is None) and ipc not in LOOPS:
    raise ValueError(f"DC has no default outer_loop/inner_loop for ipc={ipc} (only {sorted(LOOPS)}); pass both.")
  default_outer, default_inner = LOOPS.get(ipc, (None, None))
  outer_loop = _validation.check_positive_int(default_outer if outer_loop is None else outer_loop, "outer_loop")
  inner_loop = _validation.check_non_negative_int(default_inner if inner_loop is None else inner_loop, "inner_loop")
  iterations, max_seconds = check_budget(iterations, max_seconds, callback)
  real = prepare_data(x, y, n_classes=n_classes)
  net, net_config = network_config(network, real.n_classes, width, depth)
  key, seed = as_key(key)

  data = class_data(real.images, real.labels, real.n_classes)
  image_shape = tuple(real.images.shape[1:])
  syn_labels = jnp.asarray(synthetic_labels(real.n_classes, ipc))
  strategy = dsa_strategy if dsa else None
  dtype = real.images.dtype
  lr_images_arr, lr_network_arr = jnp.asarray(lr_images, dtype), jnp.asarray(lr_network, dtype)

  key, k_init = jax.random.split(key)
  images = initial_images(data, k_init, ipc, init)
  state = _DCState(images, optax.sgd(lr_images, momentum=IMAGE_MOMENTUM).init(images))

  def iteration(state, key):
    return _dc_iteration(
        state, key, data, syn_labels, lr_images_arr, lr_network_arr, network=net, ipc=ipc, batch_real=batch_real,
        outer_loop=outer_loop, inner_loop=inner_loop, dsa_strategy=strategy,
    )

  state, log = run_outer_loop(iteration, state, key, iterations=iterations, max_seconds=max_seconds, callback=callback)
  config = dict(
      method="dsa" if dsa else "dc",
      ipc=ipc,
      **net_config,
      n_classes=real.n_classes,
      image_shape=list(image_shape),
      dsa=dsa,
      dsa_strategy=strategy,
      lr_images=lr_images,
      lr_network=lr_network,
      batch_real=batch_real,
      init=init,
      outer_loop=outer_loop,
      inner_loop=inner_loop,
      iterations=log.iterations,
      iterations_requested=iterations,
      stopped=log.stopped,
      seconds=log.seconds,
      seed=seed,
      preprocessing=preprocessing,
  )
  return SupervisedResult(
      images=np.asarray(state.images, np.float32),
      labels=np.asarray(syn_labels),
      config=config,
      history=log.history,
  )
