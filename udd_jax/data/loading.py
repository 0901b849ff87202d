"""Offline dataset loading: the embedded digits, local ``.npz`` / IDX files, and tfds.

Nothing here downloads. Real data is read from a directory given by the
``data_dir`` argument or the ``UDD_DATA_DIR`` environment variable.
"""

from __future__ import annotations

import gzip
import importlib.resources
import os
import pathlib
from typing import Any

import numpy as np

from udd_jax import _validation

DATA_DIR_ENV = "UDD_DATA_DIR"

BUILTIN_DATASETS = ("digits", "mnist_10k", "mnist", "fashion_mnist", "usps")
EMBEDDED_DATASETS = ("digits", "mnist_10k")  # shipped inside the package: no data_dir needed

# The 1797 8x8 images of scikit-learn's ``load_digits`` (UCI optdigits test set,
# values 0..16), embedded so that the default job needs no files. Split in file
# order: the first 1437 (80%) for training, the last 360 for testing.
_DIGITS_FILE = "digits.csv.gz"
_DIGITS_N_TRAIN = 1437
# MNIST (LeCun, Cortes & Burges), 28x28, a part small enough to ship (2 MB): the first 10,000
# training images and every fifth test image (indices 0, 5, ..., 9995; the test set's first
# half is cleaner than its second, and every fifth takes both alike), uint8 as published.
_MNIST_10K_FILE = "mnist_10k.npz"

_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

Split = tuple[np.ndarray, np.ndarray]


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> pathlib.Path | None:
  """Returns the data directory from the argument, else ``$UDD_DATA_DIR``, else None.

  Raises:
    FileNotFoundError: if the directory given (by argument or variable) does not exist.
  """
  source = "data_dir"
  if data_dir is None:
    data_dir = os.environ.get(DATA_DIR_ENV) or None
    source = f"${DATA_DIR_ENV}"
  if data_dir is None:
    return None
  if not isinstance(data_dir, (str, os.PathLike)):
    raise TypeError(f"data_dir must be a path; got {type(data_dir).__name__}.")
  path = pathlib.Path(data_dir).expanduser()
  if not path.is_dir():
    raise FileNotFoundError(f"{source} {str(path)!r} is not an existing directory.")
  return path


def load_dataset(name: str, *, data_dir: str | os.PathLike | None = None) -> tuple[Split, Split]:
  """Loads a labelled image dataset, offline.

  Sources, in order: the embedded ``digits`` and ``mnist_10k``; ``<data_dir>/<name>.npz`` with
  arrays ``x_train, y_train, x_test, y_test`` (the format of ``shared/data``);
  the four original IDX files (``train-images-idx3-ubyte[.gz]`` and so on) in
  ``<data_dir>/<name>/``; finally, when tensorflow-datasets is installed, an
  already prepared tfds dataset of that name (never downloaded).

  Args:
    name: ``"digits"`` (8x8, embedded), ``"mnist_10k"`` (28x28, embedded: the first 10,000
      MNIST training images and every fifth test image, 2,000), ``"mnist"``,
      ``"fashion_mnist"``, ``"usps"``, or any name tensorflow-datasets knows.
    data_dir: directory holding the files; defaults to ``$UDD_DATA_DIR``.

  Returns:
    ``((x_train, y_train), (x_test, y_test))``: float32 images in ``[0, 1]`` of
    shape ``(n, H, W)`` (or ``(n, H, W, C)`` for colour images) and int32 labels.

  Raises:
    ValueError: unknown name, or a file whose contents are malformed.
    FileNotFoundError: no source holds the dataset; the message lists what was looked for.

  Examples:
    >>> (x_train, y_train), (x_test, y_test) = load_dataset("digits")
    >>> x_train.shape, x_test.shape, x_train.dtype, y_train.dtype
    ((1437, 8, 8), (360, 8, 8), dtype('float32'), dtype('int32'))
  """
  if not isinstance(name, str):
    raise TypeError(f"name must be a dataset name string; got {type(name).__name__}.")
  if name in EMBEDDED_DATASETS:
    if data_dir is not None:  # embedded, but a data_dir given by mistake should not pass silently
      resolve_data_dir(data_dir)
    if name == "digits":
      return _load_digits()
    with importlib.resources.as_file(importlib.resources.files("udd_jax.data").joinpath(_MNIST_10K_FILE)) as path:
      return _load_npz(path)
  path = resolve_data_dir(data_dir)
  looked_for: list[str] = []
  if path is not None:
    npz = path / f"{name}.npz"
    looked_for.append(str(npz))
    if npz.is_file():
      return _load_npz(npz)
    idx_dir = path / name
    looked_for.append(f"{idx_dir}/{{{','.join(_IDX_FILES.values())}}}[.gz]")
    if idx_dir.is_dir() and all(_find_idx(idx_dir, f) for f in _IDX_FILES.values()):
      return _load_idx_dir(idx_dir)
  tfds_result, tfds_status, tfds_note = _try_tfds(name)
  if tfds_result is not None:
    return tfds_result
  if name not in BUILTIN_DATASETS and tfds_status != "unprepared":
    raise ValueError(
        f"unknown dataset {name!r}; valid names are {list(BUILTIN_DATASETS)}"
        f" or a dataset that tensorflow-datasets knows (tensorflow-datasets: {tfds_note})."
    )
  where = "; ".join(looked_for) if looked_for else f"nowhere: no data_dir given and ${DATA_DIR_ENV} is unset"
  raise FileNotFoundError(
      f"no data found for dataset {name!r}. Looked for: {where}; tensorflow-datasets: {tfds_note}. "
      f"Provide a directory holding {name}.npz (arrays x_train, y_train, x_test, y_test) or the "
      f"four IDX files in {name}/, via load_dataset(..., data_dir=...) or ${DATA_DIR_ENV}."
  )


def _to_unit_float(x: np.ndarray, source: str) -> np.ndarray:
  if x.dtype == np.uint8:
    return x.astype(np.float32) / 255.0
  x = x.astype(np.float32)
  if x.min() < 0.0 or x.max() > 1.0:
    raise ValueError(f"{source}: float images must lie in [0, 1]; got range [{x.min()}, {x.max()}].")
  return x


def _checked(x: Any, y: Any, source: str, split: str) -> Split:
  x = _validation.check_array(x, f"{source} x_{split}", min_ndim=3)
  y = _validation.check_labels(y, f"{source} y_{split}", n=x.shape[0])
  return _to_unit_float(x, source), y


def _load_digits() -> tuple[Split, Split]:
  ref = importlib.resources.files("udd_jax.data").joinpath(_DIGITS_FILE)
  with ref.open("rb") as f, gzip.open(f, "rt") as text:
    table = np.loadtxt(text, delimiter=",", dtype=np.float32)
  x = (table[:, :-1] / 16.0).reshape(-1, 8, 8)
  y = table[:, -1].astype(np.int32)
  n = _DIGITS_N_TRAIN
  return (x[:n], y[:n]), (x[n:], y[n:])


def _load_npz(path: pathlib.Path) -> tuple[Split, Split]:
  try:
    archive = np.load(path, allow_pickle=False)
  except Exception as e:
    raise ValueError(f"{path} could not be read as an .npz archive: {e}") from None
  with archive:
    missing = [k for k in _IDX_FILES if k not in archive.files]
    if missing:
      raise ValueError(f"{path} lacks the array(s) {missing}; it holds {archive.files}.")
    # usps.npz keeps the exact float values beside the rounded uint8 images.
    x_train = archive["x_train_f32"] if "x_train_f32" in archive.files else archive["x_train"]
    x_test = archive["x_test_f32"] if "x_test_f32" in archive.files else archive["x_test"]
    train = _checked(x_train, archive["y_train"], str(path), "train")
    test = _checked(x_test, archive["y_test"], str(path), "test")
  return train, test


def _find_idx(directory: pathlib.Path, stem: str) -> pathlib.Path | None:
  for candidate in (directory / stem, directory / f"{stem}.gz"):
    if candidate.is_file():
      return candidate
  return None


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads one IDX file (the original MNIST format), gzipped or not."""
  path = pathlib.Path(path)
  opener = gzip.open if path.suffix == ".gz" else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise ValueError(f"{path} could not be read: {e}") from None
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()}).")
  ndim = data[3]
  header = 4 + 4 * ndim
  shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
  dtype = np.dtype(_IDX_DTYPES[data[2]])
  expected = header + int(np.prod(shape)) * dtype.itemsize
  if len(data) != expected:
    raise ValueError(f"{path} is truncated or corrupt: header says shape {shape} ({expected} bytes), file has {len(data)}.")
  return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _load_idx_dir(directory: pathlib.Path) -> tuple[Split, Split]:
  arrays = {k: read_idx(_find_idx(directory, stem)) for k, stem in _IDX_FILES.items()}
  source = str(directory)
  return (
      _checked(arrays["x_train"], arrays["y_train"], source, "train"),
      _checked(arrays["x_test"], arrays["y_test"], source, "test"),
  )


def _try_tfds(name: str) -> tuple[tuple[Split, Split] | None, str, str]:
  """Loads a prepared tfds dataset without downloading.

  Returns:
    ``(data or None, status, note)`` with status one of ``"not_installed"``,
    ``"unknown"``, ``"unprepared"`` or ``"loaded"``.
  """
  try:
    import tensorflow_datasets as tfds  # optional extra
  except ImportError:
    return None, "not_installed", "not installed (pip install 'udd_jax[tfds]')"
  try:
    tfds.builder_cls(name)
  except Exception:
    return None, "unknown", "unknown to tensorflow-datasets"
  try:
    splits = [tfds.data_source(name, split=s, download=False) for s in ("train", "test")]
  except Exception as e:
    return None, "unprepared", f"{name!r} is not prepared locally and is never downloaded ({type(e).__name__})"
  result = []
  for split, source in zip(("train", "test"), splits):
    records = [source[i] for i in range(len(source))]
    if not records or "image" not in records[0] or "label" not in records[0]:
      raise ValueError(f"tfds dataset {name!r} has no 'image' and 'label' features.")
    x = np.stack([r["image"] for r in records])
    if x.ndim == 4 and x.shape[-1] == 1:
      x = x[..., 0]
    y = np.asarray([r["label"] for r in records])
    result.append(_checked(x, y, f"tfds:{name}", split))
  return (result[0], result[1]), "loaded", "loaded"
