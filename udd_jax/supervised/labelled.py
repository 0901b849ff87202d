"""Labelled real data for the supervised methods: checks, class-major sets, class-balanced sampling.

A distilled set is class-major (``ipc`` images of class 0, then of class 1, ...):
:func:`synthetic_labels` gives its labels. :class:`ClassData` sorts the real images by
class so that :func:`sample_class_batches` draws class batches inside ``jit`` (DC, DSA,
DM); :func:`class_table` and :func:`sample_balanced` draw class-balanced index batches
(KIP's target batches).

Examples:
  >>> synthetic_labels(3, 2).tolist()
  [0, 0, 1, 1, 2, 2]
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike
from jaxtyping import Array, Float, Int, PRNGKeyArray

from udd_jax import _validation
from udd_jax.supervised import networks as networks_lib


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
  random images (``"random"``): standard normal noise, DC's ``torch.randn`` in the standardised space."""
  n_classes = data.starts.shape[0]
  if init == "random":
    return jax.random.normal(key, (n_classes * ipc, *data.images.shape[1:]), data.images.dtype)
  return sample_class_batches(data, key, ipc).reshape(n_classes * ipc, *data.images.shape[1:])


def class_table(y: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """Indices of each class padded to a rectangle ``(n_classes, max_count)``, and the counts."""
  counts = np.bincount(y, minlength=n_classes)
  table = np.zeros((n_classes, counts.max()), np.int32)
  for c in range(n_classes):
    table[c, : counts[c]] = np.flatnonzero(y == c)
  return table, counts.astype(np.int32)


def sample_balanced(key: PRNGKeyArray, table: Array, counts: Array, per_class: int) -> Int[Array, " n"]:
  """``per_class`` indices drawn uniformly (with replacement) from every class of a :func:`class_table`."""
  u = jax.random.uniform(key, (table.shape[0], per_class))
  rows = jnp.minimum((u * counts[:, None]).astype(jnp.int32), counts[:, None] - 1)
  return jnp.take_along_axis(table, rows, axis=1).ravel()
