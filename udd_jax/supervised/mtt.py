"""Matching Training Trajectories (MTT; Cazenavette et al., 2022).

Two stages:

1. :func:`train_experts` trains networks on the real data by SGD and saves each one's
   parameters at every epoch (its trajectory) to disk, one ``.npz`` per expert; an
   interrupted or repeated call resumes, training only the experts not yet on disk.
2. :func:`distill_mtt` learns the images and the student's step size: each iteration a
   student starts from a random expert's parameters at a random epoch ``t``, takes
   ``syn_steps`` SGD steps on the synthetic set, and :func:`mtt_loss` compares where it
   lands with the expert ``expert_epochs`` epochs later, relative to how far the expert
   went.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from jax.typing import ArrayLike
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree, Scalar

from udd_jax import _validation
from udd_jax.distill import _atomic_write
from udd_jax.supervised import dd
from udd_jax.supervised.result import SupervisedResult

MANIFEST = "experts.json"
FORMAT_VERSION = 1
INITS = ("real", "noise")
# The manifest fields that must agree for a directory to be resumed; n_experts may grow.
_RESUME_FIELDS = (
    "format_version", "network", "width", "depth", "n_classes", "image_shape", "n_params",
    "epochs", "lr", "momentum", "batch_size", "seed", "data_sha256",
)


def _expert_path(directory: pathlib.Path, index: int) -> pathlib.Path:
  return directory / f"expert_{index:04d}.npz"


def _data_fingerprint(images: Array, labels: Array) -> str:
  digest = hashlib.sha256()
  digest.update(np.ascontiguousarray(np.asarray(images, np.float32)).tobytes())
  digest.update(np.ascontiguousarray(np.asarray(labels, np.int32)).tobytes())
  return digest.hexdigest()


def _make_train_epoch(network, unravel, optimizer, *, n_batches, batch_size):
  """One shuffled pass of mini-batch SGD: a host loop over one jitted step.

  Not one ``lax.scan`` over the epoch, for the reason given in
  :func:`udd_jax.supervised.train._train_one` (convolutions in loop bodies are slow on the CPU).
  """

  def loss_fn(flat, x, y):
    return dd.cross_entropy(network, unravel(flat), x, y)

  @jax.jit
  def sgd_step(flat, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(flat, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, flat)
    return optax.apply_updates(flat, updates), opt_state, loss

  @functools.partial(jax.jit, static_argnums=1)
  def batch_order(key, n):
    # The last incomplete batch is dropped so that every step has one shape.
    return jax.random.permutation(key, n)[: n_batches * batch_size].reshape(n_batches, batch_size)

  def train_epoch(flat, opt_state, key, x, y):
    order = np.asarray(batch_order(key, x.shape[0]))
    losses = []
    for idx in order:
      flat, opt_state, loss = sgd_step(flat, opt_state, x[idx], y[idx])
      losses.append(loss)
    return flat, opt_state, jnp.mean(jnp.stack(losses))

  return train_epoch


class Experts(NamedTuple):
  """What :func:`train_experts` leaves on disk: every expert's file, and which it trained now."""

  paths: list[pathlib.Path]
  trained: list[int]


def train_experts(
    x: Float[ArrayLike, "n H W C"],
    y: Int[ArrayLike, " n"],
    *,
    n_experts: int,
    epochs: int,
    workdir: str | pathlib.Path,
    key: PRNGKeyArray | int,
    network: str = "convnet",
    width: int = 128,
    depth: int = 3,
    lr: float = 0.01,
    momentum: float = 0.0,
    batch_size: int = 256,
    n_classes: int | None = None,
    callback: Callable[[int, int, dict[str, float]], None] | None = None,
) -> Experts:
  """Trains MTT's experts on real data and saves their trajectories; resumable.

  Expert ``i`` starts from the init drawn with ``fold_in(key, i)`` and takes ``epochs``
  shuffled passes of mini-batch SGD (MTT's buffer: ``lr`` 0.01, no momentum, batch 256).
  Its flat parameter vector before training and after every epoch goes to
  ``workdir/expert_{i:04d}.npz`` (``trajectory``: ``(epochs + 1, n_params)``,
  ``train_loss``: ``(epochs,)``), written atomically once the expert is done.
  ``workdir/experts.json`` records the arguments and a hash of the data: a later call
  with the same ones skips the experts already on disk (and may ask for more experts);
  a call with different ones is refused.

  Args:
    x: real images ``(n, H, W)`` or ``(n, H, W, C)``, in the networks' input space.
    y: integer labels ``(n,)``.
    n_experts: experts wanted in ``workdir`` (those present are kept).
    epochs: epochs per expert.
    workdir: the directory of the trajectories (created if needed).
    key: PRNG key or int seed.
    network: ``"convnet"`` (MTT's), ``"lenet"`` or ``"mlp"``.
    width: ConvNet channels / MLP hidden units.
    depth: ConvNet blocks.
    lr: SGD step size.
    momentum: SGD momentum (0: none).
    batch_size: mini-batch size (at most ``n``).
    n_classes: number of classes; ``max(y) + 1`` when None.
    callback: called as ``callback(expert, epoch, record)`` after every epoch trained.

  Returns:
    :class:`Experts`: the paths of all ``n_experts`` files and the indices trained by
    this call.

  Raises:
    ValueError: ``workdir`` holds experts made with other arguments or other data.
  """
  data = dd.prepare_data(x, y, n_classes=n_classes)
  n_experts = _validation.check_positive_int(n_experts, "n_experts")
  epochs = _validation.check_positive_int(epochs, "epochs")
  key, seed = dd.as_key(key)
  lr = _validation.check_positive_float(lr, "lr")
  momentum = _validation.check_positive_float(momentum, "momentum", allow_zero=True)
  if momentum >= 1:
    raise ValueError(f"momentum must be in [0, 1); got {momentum}.")
  batch_size = min(_validation.check_positive_int(batch_size, "batch_size"), data.images.shape[0])
  if callback is not None and not callable(callback):
    raise TypeError(f"callback must be callable as callback(expert, epoch, record); got {type(callback).__name__}.")
  net, net_record = dd.network_config(network, data.n_classes, width, depth)
  image_shape = tuple(data.images.shape[1:])
  template, unravel = ravel_pytree(dd.init_params(net, jax.random.key(0), image_shape))

  manifest = {
      "format_version": FORMAT_VERSION, **net_record, "n_classes": data.n_classes,
      "image_shape": list(image_shape), "n_params": int(template.size), "epochs": epochs, "lr": lr,
      "momentum": momentum, "batch_size": batch_size, "seed": seed,
      "data_sha256": _data_fingerprint(data.images, data.labels),
  }
  directory = pathlib.Path(workdir)
  manifest_path = directory / MANIFEST
  old = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
  if old is not None:
    differ = [k for k in _RESUME_FIELDS if old.get(k) != manifest[k]]
    if differ:
      detail = ", ".join(f"{k}: {old.get(k)!r} on disk vs {manifest[k]!r} now" for k in differ)
      raise ValueError(f"workdir {str(directory)!r} holds experts made with other arguments ({detail}); use another workdir.")
  manifest["n_experts"] = max(n_experts, old["n_experts"]) if old is not None else n_experts
  if manifest != old:  # a repeated call leaves the directory byte for byte as it was
    _atomic_write(manifest_path, lambda f: f.write(json.dumps(manifest, indent=1).encode()))

  optimizer = optax.sgd(lr, momentum=momentum or None)
  train_epoch = _make_train_epoch(
      net, unravel, optimizer, n_batches=data.images.shape[0] // batch_size, batch_size=batch_size
  )
  paths, trained = [_expert_path(directory, i) for i in range(n_experts)], []
  for i, path in enumerate(paths):
    if path.is_file():
      continue
    k_init, k_epochs = jax.random.split(jax.random.fold_in(key, i))
    flat, _ = ravel_pytree(dd.init_params(net, k_init, image_shape))
    opt_state = optimizer.init(flat)
    trajectory, losses, start = [np.asarray(flat)], [], time.perf_counter()
    for epoch in range(1, epochs + 1):
      flat, opt_state, loss = train_epoch(flat, opt_state, jax.random.fold_in(k_epochs, epoch), data.images, data.labels)
      trajectory.append(np.asarray(flat))
      losses.append(float(loss))
      if callback is not None:
        callback(i, epoch, {"train_loss": losses[-1], "seconds": time.perf_counter() - start})
    _write_npz(path, trajectory=np.stack(trajectory), train_loss=np.asarray(losses))
    trained.append(i)
  return Experts(paths, trained)


def _write_npz(path: pathlib.Path, **arrays: np.ndarray) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  _atomic_write(path, lambda f: f.write(buffer.getvalue()))


def load_experts(expert_dir: str | pathlib.Path) -> tuple[dict[str, Any], np.ndarray]:
  """The manifest and the trajectories ``(n_experts, epochs + 1, n_params)`` saved in ``expert_dir``.

  Every expert file present is loaded (the manifest's ``n_experts`` is what was asked
  for; an interrupted run may hold fewer).
  """
  directory = pathlib.Path(expert_dir)
  manifest_path = directory / MANIFEST
  if not manifest_path.is_file():
    raise FileNotFoundError(f"expert_dir {str(directory)!r} has no {MANIFEST}; create it with train_experts.")
  manifest = json.loads(manifest_path.read_text())
  paths = sorted(directory.glob("expert_*.npz"))
  if not paths:
    raise FileNotFoundError(f"expert_dir {str(directory)!r} holds no expert_*.npz; run train_experts.")
  shape = (manifest["epochs"] + 1, manifest["n_params"])
  trajectories = []
  for path in paths:
    with np.load(path) as f:
      if f["trajectory"].shape != shape:
        raise ValueError(f"{path} holds a trajectory of shape {f['trajectory'].shape}; {MANIFEST} says {shape}.")
      trajectories.append(f["trajectory"])
  return manifest, np.stack(trajectories)


def _sq_dist(a: PyTree, b: PyTree) -> Scalar:
  return sum(jnp.sum((u - v) ** 2) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def mtt_loss(
    network: nn.Module,
    images: Float[Array, "n H W C"],
    labels: Int[Array, " n"],
    student_lr: Scalar,
    start_params: PyTree,
    target_params: PyTree,
    *,
    syn_steps: int,
    batches: Int[Array, "syn_steps b"] | None = None,
    remat: bool = False,
) -> Scalar:
  """MTT's normalised parameter distance ``||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2``.

  The student starts at ``start_params`` (the expert at epoch ``t``) and takes
  ``syn_steps`` SGD steps of size ``student_lr`` on ``(images, labels)``
  (:func:`~udd_jax.supervised.dd.unroll_sgd`); ``target_params`` is the expert at epoch
  ``t + M``.

  Args:
    network: the experts' flax network.
    images: the synthetic set ``(n, H, W, C)``.
    labels: its labels ``(n,)``.
    student_lr: the student's (learned) step size.
    start_params: the expert's parameters at the start epoch.
    target_params: the expert's parameters ``M`` epochs later.
    syn_steps: student steps ``N``.
    batches: ``(syn_steps, b)`` mini-batch indices of the student's steps; None for
      full-batch steps.
    remat: recompute the activations of each student step in the backward pass.

  Returns:
    The scalar loss: 0 when the student lands on the target, 1 when it stays at the start.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from udd_jax.supervised.networks import MLP
    >>> net = MLP(n_classes=2, width=4)
    >>> x, y = jnp.ones((2, 3, 3, 1)), jnp.array([0, 1])
    >>> start = net.init(jax.random.key(0), x)["params"]
    >>> target = jax.tree.map(lambda p: p + 1.0, start)
    >>> float(mtt_loss(net, x, y, 0.0, start, target, syn_steps=3))
    1.0
  """
  if batches is not None and batches.shape[0] != syn_steps:
    raise ValueError(f"batches has {batches.shape[0]} rows but syn_steps is {syn_steps}.")
  step_sizes = jnp.full((syn_steps,), student_lr, dtype=jnp.result_type(student_lr, float))
  student = dd.unroll_sgd(network, start_params, images, labels, step_sizes, batches, remat=remat)
  return _sq_dist(student, target_params) / _sq_dist(start_params, target_params)


class _MTTState(NamedTuple):
  syn: dict[str, Array]  # {"images": (n, H, W, C), "lr": ()}
  opt_state: optax.OptState


def _make_mtt_step(network, unravel, optimizer, syn_labels, *, syn_steps, batch_syn, expert_epochs, max_start_epoch, remat):
  n_syn = syn_labels.shape[0]

  def student_batches(key):
    if batch_syn == n_syn:
      return None
    # MTT's student walks through random permutations of the set in consecutive chunks.
    n_perms = math.ceil(syn_steps * batch_syn / n_syn)
    order = jax.vmap(lambda k: jax.random.permutation(k, n_syn))(jax.random.split(key, n_perms))
    return order.reshape(-1)[: syn_steps * batch_syn].reshape(syn_steps, batch_syn)

  @jax.jit
  def mtt_step(state, key, trajectories):
    k_expert, k_start, k_batches = jax.random.split(key, 3)
    expert = jax.random.randint(k_expert, (), 0, trajectories.shape[0])
    start = jax.random.randint(k_start, (), 0, max_start_epoch)
    start_params = unravel(trajectories[expert, start])
    target_params = unravel(trajectories[expert, start + expert_epochs])
    batches = student_batches(k_batches)

    def loss_fn(syn):
      return mtt_loss(
          network, syn["images"], syn_labels, syn["lr"], start_params, target_params,
          syn_steps=syn_steps, batches=batches, remat=remat,
      )

    loss, grads = jax.value_and_grad(loss_fn)(state.syn)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.syn)
    metrics = {"loss": loss, "expert": expert, "start_epoch": start, "student_lr": state.syn["lr"]}
    return _MTTState(optax.apply_updates(state.syn, updates), opt_state), metrics

  return mtt_step


def distill_mtt(
    x: Float[ArrayLike, "n H W C"],
    y: Int[ArrayLike, " n"],
    *,
    ipc: int,
    key: PRNGKeyArray | int,
    expert_dir: str | pathlib.Path,
    syn_steps: int = 20,
    expert_epochs: int = 2,
    max_start_epoch: int | None = None,
    lr_images: float = 100.0,
    lr_lr: float = 1e-5,
    init_student_lr: float = 0.01,
    batch_syn: int | None = None,
    init: str = "real",
    iterations: int = 500,
    remat: bool = True,
    max_seconds: float | None = None,
    callback: dd.Callback | None = None,
) -> SupervisedResult:
  """Matching Training Trajectories: images and a student step size from saved expert trajectories.

  Each iteration draws an expert and a start epoch ``t`` uniformly from
  ``0 .. max_start_epoch - 1`` (as MTT's code), unrolls the student from the expert's
  epoch-``t`` parameters for ``syn_steps`` SGD steps of the learned size on mini-batches
  of ``batch_syn`` synthetic images, and minimises :func:`mtt_loss` against epoch
  ``t + expert_epochs``. SGD with momentum 0.5 (as MTT) updates the images (``lr_images``)
  and the student step size (``lr_lr``).

  Args:
    x: real images ``(n, H, W)`` or ``(n, H, W, C)`` in the experts' input space (the
      data the experts were trained on; used to initialise the set).
    y: integer labels ``(n,)``.
    ipc: images per class of the distilled set.
    key: PRNG key or int seed.
    expert_dir: the ``workdir`` of :func:`train_experts`; its network is the student's.
    syn_steps: student steps ``N`` per iteration.
    expert_epochs: expert epochs ``M`` the student must cover.
    max_start_epoch: start epochs are drawn below this; at most
      ``epochs - expert_epochs + 1`` (the default).
    lr_images: step size on the images (large: the normalised loss has small gradients).
    lr_lr: step size on the student step size.
    init_student_lr: the student step size's initial value (MTT: the experts' lr).
    batch_syn: synthetic images per student step; all of them when None.
    init: ``"real"`` (random real images of each class, MTT's default) or ``"noise"``.
    iterations: outer iterations.
    remat: recompute each student step's activations in the backward pass (memory of
      one step instead of ``syn_steps``).
    max_seconds: stop after this many seconds (checked between iterations).
    callback: called as ``callback(iteration, record)`` after every iteration.

  Returns:
    A :class:`SupervisedResult` with the class-major images and labels, the learned
    student step size in ``step_sizes`` (shape ``(1,)``), and per iteration the loss,
    expert and start epoch in ``history``.
  """
  manifest, trajectories = load_experts(expert_dir)
  ipc = _validation.check_positive_int(ipc, "ipc")
  _validation.check_choice(init, "init", INITS)
  data = dd.prepare_data(x, y, n_classes=manifest["n_classes"], min_per_class=ipc if init == "real" else 0)
  key, seed = dd.as_key(key)
  image_shape = tuple(data.images.shape[1:])
  if list(image_shape) != manifest["image_shape"]:
    raise ValueError(f"x has images of shape {image_shape} but the experts were trained on {tuple(manifest['image_shape'])}.")
  syn_steps = _validation.check_positive_int(syn_steps, "syn_steps")
  expert_epochs = _validation.check_positive_int(expert_epochs, "expert_epochs")
  epochs = manifest["epochs"]
  if expert_epochs > epochs:
    raise ValueError(f"expert_epochs={expert_epochs} exceeds the experts' {epochs} epochs.")
  limit = epochs - expert_epochs + 1
  max_start_epoch = limit if max_start_epoch is None else _validation.check_positive_int(max_start_epoch, "max_start_epoch")
  if max_start_epoch > limit:
    raise ValueError(
        f"max_start_epoch={max_start_epoch} is too large: start epoch + expert_epochs must stay within "
        f"the experts' {epochs} epochs, so max_start_epoch <= {limit}."
    )
  lr_images = _validation.check_positive_float(lr_images, "lr_images")
  lr_lr = _validation.check_positive_float(lr_lr, "lr_lr", allow_zero=True)
  init_student_lr = _validation.check_positive_float(init_student_lr, "init_student_lr")
  n_syn = ipc * data.n_classes
  batch_syn = n_syn if batch_syn is None else min(_validation.check_positive_int(batch_syn, "batch_syn"), n_syn)
  iterations, max_seconds = dd.check_budget(iterations, max_seconds, callback)
  net, net_record = dd.network_config(manifest["network"], data.n_classes, manifest["width"], manifest["depth"])
  _, unravel = ravel_pytree(dd.init_params(net, jax.random.key(0), image_shape))

  syn_labels = dd.synthetic_labels(data.n_classes, ipc)
  key, k_init = jax.random.split(key)
  if init == "real":
    labels = np.asarray(data.labels)
    keys = jax.random.split(k_init, data.n_classes)
    idx = np.concatenate([
        np.flatnonzero(labels == c)[np.asarray(jax.random.permutation(keys[c], int((labels == c).sum()))[:ipc])]
        for c in range(data.n_classes)
    ])
    images = data.images[idx]
  else:
    images = jax.random.normal(k_init, (n_syn, *image_shape), dtype=data.images.dtype)
  syn = {"images": images, "lr": jnp.asarray(init_student_lr, dtype=data.images.dtype)}
  optimizer = optax.partition(
      {"images": optax.sgd(lr_images, momentum=0.5), "lr": optax.sgd(lr_lr, momentum=0.5)},
      {"images": "images", "lr": "lr"},
  )
  mtt_step = _make_mtt_step(
      net, unravel, optimizer, jnp.asarray(syn_labels), syn_steps=syn_steps, batch_syn=batch_syn,
      expert_epochs=expert_epochs, max_start_epoch=max_start_epoch, remat=remat,
  )
  trajectories = jnp.asarray(trajectories, dtype=data.images.dtype)
  state, log = dd.run_outer_loop(
      lambda s, k: mtt_step(s, k, trajectories), _MTTState(syn, optimizer.init(syn)), key,
      iterations=iterations, max_seconds=max_seconds, callback=callback,
  )
  config = {
      "method": "mtt", "ipc": ipc, **net_record, "n_classes": data.n_classes, "image_shape": list(image_shape),
      "expert_dir": str(expert_dir), "n_experts": int(trajectories.shape[0]), "expert_train_epochs": epochs,
      "expert_lr": manifest["lr"], "syn_steps": syn_steps, "expert_epochs": expert_epochs,
      "max_start_epoch": max_start_epoch, "lr_images": lr_images, "lr_lr": lr_lr,
      "init_student_lr": init_student_lr, "batch_syn": batch_syn, "init": init, "remat": remat,
      "iterations": log.iterations, "max_iterations": iterations, "max_seconds": max_seconds,
      "stopped": log.stopped, "seconds": log.seconds, "preprocessing": "none", "seed": seed,
  }
  return SupervisedResult(
      images=np.asarray(state.syn["images"], dtype=np.float32),
      labels=syn_labels,
      config=config,
      history=log.history,
      step_sizes=np.asarray(state.syn["lr"], dtype=np.float32).reshape(1),
  )
