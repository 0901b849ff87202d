"""Baseline rows kept on disk, so that every set judged in one setting shares them.

The baselines of an evaluation (raw pixels, random W, random subsets, k-means centroids, a
learner on all the data, the supervised ceiling) do not depend on the distilled set, yet they
are most of an evaluation's time (docs/BENCHMARKS.md section (l)). :class:`BaselineCache`
stores each baseline's rows in a JSON file named by a fingerprint of everything those rows
depend on: the probe's data (hashed after preprocessing), the evaluation's PRNG keys, the
learner, K, the size of D, the recipes, the heads' settings, the number of devices, and the
versions of udd_jax, JAX and this file's format. Any change to one of them is another file,
so a cached row is the row the evaluation would compute, bit for bit.

The key holds the library's version, not its code: after editing the library's evaluation
code, clear the directory (or point at a new one).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import pathlib
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from udd_jax import io
from udd_jax.evaluation.report import Row

FORMAT_VERSION = 1  # bump when a baseline's computation or this file's layout changes
CACHE_ENV = "UDD_CACHE_DIR"


def default_cache_dir() -> pathlib.Path:
  """Where the apps keep baseline rows: ``$UDD_CACHE_DIR/baselines``, else ``~/.cache/udd_jax/baselines``."""
  root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "udd_jax")
  return pathlib.Path(root) / "baselines"


def _digest(value: Any) -> str:
  """A short hash of an array (its dtype, shape and bytes) or a JSON-able value."""
  h = hashlib.blake2b(digest_size=16)
  if isinstance(value, (np.ndarray, jax.Array)):
    if jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
      value = jax.random.key_data(value)
    a = np.ascontiguousarray(np.asarray(value))
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.data)
  else:
    h.update(json.dumps(value, sort_keys=True, default=repr).encode())
  return h.hexdigest()


class BaselineCache:
  """The baseline rows of one evaluation setting, read from and written to ``directory``.

  Args:
    directory: where the files live (created on the first write).
    arrays: the arrays the rows depend on (the probe's data, the PRNG keys), hashed once here.
    settings: the other things they depend on, JSON-able.
  """

  def __init__(self, directory: str | os.PathLike, arrays: Mapping[str, Any], settings: Mapping[str, Any]):
    self.directory = pathlib.Path(directory).expanduser()
    if self.directory.exists() and not self.directory.is_dir():
      raise ValueError(f"baseline_cache {str(self.directory)!r} is an existing file, not a directory.")
    self._digests = {name: _digest(a) for name, a in arrays.items()}
    self._settings = dict(settings, udd_jax=io.library_version(), jax=jax.__version__, format=FORMAT_VERSION)
    self.hits: list[str] = []

  def key(self, baseline: str, depends_on: tuple[str, ...]) -> dict[str, Any]:
    """What the rows of ``baseline`` depend on: the named arrays' digests and settings, and the versions."""
    known = self._digests | self._settings
    missing = [n for n in depends_on if n not in known]
    if missing:
      raise KeyError(f"baseline {baseline!r} depends on {missing}, which this cache was not given.")
    return dict(baseline=baseline, **{n: known[n] for n in depends_on},
                **{n: self._settings[n] for n in ("udd_jax", "jax", "format")})

  def path(self, baseline: str, depends_on: tuple[str, ...]) -> pathlib.Path:
    return self.directory / f"{baseline}-{_digest(self.key(baseline, depends_on))}.json"

  def stored(self, baseline: str, depends_on: tuple[str, ...]) -> bool:
    """Whether a file holds the rows of ``baseline`` in this setting (:meth:`get` may still find it unreadable)."""
    return self.path(baseline, depends_on).is_file()

  def get(self, baseline: str, depends_on: tuple[str, ...]) -> list[Row] | None:
    """The stored rows of ``baseline`` in this setting, or None (never stored, or unreadable: warned)."""
    path = self.path(baseline, depends_on)
    if not path.is_file():
      return None
    try:
      record = json.loads(path.read_text())
      if record["key"] != json.loads(json.dumps(self.key(baseline, depends_on))):
        raise ValueError("its key does not match its name")
      rows = [Row(**r) for r in record["rows"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
      warnings.warn(f"ignoring the unreadable baseline cache file {path} ({e}); computing the rows again.", stacklevel=2)
      return None
    self.hits.append(baseline)
    return rows

  def put(self, baseline: str, depends_on: tuple[str, ...], rows: list[Row]) -> pathlib.Path:
    """Stores ``rows`` as the rows of ``baseline`` in this setting (atomically; process 0 only)."""
    record = dict(key=self.key(baseline, depends_on), written=datetime.datetime.now().isoformat(timespec="seconds"),
                  rows=[dataclasses.asdict(r) for r in rows])
    return io.atomic_write_text(self.path(baseline, depends_on), json.dumps(record, indent=1))
