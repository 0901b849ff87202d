"""Dataset Distillation (Wang et al., 2018), random-initialisation variant.

DD learns the images *and* one step size per unrolled gradient step: a fresh network,
trained on the distilled set by ``steps x epochs`` plain gradient steps (step ``s`` of
every epoch on its own slice of the set, with its own learned step size), must classify
real data well. The outer loss is differentiated through the whole unrolled training.

This module also holds the machinery that DD, MTT and GTN share: :func:`unroll_sgd`
(differentiable plain SGD of a flax network on a labelled set) and the outer-loop driver.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree, Scalar

from udd_jax import _validation
from udd_jax.supervised import networks as networks_lib
from udd_jax.supervised.result import SupervisedResult

Callback = Callable[[int, dict[str, float]], None]


def cross_entropy(
    network: nn.Module,
    params: PyTree,
    images: Float[Array, "n H W C"],
    labels: Int[Array, " n"],
) -> Scalar:
  """Mean softmax cross-entropy of ``network`` with ``params`` on a labelled batch."""
  logits = network.apply({"params": params}, images)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def unroll_sgd(
    network: nn.Module,
    params0: PyTree,
    images: Float[Array, "n H W C"],
    labels: Int[Array, " n"],
    step_sizes: Float[Array, " T"],
    batches: Int[Array, "T b"] | None = None,
    *,
    remat: bool = False,
) -> PyTree:
  """Trains ``params0`` by ``T`` plain SGD steps on a labelled set, differentiably.

  Step ``t`` is ``p <- p - step_sizes[t] * grad CE(p; images[batches[t]], labels[batches[t]])``
  (on the whole set when ``batches`` is None), a ``lax.scan`` that JAX differentiates
  with respect to ``params0``, ``images`` and ``step_sizes``. DD, MTT and GTN all train
  their networks with it.

  Args:
    network: a flax network applied as ``network.apply({"params": p}, images)``.
    params0: the initial parameters (a pytree, as ``network.init`` gives them).
    images: the training set, ``(n, H, W, C)``.
    labels: integer labels ``(n,)``.
    step_sizes: one step size per step, ``(T,)``.
    batches: ``(T, b)`` indices into ``images``: the mini-batch of each step; None for
      full-batch steps.
    remat: recompute each step's activations in the backward pass instead of storing
      them (``jax.checkpoint``): memory of one step instead of ``T``, for long unrolls of
      wide networks.

  Returns:
    The parameters after ``T`` steps, with the structure and dtypes of ``params0``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from udd_jax.supervised.networks import MLP
    >>> net = MLP(n_classes=2, width=4)
    >>> x, y = jnp.ones((4, 3, 3, 1)), jnp.array([0, 1, 0, 1])
    >>> p0 = net.init(jax.random.key(0), x)["params"]
    >>> p = unroll_sgd(net, p0, x, y, jnp.full((5,), 0.1), jnp.array([[0, 1]] * 5))
    >>> bool(cross_entropy(net, p, x, y) < cross_entropy(net, p0, x, y))
    True
  """
  grad_fn = jax.grad(cross_entropy, argnums=1)
  images, labels = jnp.asarray(images), jnp.asarray(labels)

  def step(params, inputs):
    step_size, idx = inputs
    x, y = (images, labels) if idx is None else (images[idx], labels[idx])
    grads = grad_fn(network, params, x, y)
    # Plain SGD keeps no state, so building it with this step's (learned, traced) step
    # size costs nothing; apply_updates keeps the parameters' dtypes across steps.
    sgd = optax.sgd(step_size)
    updates, _ = sgd.update(grads, sgd.init(params), params)
    return optax.apply_updates(params, updates), None

  if remat:
    step = jax.checkpoint(step)
  params, _ = jax.lax.scan(step, params0, (step_sizes, batches))
  return params


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


def synthetic_labels(n_classes: int, ipc: int) -> np.ndarray:
  """Labels of a class-major distilled set: ``[0] * ipc + [1] * ipc + ...``."""
  return np.repeat(np.arange(n_classes, dtype=np.int32), ipc)


class LabelledData(NamedTuple):
  """Checked real data on the device: images ``(n, H, W, C)``, labels, class count."""

  images: Array
  labels: Array
  n_classes: int


def prepare_data(x: Any, y: Any, *, n_classes: int | None = None, min_per_class: int = 0) -> LabelledData:
  """Checks real images and labels and puts them on the device in JAX's default float dtype.

  Args:
    x: images ``(n, H, W)`` (grey) or ``(n, H, W, C)``, finite.
    y: integer labels ``(n,)`` in ``[0, n_classes)``.
    n_classes: number of classes; ``max(y) + 1`` when None.
    min_per_class: every class must have at least this many images.
  """
  x = _validation.check_array(x, "x", min_ndim=3)
  if x.ndim > 4:
    raise ValueError(f"x must be images (n, H, W) or (n, H, W, C); got shape {x.shape}.")
  y = _validation.check_labels(y, "y", n=x.shape[0])
  if n_classes is None:
    n_classes = int(y.max()) + 1
  n_classes = _validation.check_positive_int(n_classes, "n_classes")
  if y.max() >= n_classes:
    raise ValueError(f"y holds label {int(y.max())}, out of range for n_classes={n_classes}.")
  counts = np.bincount(y, minlength=n_classes)
  if counts.min() < max(min_per_class, 1):
    c = int(np.argmin(counts))
    raise ValueError(f"class {c} has {counts[c]} example(s) in y; at least {max(min_per_class, 1)} needed.")
  images = jnp.asarray(networks_lib.as_images(x), dtype=jnp.result_type(float))
  return LabelledData(images, jnp.asarray(y), n_classes)


def as_key(key: Any) -> tuple[PRNGKeyArray, Any]:
  """A typed PRNG key from an int seed or a key, and its JSON record for ``config["seed"]``."""
  if isinstance(key, numbers.Integral) and not isinstance(key, bool):
    return jax.random.key(int(key)), int(key)
  if isinstance(key, jax.Array):
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ():
      return key, np.asarray(jax.random.key_data(key)).tolist()
    if key.dtype == jnp.uint32 and key.shape == (2,):  # a raw jax.random.PRNGKey
      return jax.random.wrap_key_data(key), np.asarray(key).tolist()
  raise TypeError(f"key must be an int seed or a single jax.random.key; got {key!r}.")


def init_params(network: nn.Module, key: PRNGKeyArray, image_shape: tuple[int, ...]) -> PyTree:
  """Fresh parameters of ``network`` for images of ``image_shape`` (in JAX's default float dtype).

  The params depend only on the key and the input shape, never on input values, so the
  outer gradient never flows through an init.
  """
  params = network.init(key, jnp.zeros((1, *image_shape)))["params"]
  return jax.tree.map(lambda p: p.astype(jnp.result_type(float)), params)


def check_budget(iterations: Any, max_seconds: Any, callback: Any) -> tuple[int, float | None]:
  """Checks the shared budget options of the long-running methods."""
  iterations = _validation.check_positive_int(iterations, "iterations")
  if max_seconds is not None:
    max_seconds = _validation.check_positive_float(max_seconds, "max_seconds")
  if callback is not None and not callable(callback):
    raise TypeError(f"callback must be callable as callback(iteration, record); got {type(callback).__name__}.")
  return iterations, max_seconds


class RunLog(NamedTuple):
  """What :func:`run_outer_loop` hands back besides the final state."""

  history: list[dict[str, float]]
  iterations: int
  seconds: float
  stopped: str  # "iterations", "max_seconds" or "non_finite_loss"


def run_outer_loop(
    step: Callable[[Any, PRNGKeyArray], tuple[Any, dict[str, Array]]],
    state: Any,
    key: PRNGKeyArray,
    *,
    iterations: int,
    max_seconds: float | None,
    callback: Callback | None,
) -> tuple[Any, RunLog]:
  """Runs ``state, metrics = step(state, key_i)`` for the budget; logs every iteration.

  ``metrics`` must hold ``"loss"``, the outer loss at the state *entering* the step. A
  non-finite loss condemns that state (the previous update diverged), so the loop stops
  and returns the state before it, the last one seen with a finite loss, rather than
  losing the run. ``RunLog.iterations`` counts the updates in the returned state.
  """
  history: list[dict[str, float]] = []
  start = time.perf_counter()
  stopped, done = "iterations", 0
  finite_state, finite_done = state, 0
  for i in range(1, iterations + 1):
    key, sub = jax.random.split(key)
    new_state, metrics = step(state, sub)
    record = {"iteration": i, **{k: float(v) for k, v in metrics.items()}, "seconds": time.perf_counter() - start}
    if not math.isfinite(record["loss"]):
      stopped, state, done = "non_finite_loss", finite_state, finite_done
      break
    finite_state, finite_done = state, done
    state, done = new_state, i
    history.append(record)
    if callback is not None:
      callback(i, record)
    if max_seconds is not None and record["seconds"] >= max_seconds:
      stopped = "max_seconds"
      break
  return state, RunLog(history, done, time.perf_counter() - start, stopped)


def network_config(name: str, n_classes: int, width: int, depth: int) -> tuple[nn.Module, dict[str, Any]]:
  """The network and its record in ``config`` (``network``, ``width``, ``depth``)."""
  network = networks_lib.get_network(name, n_classes, width=width, depth=depth)
  return network, {"network": name, "width": width, "depth": depth}


class _DDState(NamedTuple):
  syn: dict[str, Array]  # {"images": (n, H, W, C), "log_step_sizes": (steps * epochs,)}
  opt_state: optax.OptState


def _make_dd_step(network, optimizer, syn_labels, batches, *, n_inits, batch_real, image_shape):
  def outer_loss(syn, init_keys, x_real, y_real):
    step_sizes = jnp.exp(syn["log_step_sizes"])

    def one_init(key):
      params = unroll_sgd(network, init_params(network, key, image_shape), syn["images"], syn_labels, step_sizes, batches)
      return cross_entropy(network, params, x_real, y_real)

    return jax.vmap(one_init)(init_keys).mean()

  @jax.jit
  def dd_step(state, key, x, y):
    k_init, k_real = jax.random.split(key)
    idx = jax.random.choice(k_real, x.shape[0], (batch_real,), replace=False)
    loss, grads = jax.value_and_grad(outer_loss)(state.syn, jax.random.split(k_init, n_inits), x[idx], y[idx])
    updates, opt_state = optimizer.update(grads, state.opt_state, state.syn)
    return _DDState(optax.apply_updates(state.syn, updates), opt_state), {"loss": loss}

  return dd_step


def distill_dd(
    x: Float[ArrayLike, "n H W C"],
    y: Int[ArrayLike, " n"],
    *,
    ipc: int,
    key: PRNGKeyArray | int,
    network: str = "lenet",
    width: int = 128,
    depth: int = 3,
    steps: int = 10,
    epochs: int = 3,
    n_inits: int = 2,
    iterations: int = 400,
    lr_images: float = 0.01,
    lr_step_sizes: float = 0.01,
    init_lr: float = 0.01,
    batch_real: int = 256,
    n_classes: int | None = None,
    max_seconds: float | None = None,
    callback: Callback | None = None,
) -> SupervisedResult:
  """Dataset Distillation with random inits (Wang et al., 2018): images and per-step step sizes.

  The set holds ``ipc`` images per class, initialised from N(0, 1) (the paper's random
  init; real images are expected standardised). Each iteration samples ``n_inits`` fresh
  network inits, trains each (vmapped) by ``steps x epochs`` SGD steps on the set laid
  out by :func:`step_batches`, step ``t`` with its own step size ``exp(log_step_size[t])``,
  and takes the mean cross-entropy of the trained networks on a real batch as the loss;
  Adam updates the images and the log step sizes. :func:`retrain_dd` re-trains a network
  with the learned recipe.

  Args:
    x: real images ``(n, H, W)`` or ``(n, H, W, C)``, in the networks' input space.
    y: integer labels ``(n,)``.
    ipc: images per class of the distilled set.
    key: PRNG key or int seed.
    network: ``"lenet"`` (DD's), ``"convnet"`` or ``"mlp"``.
    width: ConvNet channels / MLP hidden units.
    depth: ConvNet blocks.
    steps: gradient steps per epoch over the set.
    epochs: passes over the set; ``steps * epochs`` learned step sizes.
    n_inits: fresh network inits per iteration (each costs one unrolled training and its
      backward pass: about 1.4 s of CPU per init at ipc 10 with LeNet on MNIST).
    iterations: outer iterations.
    lr_images: Adam step size on the images.
    lr_step_sizes: Adam step size on the log step sizes.
    init_lr: initial value of every step size.
    batch_real: real images per iteration (at most ``n``).
    n_classes: number of classes; ``max(y) + 1`` when None.
    max_seconds: stop after this many seconds (checked between iterations).
    callback: called as ``callback(iteration, record)`` after every iteration.

  Returns:
    A :class:`SupervisedResult` with the class-major images and labels, the learned step
    sizes ``(steps * epochs,)`` in ``step_sizes``, and the loss per iteration in ``history``.
  """
  data = prepare_data(x, y, n_classes=n_classes)
  ipc = _validation.check_positive_int(ipc, "ipc")
  key, seed = as_key(key)
  steps = _validation.check_positive_int(steps, "steps")
  epochs = _validation.check_positive_int(epochs, "epochs")
  n_inits = _validation.check_positive_int(n_inits, "n_inits")
  batch_real = min(_validation.check_positive_int(batch_real, "batch_real"), data.images.shape[0])
  lr_images = _validation.check_positive_float(lr_images, "lr_images")
  lr_step_sizes = _validation.check_positive_float(lr_step_sizes, "lr_step_sizes", allow_zero=True)
  init_lr = _validation.check_positive_float(init_lr, "init_lr")
  iterations, max_seconds = check_budget(iterations, max_seconds, callback)
  net, net_record = network_config(network, data.n_classes, width, depth)

  image_shape = tuple(data.images.shape[1:])
  syn_labels = synthetic_labels(data.n_classes, ipc)
  batches = np.tile(step_batches(data.n_classes, ipc, steps), (epochs, 1))
  key, k_images = jax.random.split(key)
  syn = {
      "images": jax.random.normal(k_images, (len(syn_labels), *image_shape), dtype=data.images.dtype),
      "log_step_sizes": jnp.full((steps * epochs,), math.log(init_lr), dtype=data.images.dtype),
  }
  optimizer = optax.partition(
      {"images": optax.adam(lr_images), "log_step_sizes": optax.adam(lr_step_sizes)},
      {"images": "images", "log_step_sizes": "log_step_sizes"},
  )
  dd_step = _make_dd_step(
      net, optimizer, jnp.asarray(syn_labels), jnp.asarray(batches),
      n_inits=n_inits, batch_real=batch_real, image_shape=image_shape,
  )
  state, log = run_outer_loop(
      lambda s, k: dd_step(s, k, data.images, data.labels),
      _DDState(syn, optimizer.init(syn)), key,
      iterations=iterations, max_seconds=max_seconds, callback=callback,
  )
  config = {
      "method": "dd", "ipc": ipc, **net_record, "n_classes": data.n_classes, "image_shape": list(image_shape),
      "steps": steps, "epochs": epochs, "n_inits": n_inits, "lr_images": lr_images,
      "lr_step_sizes": lr_step_sizes, "init_lr": init_lr, "batch_real": batch_real, "init": "noise",
      "iterations": log.iterations, "max_iterations": iterations, "max_seconds": max_seconds,
      "stopped": log.stopped, "seconds": log.seconds, "preprocessing": "none", "seed": seed,
  }
  return SupervisedResult(
      images=np.asarray(state.syn["images"], dtype=np.float32),
      labels=syn_labels,
      config=config,
      history=log.history,
      step_sizes=np.asarray(jnp.exp(state.syn["log_step_sizes"]), dtype=np.float32),
  )


def retrain_dd(result: SupervisedResult, key: PRNGKeyArray | int) -> PyTree:
  """Trains a fresh network on a DD result with exactly its learned recipe (DD's evaluation).

  The network of ``result.config`` starts from the init drawn with ``key`` and takes
  ``steps x epochs`` plain SGD steps on the images, step ``t`` on the slice of
  :func:`step_batches` with step size ``result.step_sizes[t]``.

  Args:
    result: what :func:`distill_dd` returned.
    key: PRNG key or int seed of the network's init.

  Returns:
    The trained network's parameters; apply them with
    ``get_network(config["network"], config["n_classes"], ...)``.
  """
  if not isinstance(result, SupervisedResult) or result.config.get("method") != "dd":
    raise TypeError("result must be the SupervisedResult of distill_dd (config['method'] == 'dd').")
  key, _ = as_key(key)
  cfg = result.config
  net, _ = network_config(cfg["network"], cfg["n_classes"], cfg["width"], cfg["depth"])
  batches = np.tile(step_batches(cfg["n_classes"], cfg["ipc"], cfg["steps"]), (cfg["epochs"], 1))
  dtype = jnp.result_type(float)
  train = jax.jit(lambda p0, images, labels, lrs: unroll_sgd(net, p0, images, labels, lrs, jnp.asarray(batches)))
  return train(
      init_params(net, key, tuple(result.images.shape[1:])),
      jnp.asarray(result.images, dtype),
      jnp.asarray(result.labels),
      jnp.asarray(result.step_sizes, dtype),
  )
