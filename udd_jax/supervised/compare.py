"""Supervised and unsupervised distilled sets side by side, under both protocols.

An unsupervised distilled set (``udd_jax.distill``) has no labels, so the DC-BENCH
evaluation cannot train on it as it is: :func:`from_unsupervised` gives its images the
labels of their nearest real training images (Euclidean, in the standardised pixel space
the supervised methods work in), by default with every class given ``ipc`` images
(:func:`balanced_labels`), and returns a :class:`SupervisedResult` that the
evaluation of ``experiment.run`` takes like any distilled set. The other way round,
:func:`feature_probe` runs the unsupervised protocol of docs/METHOD.md section 5 (a tied autoencoder
trained on the set's images alone, a logistic head on its features of the real data) on
any set, so every method gets a figure in the unsupervised protocol too.

Examples:
  >>> import numpy as np
  >>> train = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0]])
  >>> nearest_labels(np.array([[4.0, 4.5], [0.2, -0.1]]), train, np.array([0, 0, 1])).tolist()
  [1, 0]
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
from jaxtyping import Array, ArrayLike, Float, Int

from udd_jax import _validation
from udd_jax.driver import load_distilled
from udd_jax.evaluation import evaluate
from udd_jax.training import STANDARD_RECIPE, Recipe
from udd_jax.supervised import coresets
from udd_jax.supervised.result import SupervisedResult

NEAREST_CHUNK = 256  # distilled images per distance block against the whole training set


def nearest_labels(
    images: Float[ArrayLike, "n ..."], x_train: Float[ArrayLike, "m ..."], y_train: Int[ArrayLike, " m"]
) -> np.ndarray:
  """The label of each image's nearest training image (squared Euclidean distance, flattened).

  Args:
    images: ``(n, ...)`` images to label.
    x_train: ``(m, ...)`` labelled images of the same trailing shape, in the same space.
    y_train: ``(m,)`` their integer labels.

  Returns:
    ``(n,)`` int32 labels.
  """
  images, x_train, y_train = _check_labelling(images, x_train, y_train)
  return np.argmin(_class_distances(images, x_train, y_train), axis=1).astype(np.int32)


@functools.partial(jax.jit, static_argnames=("n_classes",))
def _class_distances_block(queries: Array, train: Array, labels: Array, n_classes: int) -> Array:
  """``(q, classes)``: each query's squared distance to its nearest training image of each class."""
  sq_norms = jnp.sum(train * train, axis=1)
  d = jax.vmap(lambda q: coresets.sq_distances(train, q, sq_norms))(queries)  # (q, m)
  return jax.ops.segment_min(d.T, labels, num_segments=n_classes).T


def _class_distances(images: np.ndarray, x_train: np.ndarray, y_train: np.ndarray) -> np.ndarray:
  """``(n, classes)``: each image's squared distance to the nearest training image of each class
  (``inf`` for a class without one), ``NEAREST_CHUNK`` images at a time against the whole training set."""
  train = jnp.asarray(x_train.reshape(x_train.shape[0], -1), jnp.float32)
  flat = images.reshape(images.shape[0], -1).astype(np.float32)
  labels, n_classes = jnp.asarray(y_train), int(y_train.max()) + 1
  return np.concatenate([np.asarray(_class_distances_block(jnp.asarray(flat[i:i + NEAREST_CHUNK]), train, labels,
                                                           n_classes))
                         for i in range(0, flat.shape[0], NEAREST_CHUNK)])


def balanced_labels(
    images: Float[ArrayLike, "n ..."], x_train: Float[ArrayLike, "m ..."], y_train: Int[ArrayLike, " m"], *,
    ipc: int,
) -> np.ndarray:
  """Nearest-real-image labels with every class given exactly ``ipc`` images.

  The assignment of images to classes (``ipc`` slots per class) that minimises the sum, over
  images, of the squared Euclidean distance to the nearest training image of the class
  given (a linear assignment problem, solved exactly by ``scipy.optimize.linear_sum_assignment``).
  Where :func:`nearest_labels` is already balanced, the two agree.

  Args:
    images: ``(n, ...)`` images to label, ``n = ipc * classes``.
    x_train: ``(m, ...)`` labelled images of the same trailing shape, in the same space.
    y_train: ``(m,)`` their integer labels, classes ``0 .. classes - 1``, every class present.
    ipc: images per class.

  Returns:
    ``(n,)`` int32 labels, each class ``ipc`` times.

  Examples:
    >>> import numpy as np
    >>> train = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0]])
    >>> balanced_labels(np.array([[0.0, 0.1], [0.2, -0.1]]), train, np.array([0, 0, 1]), ipc=1).tolist()
    [1, 0]
  """
  images, x_train, y_train = _check_labelling(images, x_train, y_train)
  ipc = _validation.check_positive_int(ipc, "ipc")
  counts = np.bincount(y_train)
  n_classes = counts.size
  if not np.all(counts):
    raise ValueError(f"y_train lacks class(es) {np.flatnonzero(counts == 0).tolist()}: every class needs a training "
                     "image to be assigned.")
  if images.shape[0] != ipc * n_classes:
    raise ValueError(f"images has {images.shape[0]} rows; ipc={ipc} with {n_classes} classes needs {ipc * n_classes}.")
  cost = _class_distances(images, x_train, y_train).astype(np.float64)
  rows, slots = scipy.optimize.linear_sum_assignment(np.repeat(cost, ipc, axis=1))
  labels = np.empty(images.shape[0], np.int32)
  labels[rows] = slots // ipc
  return labels


def _check_labelling(images, x_train, y_train) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  images = _validation.check_array(images, "images", floating=True, min_ndim=2)
  x_train = _validation.check_array(x_train, "x_train", floating=True, min_ndim=2)
  y_train = _validation.check_labels(y_train, "y_train", n=x_train.shape[0])
  if images.shape[1:] != x_train.shape[1:]:
    raise ValueError(f"images have shape {images.shape[1:]} but x_train {x_train.shape[1:]}: label in one space.")
  return np.asarray(images), np.asarray(x_train), np.asarray(y_train)


LABEL_DESCRIPTIONS = {
    "balanced": "nearest real training image, ipc per class (balanced assignment)",
    "nearest": "nearest real training image",
}


def from_unsupervised(
    path: str | os.PathLike,
    prepare: Callable[[np.ndarray], np.ndarray],
    z_train: Float[ArrayLike, "m H W C"],
    y_train: Int[ArrayLike, " m"],
    *,
    ipc: int,
    labels: str = "balanced",
) -> SupervisedResult:
  """An unsupervised distilled set (``distilled.npz``) as a labelled set for the DC-BENCH evaluation.

  Args:
    path: the ``distilled.npz`` that ``udd_jax.distill`` wrote.
    prepare: the supervised preprocessing, raw images ``(n, H, W)`` to ``(n, H, W, C)``.
    z_train: the real training images after ``prepare``.
    y_train: their labels.
    ipc: images per class the set stands for: it must hold ``ipc * classes`` images.
    labels: ``"balanced"`` (the default: :func:`balanced_labels`, every class ``ipc``
      images, as every supervised set of the table has) or ``"nearest"`` (:func:`nearest_labels`:
      each image's nearest real image's label, which may leave classes without an image).

  Returns:
    The set in the supervised space with those labels; ``config`` records the source, the
    labelling, the unsupervised config and the label counts.
  """
  _validation.check_choice(labels, "labels", tuple(LABEL_DESCRIPTIONS))
  distilled = load_distilled(path)
  y_train = np.asarray(y_train)
  n_classes = int(y_train.max()) + 1
  images = np.asarray(distilled.images)
  if images.shape[0] != ipc * n_classes:
    raise ValueError(f"{os.fspath(path)!r} holds {images.shape[0]} images; ipc={ipc} with {n_classes} classes needs "
                     f"{ipc * n_classes}.")
  z = prepare(images)
  if z.shape[1:] != tuple(np.shape(z_train)[1:]):
    raise ValueError(f"{os.fspath(path)!r} holds images of shape {images.shape[1:]}, which do not map to the "
                     f"training images' shape {tuple(np.shape(z_train)[1:])} (another dataset?).")
  if labels == "balanced":
    assigned = balanced_labels(z, z_train, y_train, ipc=ipc)
  else:
    assigned = nearest_labels(z, z_train, y_train)
  cfg = distilled.config
  config = dict(method="udd", ipc=ipc, source=os.fspath(path), labels=LABEL_DESCRIPTIONS[labels],
                label_counts=np.bincount(assigned, minlength=n_classes).tolist(), iterations=cfg.get("steps"),
                seconds=cfg.get("seconds"), unsupervised_config=cfg)
  return SupervisedResult(images=np.asarray(z, np.float32), labels=assigned, config=config)


@_validation.renamed(seeds="n_seeds")
def feature_probe(
    images: Float[ArrayLike, "n H W"],
    train: tuple[Any, Any],
    test: tuple[Any, Any],
    *,
    n_hidden: int = 128,
    n_seeds: int = 3,
    recipe: Recipe | dict[str, Any] | None = None,
    n_train: int | None = 10_000,
) -> dict[str, Any]:
  """The unsupervised protocol on any set: tied AE trained on ``images``, logistic head on real features.

  Args:
    images: the set in raw pixel space (as ``load_dataset`` gives images; labels unused).
    train, test: real labelled ``(x, y)`` in the same space.
    n_hidden: hidden units K of the autoencoder.
    n_seeds: fresh autoencoder inits.
    recipe: how the autoencoder trains on the set (default ``udd_jax.training.STANDARD_RECIPE``:
      Adam 3e-3, full batch until convergence).
    n_train: the head trains on the first ``n_train`` training images (None: all of them;
      the full protocol's head on 60k images costs minutes per set on a CPU).

  Returns:
    ``accuracies``, ``mean``, ``std``, the ``recipe`` config, ``n_hidden`` and ``n_train``.
  """
  x_train, y_train = train
  if n_train is not None:
    n_train = _validation.check_positive_int(n_train, "n_train")
    x_train, y_train = x_train[:n_train], y_train[:n_train]
  if isinstance(recipe, dict):
    recipe = Recipe.from_config(recipe)
  standard = STANDARD_RECIPE if recipe is None else recipe
  report = evaluate(images, (x_train, y_train), test, n_hidden=n_hidden, inner="ae", standard_recipe=standard,
                             n_seeds=n_seeds, baselines=())
  row = report.rows[0]
  return dict(accuracies=row.accuracies, mean=row.mean, std=row.std, recipe=report.settings["recipes"]["standard"],
              n_hidden=n_hidden, n_train=int(len(y_train)))
