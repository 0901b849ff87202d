"""MTT's experts: networks trained on the real data by SGD, their parameters saved at every epoch.

:func:`train_experts` trains them and saves each one's trajectory to disk, one ``.npz``
per expert; an interrupted or repeated call resumes, training only the experts not yet
on disk. :func:`load_experts` reads them back for :func:`udd_jax.supervised.mtt.distill_mtt`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import pathlib
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from jax.typing import ArrayLike
from jaxtyping import Array, Float, Int, PRNGKeyArray

from udd_jax import _validation, io
from udd_jax.supervised import base
from udd_jax.supervised.labelled import prepare_data
from udd_jax.supervised.networks import cross_entropy, get_network, init_params
from udd_jax.training import loops

MANIFEST = "experts.json"
FORMAT_VERSION = 1
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


def _make_train_epoch(network, unravel, optimizer, *, n_batches, batch_size, loop):
  """One shuffled pass of mini-batch SGD, by the resolved ``loop``.

  ``"host"``: a host loop over one jitted step, for the reason given in
  :mod:`udd_jax.training.loops` (convolutions in loop bodies are slow on the CPU);
  ``"scan"``: one jitted ``lax.scan`` over the epoch's steps (GPU and TPU). Both take the
  same steps.
  """

  def loss_fn(flat, x, y):
    return cross_entropy(network, unravel(flat), x, y)

  def step(flat, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(flat, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, flat)
    return optax.apply_updates(flat, updates), opt_state, loss

  sgd_step = jax.jit(step)

  @functools.partial(jax.jit, static_argnums=1)
  def batch_order(key, n):
    # The last incomplete batch is dropped so that every step has one shape.
    return jax.random.permutation(key, n)[: n_batches * batch_size].reshape(n_batches, batch_size)

  def host_epoch(flat, opt_state, key, x, y):
    order = np.asarray(batch_order(key, x.shape[0]))
    losses = []
    for idx in order:
      flat, opt_state, loss = sgd_step(flat, opt_state, x[idx], y[idx])
      losses.append(loss)
    return flat, opt_state, jnp.mean(jnp.stack(losses))

  @jax.jit
  def scan_over_batches(flat, opt_state, order, x, y):
    def body(carry, idx):
      flat, opt_state, loss = step(*carry, x[idx], y[idx])
      return (flat, opt_state), loss

    (flat, opt_state), losses = jax.lax.scan(body, (flat, opt_state), order)
    return flat, opt_state, jnp.mean(losses)

  def scan_epoch(flat, opt_state, key, x, y):
    return scan_over_batches(flat, opt_state, batch_order(key, x.shape[0]), x, y)

  return scan_epoch if loop == "scan" else host_epoch


class Experts(NamedTuple):
  """What :func:`train_experts` leaves on disk: every expert's file, and which it trained now."""

  paths: list[pathlib.Path]
  trained: list[int]


@_validation.renamed(key="seed")
def train_experts(
    x: Float[ArrayLike, "n H W C"], y: Int[ArrayLike, " n"], *, n_experts: int, epochs: int,
    workdir: str | pathlib.Path, seed: PRNGKeyArray | int, network: str = "convnet", width: int = 128, depth: int = 3,
    lr: float = 0.01, momentum: float = 0.0, batch_size: int = 256, n_classes: int | None = None,
    callback: Callable[[int, int, dict[str, float]], None] | None = None, loop: str = "auto",
) -> Experts:
  """Trains MTT's experts on real data and saves their trajectories; resumable.

  Expert ``i`` starts from the init drawn with ``fold_in(key, i)`` (``key`` the seed as a PRNG key) and takes ``epochs``
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
    seed: int seed or PRNG key.
    network: ``"convnet"`` (MTT's), ``"lenet"`` or ``"mlp"``.
    width: ConvNet channels / MLP hidden units.
    depth: ConvNet blocks.
    lr: SGD step size.
    momentum: SGD momentum (0: none).
    batch_size: mini-batch size (at most ``n``).
    n_classes: number of classes; ``max(y) + 1`` when None.
    callback: called as ``callback(expert, epoch, record)`` after every epoch trained.
    loop: how an epoch's steps run: ``"auto"`` (``"host"`` on the CPU, ``"scan"`` on GPU
      and TPU), ``"host"`` (a host loop over one jitted step) or ``"scan"`` (one
      ``lax.scan``). Both take the same steps; it is not one of the arguments a resumed
      directory must agree on.

  Returns:
    :class:`Experts`: the paths of all ``n_experts`` files and the indices trained by
    this call.

  Raises:
    ValueError: ``workdir`` holds experts made with other arguments or other data.
  """
  data = prepare_data(x, y, n_classes=n_classes)
  n_experts = _validation.check_positive_int(n_experts, "n_experts")
  epochs = _validation.check_positive_int(epochs, "epochs")
  key, seed = base.as_key(seed)
  lr = _validation.check_positive_float(lr, "lr")
  momentum = _validation.check_positive_float(momentum, "momentum", allow_zero=True)
  if momentum >= 1:
    raise ValueError(f"momentum must be in [0, 1); got {momentum}.")
  batch_size = min(_validation.check_positive_int(batch_size, "batch_size"), data.images.shape[0])
  if callback is not None and not callable(callback):
    raise TypeError(f"callback must be callable as callback(expert, epoch, record); got {type(callback).__name__}.")
  loop = loops.resolve_loop(loop)
  net = get_network(network, data.n_classes, width=width, depth=depth)
  image_shape = tuple(data.images.shape[1:])
  template, unravel = ravel_pytree(init_params(net, jax.random.key(0), image_shape))
  directory = pathlib.Path(workdir)
  _write_manifest(directory, n_experts, {
      "format_version": FORMAT_VERSION, "network": network, "width": width, "depth": depth, "n_classes": data.n_classes,
      "image_shape": list(image_shape), "n_params": int(template.size), "epochs": epochs, "lr": lr, "momentum": momentum,
      "batch_size": batch_size, "seed": seed, "data_sha256": _data_fingerprint(data.images, data.labels)})
  optimizer = optax.sgd(lr, momentum=momentum or None)
  train_epoch = _make_train_epoch(
      net, unravel, optimizer, n_batches=data.images.shape[0] // batch_size, batch_size=batch_size, loop=loop
  )
  paths, trained = [_expert_path(directory, i) for i in range(n_experts)], []
  for i, path in enumerate(paths):
    if not path.is_file():
      k_init, k_epochs = jax.random.split(jax.random.fold_in(key, i))
      flat, _ = ravel_pytree(init_params(net, k_init, image_shape))
      trajectory, losses = _train_expert(train_epoch, flat, optimizer.init(flat), k_epochs, data, epochs,
                                         functools.partial(callback, i) if callback is not None else None)
      io.atomic_savez(path, dict(trajectory=trajectory, train_loss=losses))
      trained.append(i)
  return Experts(paths, trained)


def _write_manifest(directory: pathlib.Path, n_experts: int, manifest: dict[str, Any]) -> None:
  """Writes ``experts.json``, refusing a directory whose experts were made with other arguments."""
  manifest_path = directory / MANIFEST
  old = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
  if old is not None:
    differ = [k for k in _RESUME_FIELDS if old.get(k) != manifest[k]]
    if differ:
      detail = ", ".join(f"{k}: {old.get(k)!r} on disk vs {manifest[k]!r} now" for k in differ)
      raise ValueError(f"workdir {str(directory)!r} holds experts made with other arguments ({detail}); use another workdir.")
  manifest["n_experts"] = max(n_experts, old["n_experts"]) if old is not None else n_experts
  if manifest != old:  # a repeated call leaves the directory byte for byte as it was
    io.atomic_write_text(manifest_path, json.dumps(manifest, indent=1))


def _train_expert(train_epoch, flat, opt_state, k_epochs, data, epochs, callback) -> tuple[np.ndarray, np.ndarray]:
  """One expert's trajectory ``(epochs + 1, n_params)`` and its training loss per epoch."""
  trajectory, losses, start = [np.asarray(flat)], [], time.perf_counter()
  for epoch in range(1, epochs + 1):
    flat, opt_state, loss = train_epoch(flat, opt_state, jax.random.fold_in(k_epochs, epoch), data.images, data.labels)
    trajectory.append(np.asarray(flat))
    losses.append(float(loss))
    if callback is not None:
      callback(epoch, {"train_loss": losses[-1], "seconds": time.perf_counter() - start})
  return np.stack(trajectory), np.asarray(losses)


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


