"""The image update that DC, DSA and DM share: class batches, Siamese augmentation keys, one SGD step.

Each of these methods, once per round, draws a batch of real images of every class (and,
for DSA, one augmentation key per class, shared by the real and the synthetic images of
that class), computes a matching loss summed over classes, and takes one step of SGD with
momentum 0.5 on the images (``torch.optim.SGD([image_syn], lr, momentum=0.5)`` in their code).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PRNGKeyArray, Scalar

from udd_jax import _validation
from udd_jax.supervised import augment as augment_lib
from udd_jax.supervised.base import check_init
from udd_jax.supervised.labelled import ClassData, sample_class_batches

IMAGE_MOMENTUM = 0.5


def image_optimizer(lr: float | Array) -> optax.GradientTransformation:
  """SGD with momentum :data:`IMAGE_MOMENTUM` on the images."""
  return optax.sgd(lr, momentum=IMAGE_MOMENTUM)


def check_options(
    *, init: Any, image_lr: Any, batch_real: Any, dsa: Any, dsa_strategy: Any, preprocessing: Any
) -> tuple[float, int]:
  """Checks the options DC, DSA and DM share; returns ``(image_lr, batch_real)``."""
  check_init(init)
  image_lr = _validation.check_positive_float(image_lr, "image_lr")
  batch_real = _validation.check_positive_int(batch_real, "batch_real")
  augment_lib.parse_strategy(dsa_strategy)
  if preprocessing is not None and not isinstance(preprocessing, dict):
    raise TypeError(f"preprocessing must be a JSON-serialisable dict or None; got {type(preprocessing).__name__}.")
  if not isinstance(dsa, bool):
    raise TypeError(f"dsa must be a bool; got {type(dsa).__name__}.")
  return image_lr, batch_real


def real_batches(
    data: ClassData, k_real: PRNGKeyArray, k_aug: PRNGKeyArray, batch_real: int, dsa_strategy: str | None
) -> tuple[Array, dict[str, Any]]:
  """``batch_real`` real images of every class, and the loss's augmentation options (none without DSA)."""
  real = sample_class_batches(data, k_real, batch_real)
  if dsa_strategy is None:
    return real, {}
  return real, dict(aug_keys=jax.random.split(k_aug, data.starts.shape[0]), dsa_strategy=dsa_strategy)


def image_step(
    loss_fn: Callable[[Array], Scalar], images: Array, opt_state: optax.OptState, image_lr: Array
) -> tuple[Array, optax.OptState, Scalar]:
  """One step of :func:`image_optimizer` on ``loss_fn(images)``; returns the images, state and loss."""
  loss, grads = jax.value_and_grad(loss_fn)(images)
  updates, opt_state = image_optimizer(image_lr).update(grads, opt_state, images)
  return optax.apply_updates(images, updates), opt_state, loss


CLASS_LOOPS = ("unroll", "map")
"""How :func:`sum_over_classes` runs the classes: a Python loop unrolled under ``jit``, or ``lax.map``."""


def sum_over_classes(
    one_class: Callable[[Array, Array, Array | int], Scalar], real: Float[Array, "classes b H W C"],
    syn: Float[Array, "classes ipc H W C"], aug_keys: PRNGKeyArray | None, dsa_strategy: str, *,
    loop: str = "unroll",
) -> Scalar:
  """``sum_c one_class(real_c, syn_c, c)``: DC's and DM's losses, one class at a time.

  With ``aug_keys`` (one per class) both batches of class ``c`` first get the same DSA
  transform, drawn from ``aug_keys[c]`` (Siamese augmentation).

  The classes run one after another, never ``vmap``-ped: ``vmap`` over classes turns DC's
  per-class weight gradients into batch-grouped convolutions and puts DM's forward pass on
  one batch of ``classes * b`` images, both slow on XLA:CPU. Which loop is fastest depends
  on the loss (docs/BENCHMARKS.md (q), width 32, DC / DM + DSA per step): ``"unroll"``
  (a Python loop, unrolled under ``jit``; DC's choice) 2.2 / 0.60 s, ``"map"``
  (``lax.map``; DM's choice, whose loop body has no weight gradient) 26 / 0.38 s,
  ``vmap`` 7.8 / 0.88 s. Unrolling costs compile time, which grows with the number of
  classes (DC: 21 s against 12 s for ``vmap`` at 10 classes).

  Args:
    one_class: ``(real_c, syn_c, label) -> loss``; ``label`` is a Python int with
      ``"unroll"``, a traced int with ``"map"``.
    real: real batches, class-major.
    syn: synthetic images, class-major.
    aug_keys: ``(classes,)`` PRNG keys for DSA, or None.
    dsa_strategy: DSA operations.
    loop: one of :data:`CLASS_LOOPS`.

  Returns:
    The loss summed over classes.
  """

  def augmented(real_c, syn_c, key, label):
    if key is not None:
      real_c = augment_lib.dsa(real_c, key, dsa_strategy)
      syn_c = augment_lib.dsa(syn_c, key, dsa_strategy)
    return one_class(real_c, syn_c, label)

  loop = _validation.check_choice(loop, "loop", CLASS_LOOPS)
  n_classes = real.shape[0]
  if loop == "map":
    labels = jnp.arange(n_classes)
    if aug_keys is None:
      return jnp.sum(jax.lax.map(lambda a: augmented(a[0], a[1], None, a[2]), (real, syn, labels)))
    return jnp.sum(jax.lax.map(lambda a: augmented(*a), (real, syn, aug_keys, labels)))
  total = jnp.zeros((), real.dtype)
  for c in range(n_classes):
    total = total + augmented(real[c], syn[c], None if aug_keys is None else aug_keys[c], c)
  return total
