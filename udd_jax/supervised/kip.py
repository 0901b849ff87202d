"""Kernel Inducing Points (KIP; Nguyen, Chen & Lee, ICLR 2021; Nguyen et al., NeurIPS 2021).

KIP learns a small labelled support set ``(X_s, y_s)`` such that kernel ridge regression
(KRR) fitted on it predicts the labels of real data:

  ``L(X_s, y_s) = 0.5 * mean || K_ts (K_ss + lambda I)^-1 y_s - y_t ||^2``,
  ``lambda = reg * trace(K_ss) / n_s``,

over random class-balanced target batches ``(X_t, y_t)`` of the real data, with Adam on
the support images and (optionally) on the support labels, which start as mean-centred
one-hot vectors (``0.9`` / ``-0.1`` for ten classes). The kernel is the infinite-width
NTK or NNGP of a fully connected or convolutional ReLU network
(:mod:`udd_jax.supervised.kernels`; the loss in :mod:`udd_jax.supervised.krr`). A distilled set is evaluated by KRR with the same
kernel (:func:`kip_accuracy`) or by training networks on it (``labels`` are float
targets, which ``evaluate_synset`` fits by mean squared error, as KIP does).

Examples:
  >>> import jax, jax.numpy as jnp
  >>> x = jnp.concatenate([jnp.zeros((5, 4, 4, 1)), jnp.ones((5, 4, 4, 1))])
  >>> y = jnp.array([0] * 5 + [1] * 5)
  >>> result = distill_kip(x, y, ipc=1, seed=jax.random.key(0), iterations=3)
  >>> result.images.shape, result.labels.shape
  ((2, 4, 4, 1), (2, 2))
  >>> kip_accuracy(result, (x, y))
  1.0
"""

from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from udd_jax import _validation
from udd_jax.data import Preprocessing
from udd_jax.supervised import base
from udd_jax.supervised.kernels import KERNELS, KINDS, KernelFn, get_kernel
from udd_jax.supervised.krr import centred_one_hot, kip_loss, krr_predict
from udd_jax.supervised.labelled import class_table, sample_balanced
from udd_jax.supervised.networks import as_images
from udd_jax.supervised.result import SupervisedResult
from udd_jax.supervised.zca import KipPreprocessing

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


@functools.partial(jax.jit, static_argnames=("kernel_fn", "learn_labels", "per_class"))
def _train_step(state, step_key, data, table, counts, hyper, *, kernel_fn, learn_labels, per_class):
  """Samples a class-balanced target batch and takes one :func:`kip_step`.

  The learning rate and ridge are traced, so runs that differ only in them share one compilation.
  """
  lr, reg = hyper
  idx = sample_balanced(step_key, table, counts, per_class)
  x, y = data
  return kip_step(state, x[idx], y[idx], kernel_fn=kernel_fn, optimizer=optax.adam(lr), reg=reg, learn_labels=learn_labels)


@_validation.renamed(key="seed")
def distill_kip(
    x: Float[ArrayLike, "n H W *C"], y: Int[ArrayLike, " n"], *, ipc: int, seed: PRNGKeyArray | int,
    kernel: str = "fc", kind: str = "ntk", depth: int | None = None, w_var: float = 2.0, b_var: float = 1e-4,
    filter_size: int = 3, pooling: str = "none", prepend_conv: bool = False, iterations: int = 1000,
    lr: float = 0.01, batch_target: int | None = None,
    learn_labels: bool = True, reg: float = 1e-6, init: str = "real", block_size: int | None = None,
    preprocessing: Any = None, max_seconds: float | None = None, log_every: int = 10,
    callback: base.Callback | None = None, checkpoint: base.Checkpoint | str | os.PathLike | None = None,
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
    seed: int seed or PRNG key of the initial support set and the target batches.
    kernel, kind, depth, w_var, b_var, filter_size, pooling, prepend_conv: the kernel
      (:func:`get_kernel`): ``"fc"`` or ``"conv"`` (ConvNet, flatten readout), ``"ntk"`` or
      ``"nngp"``, hidden layers / conv blocks (default 1 / 3), weight and bias variances; for
      ``"conv"`` the filter side, ``"none"`` / ``"avg"`` (2 x 2 average pooling after every
      block) and an unpooled block in front (``pooling="avg", prepend_conv=True`` is the
      KIP authors' ConvNet; see :func:`udd_jax.supervised.kernels.conv_kernel` for its cost).
    lr: Adam learning rate (KIP: 0.01 on MNIST).
    batch_target: real images per target batch, rounded down to a multiple of the number
      of classes (default 1000 for ``"fc"``, 100 for ``"conv"``, at most ``n``).
    learn_labels: also learn the support labels.
    reg: ridge regularisation, relative to the mean diagonal of ``K_ss``.
    init: ``"real"`` (random real images of each class) or ``"random"`` (random images:
      Gaussian noise with the data's per-pixel mean and standard deviation).
    block_size: compute kernels ``block_size`` rows at a time (memory for ``"conv"``).
    preprocessing: how ``x`` was preprocessed, recorded in ``config["preprocessing"]``
      (a :class:`KipPreprocessing`, a ``udd_jax.Preprocessing`` or a JSON dict).
    iterations, max_seconds: the budget: optimiser steps, and seconds after which to stop.
    log_every: log (and check) the loss every this many iterations, and at the last one.
    callback: called as ``callback(iteration, record)`` with every logged record
      (iterations count from 0).
    checkpoint: save the progress there and resume from it (a path or a
      :class:`udd_jax.supervised.base.Checkpoint`; see ``base.run_outer_loop``).

  Returns:
    A :class:`SupervisedResult`: float32 ``images`` ``(ipc * n_classes, H, W, C)`` and label
    vectors ``(ipc * n_classes, n_classes)``; ``config`` holds every option and ``kernel_options``.
    A non-finite loss stops the run with the last support set whose loss was finite
    (``config["stopped"] == "non_finite_loss"``), as every method's outer loop does.

  Raises:
    ValueError, TypeError: bad arguments, before anything is compiled.
  """
  ipc = _validation.check_positive_int(ipc, "ipc")
  key, _ = base.as_key(seed)
  kernel = _validation.check_choice(kernel, "kernel", KERNELS)
  kind = _validation.check_choice(kind, "kind", KINDS)
  depth = DEFAULT_DEPTH[kernel] if depth is None else _validation.check_positive_int(depth, "depth")
  budget = base.Budget.check(iterations, max_seconds, callback, checkpoint)
  lr, reg = _validation.check_positive_float(lr, "lr"), _validation.check_positive_float(reg, "reg", allow_zero=True)
  init = base.check_init(init)
  log_every, _ = _validation.check_positive_int(log_every, "log_every"), _validation.check_bool(learn_labels, "learn_labels")
  record_prep = _preprocessing_record(preprocessing)
  x_np, y_np, n_classes = _check_data(x, y, ipc, init)
  kernel_fn, kernel_options = _kernel(kernel, block_size, depth=depth, kind=kind, w_var=w_var, b_var=b_var,
                                      filter_size=filter_size, pooling=pooling, prepend_conv=prepend_conv)
  per_class = _per_class(batch_target, kernel, x_np.shape[0], n_classes)

  k_init, k_run = jax.random.split(key)
  images0 = _initial_support(k_init, x_np, y_np, n_classes, ipc, init)
  labels0 = centred_one_hot(jnp.asarray(np.repeat(np.arange(n_classes), ipc)), n_classes).astype(x_np.dtype)
  state = kip_init(images0, labels0, optax.adam(lr), learn_labels=learn_labels)
  step = _run_step(x_np, y_np, n_classes, lr, reg, kernel_fn=kernel_fn, learn_labels=learn_labels, per_class=per_class)
  state, log = base.run_outer_loop(step, state, k_run, budget, log_every=log_every, fold_in=True, first=0)
  config = {
      "method": "kip", "ipc": ipc, "network": f"{kernel}-{kind}", "kernel": kernel, "kernel_options": kernel_options,
      "n_classes": n_classes, "iterations": log.iterations, "max_iterations": iterations, "lr": lr,
      "optimizer": "adam", "batch_target": per_class * n_classes, "learn_labels": learn_labels,
      "label_encoding": "one_hot_minus_mean", "reg": reg, "init": init, "block_size": block_size,
      "max_seconds": max_seconds, "stopped": log.stopped, "seconds": log.seconds, "seed": base.key_data(key),
      "preprocessing": record_prep,
  }
  return SupervisedResult(images=np.asarray(state.images, np.float32), labels=np.asarray(state.labels, np.float32),
                          config=config, history=log.history)


def _kernel(kernel: str, block_size: Any, *, filter_size: Any, pooling: Any, prepend_conv: Any,
            **options: Any) -> tuple[KernelFn, dict[str, Any]]:
  """The kernel function and its options as recorded in ``config["kernel_options"]``."""
  if kernel == "conv":
    options |= dict(filter_size=filter_size, pooling=pooling, prepend_conv=prepend_conv)
  elif pooling != "none" or prepend_conv:
    raise ValueError(f"pooling={pooling!r} and prepend_conv={prepend_conv!r} need kernel='conv'; "
                     "the 'fc' kernel has no spatial axes.")
  kernel_fn = get_kernel(kernel, block_size=block_size, **options)
  return kernel_fn, {k: (float(v) if k in ("w_var", "b_var") else v) for k, v in options.items()}


def _run_step(x_np, y_np, n_classes, lr, reg, **static) -> base.Step:
  """The outer loop's step: a class-balanced target batch of the real data, one :func:`kip_step`."""
  data = (jnp.asarray(x_np), centred_one_hot(jnp.asarray(y_np), n_classes).astype(x_np.dtype))
  table, table_counts = (jnp.asarray(a) for a in class_table(y_np, n_classes))
  hyper = (jnp.asarray(lr, x_np.dtype), jnp.asarray(reg, x_np.dtype))

  def step(state, key):
    state, loss = _train_step(state, key, data, table, table_counts, hyper, **static)
    return state, {"loss": loss}

  return step


def _check_data(x: Any, y: Any, ipc: int, init: str) -> tuple[np.ndarray, np.ndarray, int]:
  """KIP's real data on the host, in its own float dtype: images ``(n, H, W, C)``, labels, class count."""
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
  return x_np, y_np, n_classes


def _per_class(batch_target: Any, kernel: str, n: int, n_classes: int) -> int:
  """Target images per class of every batch (``batch_target`` rounded down to a multiple of the classes)."""
  if batch_target is None:
    batch_target = min(DEFAULT_BATCH_TARGET[kernel], n)
  batch_target = _validation.check_positive_int(batch_target, "batch_target")
  if batch_target < n_classes:
    raise ValueError(f"batch_target must be at least the number of classes ({n_classes}) for class-balanced batches; got {batch_target}.")
  return batch_target // n_classes


def _initial_support(key: PRNGKeyArray, x_np: np.ndarray, y_np: np.ndarray, n_classes: int, ipc: int, init: str) -> np.ndarray:
  """``ipc`` random real images of every class (numpy's generator seeded by the key), or noise
  with the data's per-pixel mean and standard deviation."""
  if init == "real":
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
    chosen = np.concatenate([rng.choice(np.flatnonzero(y_np == c), ipc, replace=False) for c in range(n_classes)])
    return x_np[chosen]
  noise = np.asarray(jax.random.normal(key, (ipc * n_classes, *x_np.shape[1:])))
  return (x_np.mean(axis=0) + x_np.std(axis=0) * noise).astype(x_np.dtype)


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
