"""Matching Training Trajectories (MTT; Cazenavette et al., 2022).

Two stages:

1. :func:`~udd_jax.supervised.experts.train_experts` trains networks on the real data by
   SGD and saves each one's parameters at every epoch (its trajectory) to disk.
2. :func:`distill_mtt` learns the images and the student's step size: each iteration a
   student starts from a random expert's parameters at a random epoch ``t``, takes
   ``syn_steps`` SGD steps on the synthetic set, and :func:`mtt_loss` compares where it
   lands with the expert ``expert_epochs`` epochs later, relative to how far the expert
   went.
"""

from __future__ import annotations

import math
import pathlib
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
from udd_jax.supervised import base
from udd_jax.supervised.experts import load_experts
from udd_jax.supervised.networks import init_params, set_loss
from udd_jax.supervised.result import SupervisedResult
from udd_jax.training import unroll


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
  (:func:`udd_jax.training.unroll`); ``target_params`` is the expert at epoch
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
  student = unroll(set_loss(network), start_params, (images, labels), step_sizes, xs=batches, remat=remat)
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


@_validation.renamed(key="seed", lr_images="image_lr", lr_lr="student_lr_lr")
def distill_mtt(
    x: Float[ArrayLike, "n H W C"], y: Int[ArrayLike, " n"], *, ipc: int, seed: PRNGKeyArray | int,
    expert_dir: str | pathlib.Path, syn_steps: int = 20, expert_epochs: int = 2, max_start_epoch: int | None = None,
    image_lr: float = 100.0, student_lr_lr: float = 1e-5, init_student_lr: float = 0.01, batch_syn: int | None = None,
    init: str = "real", remat: bool = True, iterations: int = 500, max_seconds: float | None = None,
    callback: base.Callback | None = None, checkpoint: base.Checkpoint | str | None = None,
) -> SupervisedResult:
  """Matching Training Trajectories: images and a student step size from saved expert trajectories.

  Each iteration draws an expert and a start epoch ``t`` below ``max_start_epoch`` (as MTT's
  code), unrolls the student from there for ``syn_steps`` SGD steps of the learned size on
  mini-batches of ``batch_syn`` synthetic images, and minimises :func:`mtt_loss` against
  epoch ``t + expert_epochs``; SGD(momentum 0.5) updates the images and the step size.

  Args:
    x: real images ``(n, H, W)`` or ``(n, H, W, C)`` in the experts' input space (the
      data the experts were trained on; used to initialise the set).
    y: integer labels ``(n,)``.
    ipc: images per class of the distilled set.
    seed: int seed or PRNG key of the run.
    expert_dir: the ``workdir`` of :func:`~udd_jax.supervised.experts.train_experts`;
      its network is the student's.
    syn_steps: student steps ``N`` per iteration.
    expert_epochs: expert epochs ``M`` the student must cover.
    max_start_epoch: start epochs are drawn below this; at most
      ``epochs - expert_epochs + 1`` (the default).
    image_lr: step size on the images (large: the normalised loss has small gradients).
    student_lr_lr: step size on the student step size.
    init_student_lr: the student step size's initial value (MTT: the experts' lr).
    batch_syn: synthetic images per student step; all of them when None.
    init: ``"real"`` (random real images of each class, MTT's default) or ``"random"`` (random
      images: N(0, 1) noise).
    remat: recompute each student step's activations in the backward pass (memory of
      one step instead of ``syn_steps``).
    iterations, max_seconds, callback, checkpoint: the budget, as in :func:`udd_jax.supervised.base.setup`.

  Returns:
    A :class:`SupervisedResult`: class-major images and labels, the learned student step
    size in ``step_sizes`` ``(1,)``, per iteration the loss, expert and start epoch in ``history``.
  """
  base.check_init(init)
  manifest, trajectories = load_experts(expert_dir)
  s = _setup(x, y, manifest, ipc=ipc, seed=seed, init=init, iterations=iterations, max_seconds=max_seconds, callback=callback,
             checkpoint=checkpoint)
  syn_steps = _validation.check_positive_int(syn_steps, "syn_steps")
  expert_epochs, max_start_epoch = _start_epochs(manifest["epochs"], expert_epochs, max_start_epoch)
  image_lr, init_student_lr = (_validation.check_positive_float(v, n) for v, n in (
      (image_lr, "image_lr"), (init_student_lr, "init_student_lr")))
  student_lr_lr = _validation.check_positive_float(student_lr_lr, "student_lr_lr", allow_zero=True)
  n_syn = s.ipc * s.data.n_classes
  batch_syn = n_syn if batch_syn is None else min(_validation.check_positive_int(batch_syn, "batch_syn"), n_syn)
  _, unravel = ravel_pytree(init_params(s.network, jax.random.key(0), s.image_shape))

  key, k_init = jax.random.split(s.key)
  syn = {"images": _initial_images(s, k_init, init), "lr": jnp.asarray(init_student_lr, dtype=s.dtype)}
  # SGD with momentum 0.5 on both, as MTT.
  optimizer = optax.partition({"images": optax.sgd(image_lr, momentum=0.5), "lr": optax.sgd(student_lr_lr, momentum=0.5)},
                              {"images": "images", "lr": "lr"})
  mtt_step = _make_mtt_step(
      s.network, unravel, optimizer, jnp.asarray(s.labels()), syn_steps=syn_steps, batch_syn=batch_syn,
      expert_epochs=expert_epochs, max_start_epoch=max_start_epoch, remat=remat,
  )
  trajectories = jnp.asarray(trajectories, dtype=s.dtype)
  state, log = s.run(lambda st, k: mtt_step(st, k, trajectories), _MTTState(syn, optimizer.init(syn)), key)
  config = s.config(
      "mtt", log, expert_dir=str(expert_dir), n_experts=int(trajectories.shape[0]), expert_train_epochs=manifest["epochs"],
      expert_lr=manifest["lr"], syn_steps=syn_steps, expert_epochs=expert_epochs, max_start_epoch=max_start_epoch,
      image_lr=image_lr, student_lr_lr=student_lr_lr, init_student_lr=init_student_lr, batch_syn=batch_syn, init=init,
      remat=remat, preprocessing="none",
  )
  return SupervisedResult(images=np.asarray(state.syn["images"], dtype=np.float32), labels=s.labels(), config=config,
                          history=log.history, step_sizes=np.asarray(state.syn["lr"], dtype=np.float32).reshape(1))


def _setup(x, y, manifest, *, ipc, seed, init, **budget) -> base.Setup:
  """:func:`base.setup` with the experts' network; the images must have the experts' shape."""
  s = base.setup(x, y, ipc=ipc, seed=seed, network=manifest["network"], width=manifest["width"], depth=manifest["depth"],
                 n_classes=manifest["n_classes"], min_per_class=ipc if init == "real" and isinstance(ipc, int) else 0,
                 **budget)
  if list(s.image_shape) != manifest["image_shape"]:
    raise ValueError(f"x has images of shape {s.image_shape} but the experts were trained on {tuple(manifest['image_shape'])}.")
  return s


def _start_epochs(epochs: int, expert_epochs: Any, max_start_epoch: Any) -> tuple[int, int]:
  """Checks ``expert_epochs`` and ``max_start_epoch`` against the experts' ``epochs``."""
  expert_epochs = _validation.check_positive_int(expert_epochs, "expert_epochs")
  if expert_epochs > epochs:
    raise ValueError(f"expert_epochs={expert_epochs} exceeds the experts' {epochs} epochs.")
  limit = epochs - expert_epochs + 1
  max_start_epoch = limit if max_start_epoch is None else _validation.check_positive_int(max_start_epoch, "max_start_epoch")
  if max_start_epoch > limit:
    raise ValueError(
        f"max_start_epoch={max_start_epoch} is too large: start epoch + expert_epochs must stay within "
        f"the experts' {epochs} epochs, so max_start_epoch <= {limit}."
    )
  return expert_epochs, max_start_epoch


def _initial_images(s: base.Setup, key: PRNGKeyArray, init: str) -> Array:
  """``ipc`` random real images of every class (a permutation per class), or (``"random"``) N(0, 1) noise."""
  if init == "random":
    return jax.random.normal(key, (s.ipc * s.data.n_classes, *s.image_shape), dtype=s.dtype)
  labels = np.asarray(s.data.labels)
  keys = jax.random.split(key, s.data.n_classes)
  idx = np.concatenate([
      np.flatnonzero(labels == c)[np.asarray(jax.random.permutation(keys[c], int((labels == c).sum()))[:s.ipc])]
      for c in range(s.data.n_classes)
  ])
  return s.data.images[idx]
