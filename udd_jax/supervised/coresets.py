"""Coreset baselines of DC-BENCH: ``ipc`` real images per class, chosen at random, by herding or k-center.

Herding (Welling 2009, as in DC and DC-BENCH) picks greedily the sample that brings the
running mean of the chosen features closest to the class mean. k-center greedy starts from
the sample nearest the class mean and then adds the sample farthest from its nearest chosen
center. Both work on ``features`` (e.g. a network's embeddings) or, by default, on the
flattened pixels, and run for all classes at once: classes are padded to the largest class
size and ``vmap``-ped, the greedy steps are a ``fori_loop``.

Examples:
  >>> import numpy as np
  >>> x = np.array([[0.0], [1.0], [2.0], [10.0], [11.0], [13.0]])
  >>> y = np.array([0, 0, 0, 1, 1, 1])
  >>> images, labels = coreset(x, y, 1, method="herding")
  >>> images.ravel().tolist(), labels.tolist()
  ([1.0, 11.0], [0, 1])
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, Float, Int, PRNGKeyArray

from udd_jax import _validation
from udd_jax.supervised.base import as_key

CORESET_METHODS = ("random", "herding", "kcenter")


def sq_distances(features: jax.Array, point: jax.Array, sq_norms: jax.Array) -> jax.Array:
  """Squared Euclidean distances of the rows of ``features`` (squared norms ``sq_norms``) to ``point``."""
  return sq_norms - 2.0 * features @ point + jnp.dot(point, point)


@functools.partial(jax.jit, static_argnames=("ipc",))
def _herding(features: jax.Array, valid: jax.Array, *, ipc: int) -> jax.Array:
  """Herding order of one padded class ``(m, f)``: ``ipc`` row indices."""
  mean = jnp.sum(features * valid[:, None], axis=0) / jnp.sum(valid)
  sq_norms = jnp.sum(features**2, axis=1)

  def pick(t, state):
    chosen, total, order = state
    # The sample minimising ||(t + 1) * mean - (total + f_i)||: the new running mean is closest to the mean.
    d = sq_distances(features, (t + 1) * mean - total, sq_norms)
    i = jnp.argmin(jnp.where(valid & ~chosen, d, jnp.inf))
    return chosen.at[i].set(True), total + features[i], order.at[t].set(i)

  init = (jnp.zeros(valid.shape, bool), jnp.zeros_like(mean), jnp.zeros(ipc, int))
  return jax.lax.fori_loop(0, ipc, pick, init)[2]


@functools.partial(jax.jit, static_argnames=("ipc",))
def _kcenter(features: jax.Array, valid: jax.Array, *, ipc: int) -> jax.Array:
  """k-center greedy order of one padded class ``(m, f)``: ``ipc`` row indices."""
  mean = jnp.sum(features * valid[:, None], axis=0) / jnp.sum(valid)
  sq_norms = jnp.sum(features**2, axis=1)
  first = jnp.argmin(jnp.where(valid, sq_distances(features, mean, sq_norms), jnp.inf))
  # Padding rows get distance -inf to every center, so they are never the farthest.
  nearest = jnp.where(valid, sq_distances(features, features[first], sq_norms), -jnp.inf)

  def pick(t, state):
    nearest, order = state
    i = jnp.argmax(nearest)
    return jnp.minimum(nearest, sq_distances(features, features[i], sq_norms)), order.at[t].set(i)

  order = jnp.zeros(ipc, int).at[0].set(first)
  return jax.lax.fori_loop(1, ipc, pick, (nearest, order))[1]


@_validation.renamed(key="seed")
def coreset(
    x: Float[ArrayLike, "n ..."],
    y: Int[ArrayLike, " n"],
    ipc: int,
    *,
    method: str,
    seed: PRNGKeyArray | int | None = None,
    features: Float[ArrayLike, "n f"] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """``ipc`` real samples of every class of ``y``, chosen by ``method``.

  Args:
    x: real inputs ``(n, ...)`` (images of any shape).
    y: integer class labels ``(n,)``.
    ipc: samples per class; at most the size of the smallest class.
    method: ``"random"`` (uniform without replacement, needs ``seed``), ``"herding"`` or
      ``"kcenter"`` (deterministic, greedy on ``features``).
    seed: int seed or PRNG key for ``"random"``; not used by the others.
    features: ``(n, f)`` features the greedy methods compare (e.g. network embeddings);
      default: the flattened ``x``.

  Returns:
    ``(images, labels)``: ``(n_classes * ipc, ...)`` rows of ``x`` grouped by class (classes
    in increasing order; within a class in the order chosen, so the first ``k`` of a herding
    or k-center selection are its selection for ``ipc = k``) and their int32 labels.

  Raises:
    ValueError, TypeError: unknown method, ``ipc`` < 1 or larger than a class, shape or
      label mismatch, non-finite inputs, ``"random"`` without a seed.
  """
  _validation.check_choice(method, "method", CORESET_METHODS)
  x_arr = _validation.check_array(x, "x", min_ndim=2)
  y_arr = _validation.check_labels(y, "y", n=x_arr.shape[0])
  ipc = _validation.check_positive_int(ipc, "ipc")
  classes, counts = np.unique(y_arr, return_counts=True)
  if ipc > counts.min():
    smallest = classes[np.argmin(counts)]
    raise ValueError(f"ipc={ipc} exceeds the {counts.min()} samples of class {smallest}, the smallest class.")
  if method == "random":
    if seed is None:
      raise ValueError('method="random" needs a seed (an integer seed or a PRNG key).')
    u = np.asarray(jax.random.uniform(as_key(seed)[0], (x_arr.shape[0],)))
    # Sorting by (class, uniform score) and keeping the first ipc of each class draws a
    # uniformly random subset of every class in one vectorised pass.
    order = np.lexsort((u, y_arr))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    chosen = order[(starts[:, None] + np.arange(ipc)).ravel()]
  else:
    if features is None:
      feats = x_arr.reshape(x_arr.shape[0], -1)
    else:
      feats = _validation.check_array(features, "features", ndim=2)
      if feats.shape[0] != x_arr.shape[0]:
        raise ValueError(f"features has {feats.shape[0]} rows but x has {x_arr.shape[0]}.")
    if feats.dtype.kind != "f":
      feats = feats.astype(np.float32)
    chosen = _greedy(feats, y_arr, classes, counts, ipc, method)
  return x_arr[chosen], y_arr[chosen]


def _greedy(feats: np.ndarray, y: np.ndarray, classes: np.ndarray, counts: np.ndarray, ipc: int, method: str) -> np.ndarray:
  """Indices into ``feats`` of the greedy selection, every class at once (padded to the largest class)."""
  by_class = np.argsort(y, kind="stable")
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  slots = np.arange(counts.max())
  valid = slots[None, :] < counts[:, None]
  members = by_class[np.where(valid, starts[:, None] + slots[None, :], 0)]  # (classes, largest class)
  select = _herding if method == "herding" else _kcenter
  picks = jax.vmap(functools.partial(select, ipc=ipc))(jnp.asarray(feats)[members], jnp.asarray(valid))
  return np.take_along_axis(members, np.asarray(picks), axis=1).ravel()
