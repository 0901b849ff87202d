"""Kernel Inducing Points (KIP; Nguyen, Chen & Lee, ICLR 2021; Nguyen et al., NeurIPS 2021).

KIP learns a small labelled support set ``(X_s, y_s)`` such that kernel ridge regression
(KRR) fitted on it predicts the labels of real data:

  ``L(X_s, y_s) = 0.5 * mean || K_ts (K_ss + lambda I)^-1 y_s - y_t ||^2``,
  ``lambda = reg * trace(K_ss) / n_s``,

over random class-balanced target batches ``(X_t, y_t)`` of the real data, with Adam on
the support images and (optionally) on the support labels, which start as mean-centred
one-hot vectors (``0.9`` / ``-0.1`` for ten classes). The kernel is the infinite-width
NTK or NNGP of a fully connected or convolutional ReLU network
(:mod:`udd_jax.supervised.kernels`). A distilled set is evaluated by KRR with the same
kernel (:func:`kip_accuracy`) or by training networks on it (``labels`` are float
targets, which ``evaluate_synset`` fits by mean squared error, as KIP does).

Examples:
  >>> import jax, jax.numpy as jnp
  >>> x = jnp.concatenate([jnp.zeros((5, 4, 4, 1)), jnp.ones((5, 4, 4, 1))])
  >>> y = jnp.array([0] * 5 + [1] * 5)
  >>> result = distill_kip(x, y, ipc=1, key=jax.random.key(0), iterations=3)
  >>> result.images.shape, result.labels.shape
  ((2, 4, 4, 1), (2, 2))
  >>> kip_accuracy(result, (x, y))
  1.0
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from udd_jax import _validation
from udd_jax.data import Preprocessing, fit_preprocessing
from udd_jax.supervised.kernels import KERNELS, KINDS, KernelFn, get_kernel
from udd_jax.supervised.networks import as_images
from udd_jax.supervised.result import SupervisedResult

INITS = ("real", "noise")
# Target-batch defaults: the conv kernel holds (n_support, n_target, H, W) arrays per layer.
DEFAULT_BATCH_TARGET = {"fc": 1000, "conv": 100}
DEFAULT_DEPTH = {"fc": 1, "conv": 3}


class KipState(NamedTuple):
  """The support set being learned and the optimiser's state.

  Attributes:
    images: support images ``(n_s, H, W, C)``.
    labels: support label vectors ``(n_s, n_classes)``.
    opt_state: optax state over ``(images, labels)`` when labels are learned, else over ``images``.
  """

  images: jax.Array
  labels: jax.Array
  opt_state: optax.OptState


def centred_one_hot(labels: Int[ArrayLike, " n"], n_classes: int) -> Float[Array, "n n_classes"]:
  """KIP's label vectors: one-hot minus ``1 / n_classes`` (``0.9`` / ``-0.1`` for ten classes).

  Examples:
    >>> centred_one_hot(jnp.array([1]), 4).tolist()
    [[-0.25, 0.75, -0.25, -0.25]]
  """
  return jax.nn.one_hot(labels, n_classes) - 1.0 / n_classes


def _ridge_solve(k_ss: jax.Array, y_s: jax.Array, reg: float | jax.Array) -> jax.Array:
  """``(K_ss + reg * trace(K_ss) / n_s * I)^-1 y_s``; the relative ridge keeps ``reg`` scale-free."""
  n_s = k_ss.shape[0]
  ridge = reg * jnp.trace(k_ss) / n_s
  return jax.scipy.linalg.solve(k_ss + ridge * jnp.eye(n_s, dtype=k_ss.dtype), y_s, assume_a="pos")


def kip_loss(
    x_support: Float[Array, "n_s ..."],
    y_support: Float[Array, "n_s n_classes"],
    x_target: Float[Array, "n_t ..."],
    y_target: Float[Array, "n_t n_classes"],
    *,
    kernel_fn: KernelFn,
    reg: float | jax.Array = 1e-6,
) -> Float[Array, ""]:
  """KIP's KRR loss ``0.5 * mean((K_ts (K_ss + lambda I)^-1 y_s - y_t)^2)``, ``lambda = reg * tr(K_ss) / n_s``.

  The mean runs over targets and label components, as in KIP's code.

  Args:
    x_support: support inputs.
    y_support: support label vectors.
    x_target: target inputs (same trailing shape as ``x_support``).
    y_target: target label vectors (same encoding as ``y_support``).
    kernel_fn: ``k(x1, x2) -> (n1, n2)``, e.g. from :func:`udd_jax.supervised.kernels.get_kernel`.
    reg: ridge regularisation, relative to the mean diagonal of ``K_ss``.

  Returns:
    The scalar loss.

  Examples:
    >>> from udd_jax.supervised.kernels import get_kernel
    >>> x = jnp.eye(3)
    >>> y = centred_one_hot(jnp.arange(3), 3)
    >>> loss = kip_loss(x, y, x, y, kernel_fn=get_kernel("fc"), reg=1e-6)
    >>> bool(loss < 1e-8)
    True
  """
  if y_support.ndim != 2 or y_target.ndim != 2 or y_support.shape[1] != y_target.shape[1]:
    raise ValueError(f"y_support and y_target must be label vectors (n, n_classes) with equal n_classes; got {y_support.shape} and {y_target.shape}.")
  if y_support.shape[0] != x_support.shape[0] or y_target.shape[0] != x_target.shape[0]:
    raise ValueError(f"labels and inputs disagree in length: x_support {x_support.shape} / y_support {y_support.shape}, x_target {x_target.shape} / y_target {y_target.shape}.")
  k_ss = kernel_fn(x_support, x_support)
  k_ts = kernel_fn(x_target, x_support)
  pred = k_ts @ _ridge_solve(k_ss, y_support, reg)
  return 0.5 * jnp.mean(jnp.square(pred - y_target))


def kip_init(
    images: Float[ArrayLike, "n_s H W C"],
    labels: Float[ArrayLike, "n_s n_classes"],
    optimizer: optax.GradientTransformation,
    *,
    learn_labels: bool = True,
) -> KipState:
  """The initial :class:`KipState` of a support set, with ``optimizer`` initialised on what is learned."""
  images, labels = jnp.asarray(images), jnp.asarray(labels)
  return KipState(images, labels, optimizer.init((images, labels) if learn_labels else images))


def kip_step(
    state: KipState,
    x_target: Float[Array, "n_t H W C"],
    y_target: Float[Array, "n_t n_classes"],
    *,
    kernel_fn: KernelFn,
    optimizer: optax.GradientTransformation,
    reg: float | jax.Array = 1e-6,
    learn_labels: bool = True,
) -> tuple[KipState, Float[Array, ""]]:
  """One optimiser step of the support set on :func:`kip_loss` for one target batch.

  Pure: ``jax.jit(functools.partial(kip_step, kernel_fn=..., optimizer=...))`` is the
  training step :func:`distill_kip` runs.

  Returns:
    The updated state and the loss before the update.
  """

  def loss_fn(params):
    images, labels = params if learn_labels else (params, state.labels)
    return kip_loss(images, labels, x_target, y_target, kernel_fn=kernel_fn, reg=reg)

  params = (state.images, state.labels) if learn_labels else state.images
  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = optimizer.update(grads, state.opt_state, params)
  params = optax.apply_updates(params, updates)
  images, labels = params if learn_labels else (params, state.labels)
  return KipState(images, labels, opt_state), loss


def krr_predict(
    x_support: Float[ArrayLike, "n_s ..."],
    y_support: Float[ArrayLike, "n_s n_classes"],
    x_query: Float[ArrayLike, "n_q ..."],
    kernel_fn: KernelFn,
    *,
    reg: float = 1e-6,
    block_size: int = 1000,
) -> Float[Array, "n_q n_classes"]:
  """Kernel ridge regression fitted on the support set, evaluated on ``x_query`` in blocks.

  Args:
    x_support: support inputs.
    y_support: support targets ``(n_s, n_classes)`` (or ``(n_s,)``).
    x_query: query inputs, same trailing shape.
    kernel_fn: the kernel ``k(x1, x2) -> (n1, n2)``.
    reg: ridge regularisation, relative to the mean diagonal of ``K_ss`` (as in :func:`kip_loss`).
    block_size: queries per kernel evaluation (the last block is padded, so one compilation).

  Returns:
    The predictions ``K_qs (K_ss + lambda I)^-1 y_s``.

  Examples:
    >>> from udd_jax.supervised.kernels import get_kernel
    >>> x = jnp.eye(2)
    >>> pred = krr_predict(x, jnp.array([[1.0], [-1.0]]), x, get_kernel("fc"), reg=1e-9)
    >>> [round(float(v), 4) for v in pred[:, 0]]
    [1.0, -1.0]
  """
  reg = _validation.check_positive_float(reg, "reg", allow_zero=True)
  block_size = _validation.check_positive_int(block_size, "block_size")
  x_support, y_support, x_query = jnp.asarray(x_support), jnp.asarray(y_support), jnp.asarray(x_query)
  if x_query.shape[1:] != x_support.shape[1:]:
    raise ValueError(f"x_query must have the support's trailing shape {x_support.shape[1:]}; got {x_query.shape}.")
  alpha = _krr_fit(x_support, y_support, reg, kernel_fn=kernel_fn)
  n = x_query.shape[0]
  block = min(block_size, n)
  n_blocks = -(-n // block)
  padded = jnp.concatenate([x_query, jnp.zeros((n_blocks * block - n, *x_query.shape[1:]), x_query.dtype)])
  preds = [_krr_apply(x_support, alpha, padded[i * block : (i + 1) * block], kernel_fn=kernel_fn) for i in range(n_blocks)]
  return jnp.concatenate(preds)[:n]


# Kernels are static arguments: get_kernel returns one cached function per configuration.
@functools.partial(jax.jit, static_argnames="kernel_fn")
def _krr_fit(x_support, y_support, reg, *, kernel_fn):
  return _ridge_solve(kernel_fn(x_support, x_support), y_support, reg)


@functools.partial(jax.jit, static_argnames="kernel_fn")
def _krr_apply(x_support, alpha, x_block, *, kernel_fn):
  return kernel_fn(x_block, x_support) @ alpha


@dataclasses.dataclass(frozen=True, eq=False)
class KipPreprocessing:
  """KIP's regularised ZCA: per-image "layer norm", then ZCA whitening.

  Each flattened image is centred on its own mean and scaled to unit norm, then whitened
  by ``zca``, the library's :class:`udd_jax.Preprocessing` fitted on the normalised
  training images (``U diag((lambda + zca_reg * mean(lambda))^-1/2) U^T``, the same
  relative regulariser as KIP). One difference from KIP's code: ``zca`` subtracts the
  training mean of the normalised images before whitening, while KIP whitens with the
  uncentred second-moment matrix and keeps the mean.

  Attributes:
    zca: the fitted whitening (``method == "zca"``).
    layer_norm: whether images are centred and normalised one by one first.
  """

  zca: Preprocessing
  layer_norm: bool = True

  def apply(self, x: Float[ArrayLike, "n ..."]) -> np.ndarray:
    """Preprocesses images ``(n, *image_shape)``; returns float32 of the same shape."""
    x = _validation.check_array(x, "x", min_ndim=2)
    if tuple(x.shape[1:]) != self.zca.image_shape:
      raise ValueError(f"x must have shape (n, {', '.join(map(str, self.zca.image_shape))}); got {x.shape}.")
    flat = x.reshape(x.shape[0], -1).astype(np.float64)
    if self.layer_norm:
      flat = _layer_norm(flat)
    return self.zca.apply(flat.reshape(x.shape)).reshape(x.shape)

  def config(self) -> dict[str, Any]:
    """The JSON-serialisable parameters (recorded in a result's ``config["preprocessing"]``)."""
    return {"method": "kip_zca", "zca_reg": self.zca.zca_reg, "layer_norm": self.layer_norm, "centred": True}


def _layer_norm(flat: np.ndarray) -> np.ndarray:
  flat = flat - flat.mean(axis=1, keepdims=True)
  norms = np.linalg.norm(flat, axis=1, keepdims=True)
  return flat / np.where(norms > 0, norms, 1.0)


def kip_preprocessing(x_train: Float[ArrayLike, "n ..."], *, zca_reg: float = 0.1, layer_norm: bool = True) -> KipPreprocessing:
  """Fits KIP's regularised ZCA preprocessing (:class:`KipPreprocessing`) on training images.

  KIP uses it for RGB datasets; for grey datasets (MNIST, Fashion-MNIST) the KIP papers
  use channel-wise standardisation instead.

  Args:
    x_train: training images ``(n, *image_shape)``.
    zca_reg: ZCA regularisation relative to the mean eigenvalue (KIP: 0.1).
    layer_norm: centre and normalise each image before whitening, as KIP does.

  Returns:
    The fitted preprocessing; apply it to training and test images alike.

  Examples:
    >>> import numpy as np
    >>> x = np.random.default_rng(0).uniform(size=(50, 4, 4))
    >>> prep = kip_preprocessing(x)
    >>> prep.apply(x).shape, prep.config()["zca_reg"]
    ((50, 4, 4), 0.1)
  """
  x = _validation.check_array(x_train, "x_train", min_ndim=2)
  if not isinstance(layer_norm, bool):
    raise TypeError(f"layer_norm must be a bool; got {type(layer_norm).__name__}.")
  flat = x.reshape(x.shape[0], -1).astype(np.float64)
  if layer_norm:
    flat = _layer_norm(flat)
  return KipPreprocessing(fit_preprocessing(flat.reshape(x.shape), method="zca", zca_reg=zca_reg), layer_norm)


def _as_key(key: Any) -> jax.Array:
  if isinstance(key, numbers.Integral) and not isinstance(key, bool):
    return jax.random.key(int(key))
  if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  raise TypeError(f"key must be a PRNG key (jax.random.key(seed)) or an integer seed; got {type(key).__name__}.")


def _key_record(key: jax.Array) -> list[int]:
  return np.asarray(jax.random.key_data(key)).ravel().tolist()


def _preprocessing_record(preprocessing: Any) -> Any:
  if preprocessing is None:
    return "none"
  if isinstance(preprocessing, KipPreprocessing):
    return preprocessing.config()
  if isinstance(preprocessing, Preprocessing):
    return {"method": preprocessing.method, "zca_reg": preprocessing.zca_reg}
  if isinstance(preprocessing, dict):
    return preprocessing
  raise TypeError(f"preprocessing must be a KipPreprocessing, a udd_jax.Preprocessing, a dict describing it, or None; got {type(preprocessing).__name__}.")


def _class_table(y: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """Indices of each class padded to a rectangle ``(n_classes, max_count)``, and the counts."""
  counts = np.bincount(y, minlength=n_classes)
  table = np.zeros((n_classes, counts.max()), np.int32)
  for c in range(n_classes):
    table[c, : counts[c]] = np.flatnonzero(y == c)
  return table, counts.astype(np.int32)


def _sample_balanced(key: jax.Array, table: jax.Array, counts: jax.Array, per_class: int) -> jax.Array:
  """``per_class`` indices drawn uniformly (with replacement) from every class."""
  u = jax.random.uniform(key, (table.shape[0], per_class))
  rows = jnp.minimum((u * counts[:, None]).astype(jnp.int32), counts[:, None] - 1)
  return jnp.take_along_axis(table, rows, axis=1).ravel()


@functools.partial(jax.jit, static_argnames=("kernel_fn", "learn_labels", "per_class"))
def _train_step(state, step_key, data, table, counts, hyper, *, kernel_fn, learn_labels, per_class):
  """Samples a class-balanced target batch and takes one :func:`kip_step`.

  The learning rate and ridge are traced, so runs that differ only in them share one compilation.
  """
  lr, reg = hyper
  idx = _sample_balanced(step_key, table, counts, per_class)
  x, y = data
  return kip_step(state, x[idx], y[idx], kernel_fn=kernel_fn, optimizer=optax.adam(lr), reg=reg, learn_labels=learn_labels)


def distill_kip(
    x: Float[ArrayLike, "n H W *C"],
    y: Int[ArrayLike, " n"],
    *,
    ipc: int,
    key: PRNGKeyArray | int,
    kernel: str = "fc",
    kind: str = "ntk",
    depth: int | None = None,
    w_var: float = 2.0,
    b_var: float = 1e-4,
    filter_size: int = 3,
    iterations: int = 1000,
    lr: float = 0.01,
    batch_target: int | None = None,
    learn_labels: bool = True,
    reg: float = 1e-6,
    init: str = "real",
    block_size: int | None = None,
    preprocessing: Any = None,
    max_seconds: float | None = None,
    log_every: int = 10,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> SupervisedResult:
  """Distils labelled images into ``ipc`` images per class with Kernel Inducing Points.

  Every iteration draws a class-balanced target batch from ``(x, y)`` and takes one Adam
  step on the support images (and labels) along the gradient of :func:`kip_loss`; the
  step is one jitted function, compiled once.

  Args:
    x: real images ``(n, H, W)`` or ``(n, H, W, C)``, already preprocessed (e.g. by
      :func:`kip_preprocessing` or channel-wise standardisation); the distilled images
      live in the same space.
    y: integer labels ``(n,)`` in ``[0, n_classes)``; every class must occur.
    ipc: images per class (>= 1).
    key: PRNG key (or integer seed) for the initial support set and the target batches.
    kernel: ``"fc"`` (fully connected) or ``"conv"`` (ConvNet with flatten readout).
    kind: ``"ntk"`` or ``"nngp"``.
    depth: hidden layers of the FC network / convolution blocks of the ConvNet
      (default 1 for ``"fc"``, 3 for ``"conv"``).
    w_var: weight variance of the kernel's network.
    b_var: bias variance (KIP: ``1e-4``).
    filter_size: convolution filter side (``"conv"`` only).
    iterations: optimiser steps (the budget).
    lr: Adam learning rate (KIP: 0.01 on MNIST).
    batch_target: real images per target batch, rounded down to a multiple of the number
      of classes (default 1000 for ``"fc"``, 100 for ``"conv"``, at most ``n``).
    learn_labels: also learn the support labels.
    reg: ridge regularisation, relative to the mean diagonal of ``K_ss``.
    init: ``"real"`` (random real images of each class) or ``"noise"`` (Gaussian noise
      with the data's per-pixel mean and standard deviation).
    block_size: compute kernels ``block_size`` rows at a time (memory for ``"conv"``).
    preprocessing: how ``x`` was preprocessed, recorded in ``config["preprocessing"]``
      (a :class:`KipPreprocessing`, a ``udd_jax.Preprocessing`` or a JSON dict).
    max_seconds: stop after this many seconds even if ``iterations`` are not done.
    log_every: log the loss every this many iterations (and at the last one).
    callback: called as ``callback(iteration, record)`` with every logged record.

  Returns:
    A :class:`SupervisedResult` with float32 ``images`` ``(ipc * n_classes, H, W, C)`` and
    float32 label vectors ``(ipc * n_classes, n_classes)``; ``config`` holds every option,
    ``kernel_options`` (for :func:`kip_accuracy`), the iterations done and the seconds.

  Raises:
    ValueError, TypeError: bad arguments, before anything is compiled.
  """
  ipc = _validation.check_positive_int(ipc, "ipc")
  key = _as_key(key)
  kernel = _validation.check_choice(kernel, "kernel", KERNELS)
  kind = _validation.check_choice(kind, "kind", KINDS)
  depth = DEFAULT_DEPTH[kernel] if depth is None else _validation.check_positive_int(depth, "depth")
  iterations = _validation.check_positive_int(iterations, "iterations")
  lr = _validation.check_positive_float(lr, "lr")
  reg = _validation.check_positive_float(reg, "reg", allow_zero=True)
  init = _validation.check_choice(init, "init", INITS)
  log_every = _validation.check_positive_int(log_every, "log_every")
  if not isinstance(learn_labels, bool):
    raise TypeError(f"learn_labels must be a bool; got {type(learn_labels).__name__}.")
  if max_seconds is not None:
    max_seconds = _validation.check_positive_float(max_seconds, "max_seconds")
  if callback is not None and not callable(callback):
    raise TypeError(f"callback must be callable; got {type(callback).__name__}.")
  record_prep = _preprocessing_record(preprocessing)
  x_np = _validation.check_array(x, "x", floating=True)
  if x_np.ndim not in (3, 4):
    raise ValueError(f"x must be images (n, H, W) or (n, H, W, C); got shape {x_np.shape}.")
  x_np = np.asarray(as_images(x_np.astype(np.float32) if x_np.dtype.kind != "f" else x_np))
  y_np = _validation.check_labels(y, "y", n=x_np.shape[0])
  n_classes = int(y_np.max()) + 1
  counts = np.bincount(y_np, minlength=n_classes)
  if np.any(counts == 0):
    raise ValueError(f"y has no example of class(es) {np.flatnonzero(counts == 0).tolist()}; labels must be 0..n_classes-1 with every class present.")
  if init == "real" and np.any(counts < ipc):
    raise ValueError(f"ipc={ipc} exceeds the examples of class {int(np.argmin(counts))} ({int(counts.min())}) for init='real'.")
  kernel_options = {"depth": depth, "kind": kind, "w_var": w_var, "b_var": b_var}
  if kernel == "conv":
    kernel_options["filter_size"] = filter_size
  kernel_fn = get_kernel(kernel, block_size=block_size, **kernel_options)
  kernel_options = {k: (float(v) if k in ("w_var", "b_var") else v) for k, v in kernel_options.items()}
  if batch_target is None:
    batch_target = min(DEFAULT_BATCH_TARGET[kernel], x_np.shape[0])
  batch_target = _validation.check_positive_int(batch_target, "batch_target")
  if batch_target < n_classes:
    raise ValueError(f"batch_target must be at least the number of classes ({n_classes}) for class-balanced batches; got {batch_target}.")
  per_class = batch_target // n_classes

  k_init, k_run = jax.random.split(key)
  if init == "real":
    rng = np.random.default_rng(np.asarray(jax.random.key_data(k_init)).ravel())
    chosen = np.concatenate([rng.choice(np.flatnonzero(y_np == c), ipc, replace=False) for c in range(n_classes)])
    images0 = x_np[chosen]
  else:
    noise = np.asarray(jax.random.normal(k_init, (ipc * n_classes, *x_np.shape[1:])))
    images0 = (x_np.mean(axis=0) + x_np.std(axis=0) * noise).astype(x_np.dtype)
  support_classes = np.repeat(np.arange(n_classes), ipc)
  labels0 = centred_one_hot(jnp.asarray(support_classes), n_classes).astype(x_np.dtype)

  state = kip_init(images0, labels0, optax.adam(lr), learn_labels=learn_labels)
  data = (jnp.asarray(x_np), centred_one_hot(jnp.asarray(y_np), n_classes).astype(x_np.dtype))
  table, table_counts = (jnp.asarray(a) for a in _class_table(y_np, n_classes))
  hyper = (jnp.asarray(lr, x_np.dtype), jnp.asarray(reg, x_np.dtype))
  train_step = functools.partial(_train_step, kernel_fn=kernel_fn, learn_labels=learn_labels, per_class=per_class)

  history: list[dict[str, float]] = []
  start = time.perf_counter()
  done = 0
  for it in range(iterations):
    state, loss = train_step(state, jax.random.fold_in(k_run, it), data, table, table_counts, hyper)
    done = it + 1
    if max_seconds is not None:
      loss.block_until_ready()  # so that the clock measures the work, not its dispatch
    out_of_time = max_seconds is not None and time.perf_counter() - start >= max_seconds
    if it % log_every == 0 or done == iterations or out_of_time:
      loss = float(loss)
      if not np.isfinite(loss):
        raise FloatingPointError(f"KIP loss became {loss} at iteration {it}; lower lr or raise reg.")
      record = {"iteration": float(it), "loss": loss, "seconds": time.perf_counter() - start}
      history.append(record)
      if callback is not None:
        callback(it, record)
    if out_of_time:
      break
  images = np.asarray(state.images, np.float32)
  labels = np.asarray(state.labels, np.float32)
  seconds = time.perf_counter() - start

  config = {
      "method": "kip",
      "ipc": ipc,
      "network": f"{kernel}-{kind}",
      "kernel": kernel,
      "kernel_options": kernel_options,
      "n_classes": n_classes,
      "iterations": done,
      "iterations_requested": iterations,
      "lr": lr,
      "optimizer": "adam",
      "batch_target": per_class * n_classes,
      "learn_labels": learn_labels,
      "label_encoding": "one_hot_minus_mean",
      "reg": reg,
      "init": init,
      "block_size": block_size,
      "max_seconds": max_seconds,
      "seconds": seconds,
      "seed": _key_record(key),
      "preprocessing": record_prep,
  }
  return SupervisedResult(images=images, labels=labels, config=config, history=history)


def kip_accuracy(
    result: SupervisedResult,
    test: tuple[ArrayLike, ArrayLike],
    *,
    reg: float | None = None,
    block_size: int = 1000,
    kernel_fn: KernelFn | None = None,
) -> float:
  """KRR test accuracy of a distilled set, with the kernel it was distilled with.

  Args:
    result: a :func:`distill_kip` result (or any result whose ``config`` has ``kernel`` and
      ``kernel_options``; integer ``labels`` are turned into centred one-hot vectors).
    test: ``(x_test, y_test)`` in the same preprocessed space as the distilled images.
    reg: ridge regularisation (default: the one the set was distilled with).
    block_size: test images per kernel evaluation.
    kernel_fn: another kernel to evaluate with (cross-kernel transfer).

  Returns:
    The fraction of test images whose arg-max KRR prediction is their label.
  """
  if not isinstance(result, SupervisedResult):
    raise TypeError(f"result must be a SupervisedResult; got {type(result).__name__}.")
  x_test, y_test = _validation.check_labelled(test, "test")
  x_test = np.asarray(as_images(x_test)) if x_test.ndim == 3 else x_test
  if x_test.shape[1:] != result.images.shape[1:]:
    raise ValueError(f"test x must have the distilled images' shape (n, {', '.join(map(str, result.images.shape[1:]))}); got {x_test.shape}.")
  if kernel_fn is None:
    if "kernel" not in result.config or "kernel_options" not in result.config:
      raise ValueError("result.config has no 'kernel'/'kernel_options'; pass kernel_fn.")
    kernel_fn = get_kernel(result.config["kernel"], **result.config["kernel_options"])
  if reg is None:
    reg = float(result.config.get("reg", 1e-6))
  labels = jnp.asarray(result.labels)
  if labels.ndim == 1:
    labels = centred_one_hot(labels, int(max(labels.max(), y_test.max())) + 1)
  if y_test.max() >= labels.shape[1]:
    raise ValueError(f"test y has label {int(y_test.max())} but the distilled labels cover {labels.shape[1]} classes.")
  images = jnp.asarray(result.images)
  pred = krr_predict(images, labels.astype(images.dtype), jnp.asarray(x_test, images.dtype), kernel_fn, reg=reg, block_size=block_size)
  return float(np.mean(np.asarray(jnp.argmax(pred, axis=1)) == y_test))
