"""KIP's regularised ZCA preprocessing: per-image "layer norm", then ZCA whitening."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from jaxtyping import ArrayLike, Float

from udd_jax import _validation
from udd_jax.data import Preprocessing, fit_preprocessing


@dataclasses.dataclass(frozen=True, eq=False)
class KipPreprocessing:
  """KIP's regularised ZCA: per-image "layer norm", then ZCA whitening.

  Each flattened image is centred on its own mean and scaled to unit norm, then whitened
  by ``zca``, the library's :class:`udd_jax.Preprocessing` fitted on the normalised
  training images (``U diag((lambda + zca_reg * mean(lambda))^-1/2) U^T``, the same
  relative regulariser as KIP). One difference from KIP's code: ``zca`` subtracts the
  training mean of the normalised images before whitening, while KIP whitens with the
  uncentred second-moment matrix and keeps the mean.

  Attributes:
    zca: the fitted whitening (``method == "zca"``).
    layer_norm: whether images are centred and normalised one by one first.
  """

  zca: Preprocessing
  layer_norm: bool = True

  def apply(self, x: Float[ArrayLike, "n ..."]) -> np.ndarray:
    """Preprocesses images ``(n, *image_shape)``; returns float32 of the same shape."""
    x = _validation.check_array(x, "x", min_ndim=2)
    if tuple(x.shape[1:]) != self.zca.image_shape:
      raise ValueError(f"x must have shape (n, {', '.join(map(str, self.zca.image_shape))}); got {x.shape}.")
    flat = x.reshape(x.shape[0], -1).astype(np.float64)
    if self.layer_norm:
      flat = _layer_norm(flat)
    return self.zca.apply(flat.reshape(x.shape)).reshape(x.shape)

  def config(self) -> dict[str, Any]:
    """The JSON-serialisable parameters (recorded in a result's ``config["preprocessing"]``)."""
    return {"method": "kip_zca", "zca_reg": self.zca.zca_reg, "layer_norm": self.layer_norm, "centred": True}


def _layer_norm(flat: np.ndarray) -> np.ndarray:
  flat = flat - flat.mean(axis=1, keepdims=True)
  norms = np.linalg.norm(flat, axis=1, keepdims=True)
  return flat / np.where(norms > 0, norms, 1.0)


def kip_preprocessing(x_train: Float[ArrayLike, "n ..."], *, zca_reg: float = 0.1, layer_norm: bool = True) -> KipPreprocessing:
  """Fits KIP's regularised ZCA preprocessing (:class:`KipPreprocessing`) on training images.

  KIP uses it for RGB datasets; for grey datasets (MNIST, Fashion-MNIST) the KIP papers
  use channel-wise standardisation instead.

  Args:
    x_train: training images ``(n, *image_shape)``.
    zca_reg: ZCA regularisation relative to the mean eigenvalue (KIP: 0.1).
    layer_norm: centre and normalise each image before whitening, as KIP does.

  Returns:
    The fitted preprocessing; apply it to training and test images alike.

  Examples:
    >>> import numpy as np
    >>> x = np.random.default_rng(0).uniform(size=(50, 4, 4))
    >>> prep = kip_preprocessing(x)
    >>> prep.apply(x).shape, prep.config()["zca_reg"]
    ((50, 4, 4), 0.1)
  """
  x = _validation.check_array(x_train, "x_train", min_ndim=2)
  if not isinstance(layer_norm, bool):
    raise TypeError(f"layer_norm must be a bool; got {type(layer_norm).__name__}.")
  flat = x.reshape(x.shape[0], -1).astype(np.float64)
  if layer_norm:
    flat = _layer_norm(flat)
  return KipPreprocessing(fit_preprocessing(flat.reshape(x.shape), method="zca", zca_reg=zca_reg), layer_norm)
