"""A distilled set with what it takes to use and reproduce it, saved as one versioned ``.npz``."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import numpy as np

from udd_jax import io
from udd_jax.data.preprocessing import Preprocessing
from udd_jax.inner.grbm import GRBMParams
from udd_jax.training.recipes import Recipe

FORMAT_VERSION = 1
_FIELDS = ("images", "params_W", "params_b", "params_a", "config", "history")


@dataclasses.dataclass
class DistillResult:
  """A distilled set with everything needed to use, re-train from and reproduce it.

  Attributes:
    images: the distilled set, (n_distill, *image_shape), in the value space of the input ``x``.
    params: the inner parameters at the end of distillation (the jointly learned w for
      penalty / value function; the last inner solution otherwise).
    history: one dict of metrics per logged step.
    config: every setting of the run, with the inner recipe under ``inner_optimizer``,
      ``inner_lr``, ``inner_steps``, ``init_scale``.
    preprocessing: the map from value space to the learner's inputs.
  """

  images: np.ndarray
  params: GRBMParams
  history: list[dict[str, float]]
  config: dict[str, Any]
  preprocessing: Preprocessing

  @property
  def recipe(self) -> Recipe:
    """The inner recipe that re-trains a learner on :attr:`images`."""
    return Recipe.from_config(self.config)

  def save(self, path: str | os.PathLike) -> pathlib.Path:
    """Writes one ``.npz`` (no pickle), atomically: write to a temporary file, then rename."""
    arrays = {
        "format_version": np.asarray(FORMAT_VERSION),
        "library_version": np.asarray(io.library_version()),
        "images": np.asarray(self.images),
        "params_W": np.asarray(self.params.W),
        "params_b": np.asarray(self.params.b),
        "params_a": np.asarray(self.params.a),
        "config": np.asarray(json.dumps(self.config)),
        "history": np.asarray(json.dumps(self.history)),
    }
    arrays.update({f"preprocessing_{k}": v for k, v in self.preprocessing.to_dict().items()})
    return io.atomic_savez(path, arrays)


def load_distilled(path: str | os.PathLike) -> DistillResult:
  """Restores a :class:`DistillResult` written by :meth:`DistillResult.save`.

  Raises:
    FileNotFoundError: no such file.
    ValueError: not an ``.npz``, truncated or corrupted, a missing field, or an unknown
      format version.
  """
  data = io.read_npz(path, "distilled set")
  if "format_version" not in data:
    raise ValueError(f"{path} is not a udd_jax distilled set: it has no format_version.")
  version = int(data["format_version"])
  if version != FORMAT_VERSION:
    raise ValueError(f"{path} has format version {version}; this udd_jax reads version {FORMAT_VERSION}.")
  missing = [k for k in _FIELDS if k not in data]
  if missing:
    raise ValueError(f"{path} lacks the field(s) {missing}.")
  prep = {k[len("preprocessing_"):]: v for k, v in data.items() if k.startswith("preprocessing_")}
  try:
    history, config = json.loads(str(data["history"])), json.loads(str(data["config"]))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} has a corrupted config or history field: {e}") from None
  return DistillResult(
      images=data["images"],
      params=GRBMParams(data["params_W"], data["params_b"], data["params_a"]),
      history=history,
      config=config,
      preprocessing=Preprocessing.from_dict(prep),
  )
