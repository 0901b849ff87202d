"""Recorded, invertible preprocessing of images into the flat vectors learners see.

A :class:`Preprocessing` is fitted on training images once and then saved with a
distilled set, so that the set can be mapped back into image space (``invert``)
and new data can be mapped the same way (``apply``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from udd_jax import _validation

PREPROCESSING_METHODS = ("none", "standardize", "zca")


@dataclasses.dataclass(frozen=True, eq=False)
class Preprocessing:
  """An affine, invertible map ``z = (flatten(x) - mean) @ matrix``.

  ``"none"`` only flattens; ``"standardize"`` divides each feature by its standard
  deviation (features that are constant keep scale 1); ``"zca"`` whitens with the
  regularised ZCA of KIP: ``matrix = U diag((lambda + reg)^-1/2) U^T`` with
  ``reg = zca_reg * mean(lambda)``, the eigen-decomposition of the feature covariance.

  Attributes:
    method: one of ``"none"``, ``"standardize"``, ``"zca"``.
    image_shape: trailing shape of one image, e.g. ``(28, 28)``.
    mean: per-feature mean subtracted before the linear map, shape ``(d,)``.
    matrix: the linear map, shape ``(d, d)`` (``None`` for ``"none"``; for
      ``"standardize"`` a vector of per-feature scales ``(d,)`` to divide by).
    inverse: the inverse of ``matrix`` (same convention).
    zca_reg: the ZCA regularisation strength (0 for the other methods).
  """

  method: str
  image_shape: tuple[int, ...]
  mean: np.ndarray
  matrix: np.ndarray | None = None
  inverse: np.ndarray | None = None
  zca_reg: float = 0.0

  @property
  def dim(self) -> int:
    """Number of features ``d`` after flattening."""
    return int(np.prod(self.image_shape))

  def apply(self, x: Any) -> np.ndarray:
    """Maps images of shape ``(n, *image_shape)`` to float32 features ``(n, d)``."""
    x = _validation.check_array(x, "x", min_ndim=1)
    if tuple(x.shape[1:]) != self.image_shape:
      raise ValueError(f"x must have shape (n, {', '.join(map(str, self.image_shape))}); got {x.shape}.")
    flat = x.reshape(x.shape[0], -1).astype(np.float64) - self.mean
    if self.method == "standardize":
      flat = flat / self.matrix
    elif self.method == "zca":
      flat = flat @ self.matrix
    return flat.astype(np.float32)

  def invert(self, z: Any) -> np.ndarray:
    """Maps features ``(n, d)`` back to images ``(n, *image_shape)`` in the original value space."""
    z = _validation.check_array(z, "z", ndim=2)
    if z.shape[1] != self.dim:
      raise ValueError(f"z must have shape (n, {self.dim}); got {z.shape}.")
    flat = z.astype(np.float64)
    if self.method == "standardize":
      flat = flat * self.inverse
    elif self.method == "zca":
      flat = flat @ self.inverse
    return (flat + self.mean).reshape((-1, *self.image_shape)).astype(np.float32)

  def to_dict(self) -> dict[str, np.ndarray]:
    """Plain numpy arrays, suitable for ``np.savez`` (no pickling needed)."""
    out = {
        "method": np.asarray(self.method),
        "image_shape": np.asarray(self.image_shape, dtype=np.int64),
        "mean": self.mean,
        "zca_reg": np.asarray(self.zca_reg),
    }
    if self.matrix is not None:
      out["matrix"] = self.matrix
      out["inverse"] = self.inverse
    return out

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
    """Restores a :class:`Preprocessing` saved with :meth:`to_dict`."""
    missing = [k for k in ("method", "image_shape", "mean", "zca_reg") if k not in d]
    if missing:
      raise ValueError(f"saved preprocessing lacks the field(s) {missing}.")
    method = _validation.check_choice(str(np.asarray(d["method"])), "preprocessing method", PREPROCESSING_METHODS)
    has_matrix = method != "none"
    if has_matrix and ("matrix" not in d or "inverse" not in d):
      raise ValueError(f"saved {method!r} preprocessing lacks its matrix or inverse.")
    return cls(
        method=method,
        image_shape=tuple(int(s) for s in np.asarray(d["image_shape"])),
        mean=np.asarray(d["mean"], dtype=np.float64),
        matrix=np.asarray(d["matrix"], dtype=np.float64) if has_matrix else None,
        inverse=np.asarray(d["inverse"], dtype=np.float64) if has_matrix else None,
        zca_reg=float(np.asarray(d["zca_reg"])),
    )


def resize_images(x: Any, shape: tuple[int, int], *, method: str = "linear") -> np.ndarray:
  """Resizes images ``(n, H, W)`` or ``(n, H, W, C)`` to ``shape`` (H', W'), e.g. USPS 16x16 to 28x28.

  This lets datasets of different sizes be tasks of one distillation. Uses
  ``jax.image.resize`` (``"linear"``, ``"cubic"``, ``"nearest"``, ...); values stay in [0, 1]
  for ``"linear"`` and ``"nearest"``.

  Examples:
    >>> import numpy as np
    >>> resize_images(np.ones((2, 16, 16), np.float32), (28, 28)).shape
    (2, 28, 28)
  """
  x = _validation.check_array(x, "x", min_ndim=3)
  if len(shape) != 2 or not all(isinstance(s, int) and s > 0 for s in shape):
    raise ValueError(f"shape must be two positive integers (height, width); got {shape!r}.")
  target = (x.shape[0], *shape, *x.shape[3:])
  out = jax.image.resize(np.asarray(x, np.float32), target, method=method)
  return np.asarray(out, np.float32)


def fit_preprocessing(x: Any, *, method: str = "none", zca_reg: float = 0.1) -> Preprocessing:
  """Fits a :class:`Preprocessing` on training images ``x`` of shape ``(n, *image_shape)``.

  Args:
    x: training images (at least rank 2: samples first).
    method: ``"none"`` (flatten only), ``"standardize"`` or ``"zca"``.
    zca_reg: ZCA regularisation relative to the mean eigenvalue (KIP uses 0.1).

  Returns:
    The fitted, invertible :class:`Preprocessing`.

  Examples:
    >>> import numpy as np
    >>> x = np.random.default_rng(0).uniform(size=(100, 4, 4))
    >>> prep = fit_preprocessing(x, method="zca")
    >>> z = prep.apply(x)
    >>> z.shape, bool(np.allclose(prep.invert(z), x, atol=1e-5))
    ((100, 16), True)
  """
  method = _validation.check_choice(method, "method", PREPROCESSING_METHODS)
  x = _validation.check_array(x, "x", min_ndim=2)
  zca_reg = _validation.check_positive_float(zca_reg, "zca_reg")
  image_shape = tuple(int(s) for s in x.shape[1:])
  flat = x.reshape(x.shape[0], -1).astype(np.float64)
  d = flat.shape[1]
  if method == "none":
    return Preprocessing(method, image_shape, np.zeros(d))
  mean = flat.mean(axis=0)
  centred = flat - mean
  if method == "standardize":
    std = centred.std(axis=0)
    scale = np.where(std > 1e-8, std, 1.0)
    return Preprocessing(method, image_shape, mean, scale, scale.copy())
  cov = centred.T @ centred / flat.shape[0]
  eigvals, eigvecs = np.linalg.eigh(cov)
  eigvals = np.clip(eigvals, 0.0, None) + zca_reg * max(float(eigvals.mean()), 1e-12)
  whiten = (eigvecs / np.sqrt(eigvals)) @ eigvecs.T
  colour = (eigvecs * np.sqrt(eigvals)) @ eigvecs.T
  return Preprocessing(method, image_shape, mean, whiten, colour, zca_reg)
