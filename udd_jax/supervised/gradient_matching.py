"""Gradient matching (DC's loss): how far apart two networks' gradients point, layer by layer.

The distance between two gradients is layer-wise: for each weight tensor, the sum over
output channels of ``1 - cosine`` between the per-channel flattened gradients
(:func:`match_distance`, DC's ``distance_wb``). :func:`dc_loss` sums it over classes
between the cross-entropy gradients on a class's real batch and on its synthetic images;
:mod:`udd_jax.supervised.dc` distils with it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray, PyTree, Scalar

from udd_jax.supervised import augment as augment_lib
from udd_jax.supervised.image_updates import sum_over_classes
from udd_jax.supervised.networks import cross_entropy


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


def dc_loss(network: nn.Module, params: PyTree, real: Float[Array, "classes b H W C"],
            syn: Float[Array, "classes ipc H W C"], *, aug_keys: PRNGKeyArray | None = None,
            dsa_strategy: str = augment_lib.DSA_STRATEGY_DIGITS) -> Scalar:
  """DC's matching loss: ``sum_c match_distance(grad CE(real_c), grad CE(syn_c))``.

  Class ``c``'s batches are labelled ``c``; the gradients are w.r.t. the network
  parameters; the real gradient is a constant (``stop_gradient``), as in DC. Classes are
  an unrolled loop (:func:`~udd_jax.supervised.image_updates.sum_over_classes`). With ``aug_keys``
  (one key per class), both batches of class ``c`` are augmented by the same DSA transform
  drawn from ``aug_keys[c]`` (DSA).

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
  grad_fn = jax.grad(cross_entropy, argnums=1)

  def one_class(real_c, syn_c, label):
    g_real = jax.lax.stop_gradient(grad_fn(network, params, real_c, jnp.full(real_c.shape[0], label)))
    g_syn = grad_fn(network, params, syn_c, jnp.full(syn_c.shape[0], label))
    return match_distance(g_real, g_syn)

  return sum_over_classes(one_class, real, syn, aug_keys, dsa_strategy)
