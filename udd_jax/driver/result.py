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
from udd_jax.inner import learners
from udd_jax.training.recipes import Recipe

# 2: the learner's parameters under ``params/<name>`` (InnerLearner.to_arrays), the recipe
# under ``config["recipe"]``. 1: GRBM parameters as params_W, params_b, params_a and the
# recipe's keys (``inner_steps`` for ``steps``) at the top of the config; still read.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
_FIELDS = ("images", "config", "history")
_V1_PARAMS = {"W": "params_W", "b": "params_b", "a": "params_a"}
_V1_RECIPE_KEYS = ("inner_optimizer", "inner_lr", "inner_steps", "init_scale", "until_converged", "max_steps")


def learner_from_config(config: dict[str, Any]) -> learners.InnerLearner:
  """The registered learner a distilled set's config names (``inner``, with ``problem_options``' sigma2 / noise_std).

  Raises:
    ValueError: the config names a learner that is not registered (pass that learner itself).
  """
  name = config.get("inner", "ae")
  if name not in learners.LEARNERS:
    raise ValueError(f"the distilled set was made with the learner {name!r}, which udd_jax does not register: pass "
                     "that learner (load_distilled(path, learner=...)).")
  options = config.get("problem_options", {})
  return learners.get_inner_learner(name, **{k: options[k] for k in ("sigma2", "noise_std") if k in options})


@dataclasses.dataclass
class DistillResult:
  """A distilled set with everything needed to use, re-train from and reproduce it.

  Attributes:
    images: the distilled set, (n_distill, *image_shape), in the value space of the input ``x``.
    params: the inner parameters at the end of distillation (the jointly learned w for
      penalty / value function; the last inner solution otherwise), a pytree of the learner's.
    history: one dict of metrics per logged step.
    config: every setting of the run, with the learner's name under ``inner`` and the inner
      recipe under ``recipe`` (:meth:`Recipe.to_config`).
    preprocessing: the map from value space to the learner's inputs.
    learner: the inner learner that ``params`` belong to (None: the registered one the
      config names).
  """

  images: np.ndarray
  params: Any
  history: list[dict[str, float]]
  config: dict[str, Any]
  preprocessing: Preprocessing
  learner: learners.InnerLearner | None = None

  def __post_init__(self):
    if self.learner is None:
      self.learner = learner_from_config(self.config)

  @property
  def recipe(self) -> Recipe:
    """The inner recipe that re-trains a learner on :attr:`images`."""
    if "recipe" in self.config:
      return Recipe.from_config(self.config["recipe"])
    return Recipe.from_config({k: self.config[k] for k in _V1_RECIPE_KEYS if k in self.config})  # format 1

  def save(self, path: str | os.PathLike) -> pathlib.Path:
    """Writes one ``.npz`` (no pickle), atomically: write to a temporary file, then rename."""
    arrays = {
        "format_version": np.asarray(FORMAT_VERSION),
        "library_version": np.asarray(io.library_version()),
        "images": np.asarray(self.images),
        "config": np.asarray(json.dumps(self.config)),
        "history": np.asarray(json.dumps(self.history)),
    }
    arrays.update({f"params/{k}": np.asarray(v) for k, v in self.learner.to_arrays(self.params).items()})
    arrays.update({f"preprocessing_{k}": v for k, v in self.preprocessing.to_dict().items()})
    return io.atomic_savez(path, arrays)


def load_distilled(path: str | os.PathLike, learner: learners.InnerLearner | None = None) -> DistillResult:
  """Restores a :class:`DistillResult` written by :meth:`DistillResult.save` (format 1 or 2).

  Args:
    path: the ``.npz``.
    learner: the learner the set was made with; None: the registered one its config names.

  Raises:
    FileNotFoundError: no such file.
    ValueError: not an ``.npz``, truncated or corrupted, a missing field, an unknown
      format version, or a learner udd_jax does not register and ``learner`` is None.
  """
  data = io.read_npz(path, "distilled set")
  if "format_version" not in data:
    raise ValueError(f"{path} is not a udd_jax distilled set: it has no format_version.")
  version = int(data["format_version"])
  if version not in READABLE_VERSIONS:
    raise ValueError(f"{path} has format version {version}; this udd_jax reads versions {list(READABLE_VERSIONS)}.")
  missing = [k for k in _FIELDS + (tuple(_V1_PARAMS.values()) if version == 1 else ()) if k not in data]
  if missing:
    raise ValueError(f"{path} lacks the field(s) {missing}.")
  prep = {k[len("preprocessing_"):]: v for k, v in data.items() if k.startswith("preprocessing_")}
  try:
    history, config = json.loads(str(data["history"])), json.loads(str(data["config"]))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} has a corrupted config or history field: {e}") from None
  learner = learner_from_config(config) if learner is None else learner
  if version == 1:
    arrays = {name: data[key] for name, key in _V1_PARAMS.items()}
  else:
    arrays = {k[len("params/"):]: v for k, v in data.items() if k.startswith("params/")}
  try:
    params = learner.from_arrays(arrays)
  except (KeyError, ValueError, TypeError) as e:
    raise ValueError(f"{path} holds parameters the {learner.name} learner cannot read: {e}") from None
  return DistillResult(images=data["images"], params=params, history=history, config=config,
                       preprocessing=Preprocessing.from_dict(prep), learner=learner)
