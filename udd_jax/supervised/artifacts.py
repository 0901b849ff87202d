"""Saving and loading a :class:`SupervisedResult`: one ``.npz``, no pickle, written atomically.

The file holds ``format_version``, ``library_version``, ``images``, ``labels``,
``step_sizes`` (only when the method learned some) and ``config`` / ``history`` as JSON
strings, so it can be read with ``np.load(path, allow_pickle=False)`` alone.

Examples:
  >>> import tempfile, pathlib, numpy as np
  >>> result = SupervisedResult(np.zeros((2, 4, 4, 1), np.float32), np.array([0, 1]), {"method": "random", "ipc": 1})
  >>> path = save_result(result, pathlib.Path(tempfile.mkdtemp()) / "set.npz")
  >>> load_result(path).config
  {'method': 'random', 'ipc': 1}
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np

from udd_jax import io
from udd_jax.supervised.result import SupervisedResult

FORMAT_VERSION = 1
REQUIRED_FIELDS = ("images", "labels", "config", "history")


def _json_default(value: Any) -> Any:
  """numpy scalars and arrays in a config or history (e.g. a loss logged as ``np.float32``)."""
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def save_result(result: SupervisedResult, path: str | os.PathLike) -> pathlib.Path:
  """Writes ``result`` to ``path`` as one ``.npz`` (no pickle).

  The file is written to ``<path>.tmp``, flushed, fsynced and renamed over ``path``, so a
  crash leaves either the previous file or the complete new one.

  Args:
    result: the distilled set and its record.
    path: destination file (parent directories are created).

  Returns:
    ``path`` as a :class:`pathlib.Path`.

  Raises:
    TypeError: ``result`` is not a SupervisedResult, or its config / history is not
      JSON-serialisable.
  """
  if not isinstance(result, SupervisedResult):
    raise TypeError(f"result must be a SupervisedResult; got {type(result).__name__}.")
  texts = {}
  for name in ("config", "history"):
    try:
      texts[name] = json.dumps(getattr(result, name), default=_json_default)
    except (TypeError, ValueError) as e:
      raise TypeError(f"result.{name} is not JSON-serialisable: {e}") from None
  arrays = {
      "format_version": np.asarray(FORMAT_VERSION),
      "library_version": np.asarray(io.library_version()),
      "images": np.asarray(result.images),
      "labels": np.asarray(result.labels),
      "config": np.asarray(texts["config"]),
      "history": np.asarray(texts["history"]),
  }
  if result.step_sizes is not None:
    arrays["step_sizes"] = np.asarray(result.step_sizes)
  path = pathlib.Path(path)
  io.atomic_savez(path, arrays)
  return path


def load_result(path: str | os.PathLike) -> SupervisedResult:
  """Restores a :class:`SupervisedResult` written by :func:`save_result`.

  Args:
    path: the ``.npz`` file.

  Returns:
    The result, arrays bit-identical to those saved.

  Raises:
    FileNotFoundError: no such file.
    ValueError: naming the file: truncated or corrupted, not a udd_jax supervised result,
      an unknown format version, a missing field, unreadable JSON, or images and labels
      that do not match.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no supervised distilled set at {str(path)!r}.")
  try:
    with np.load(path, allow_pickle=False) as f:
      data = {k: f[k] for k in f.files}
  except Exception as e:
    raise ValueError(f"{path} is not a readable supervised distilled set (truncated or corrupted?): {e}") from None
  if "format_version" not in data:
    raise ValueError(f"{path} is not a udd_jax supervised distilled set: it has no format_version.")
  try:
    version = int(data["format_version"])
  except (TypeError, ValueError):
    raise ValueError(f"{path} has an unreadable format_version {data['format_version']!r}.") from None
  if version != FORMAT_VERSION:
    raise ValueError(f"{path} has format version {version}; this udd_jax reads version {FORMAT_VERSION}.")
  missing = [k for k in REQUIRED_FIELDS if k not in data]
  if missing:
    raise ValueError(f"{path} lacks the field(s) {missing}.")
  try:
    config, history = json.loads(str(data["config"])), json.loads(str(data["history"]))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} has a corrupted config or history field: {e}") from None
  if not isinstance(config, dict) or not isinstance(history, list):
    raise ValueError(f"{path} has a config that is not a dict or a history that is not a list.")
  images, labels = data["images"], data["labels"]
  if images.ndim < 1 or labels.ndim < 1 or images.shape[0] != labels.shape[0]:
    raise ValueError(f"{path} has images of shape {images.shape} and labels of shape {labels.shape}: they do not match.")
  return SupervisedResult(images=images, labels=labels, config=config, history=history, step_sizes=data.get("step_sizes"))
