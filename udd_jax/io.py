"""Files that survive a kill: atomic writes, versioned ``.npz`` artifacts, pytree checkpoints.

Every writer in the library goes through :func:`atomic_write`: a file is always either
the old one or the complete new one. In a multi-process run (``jax.distributed``) only
process 0 writes; arrays split across processes are gathered first (:func:`host_tree`). Checkpoints store a pytree's leaves under their
pytree paths (``images``, ``opt_state/0/mu``, ...), so a restore names the leaf that does
not fit instead of an index.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from udd_jax._version import __version__

__all__ = [
    "atomic_write",
    "atomic_write_text",
    "atomic_savez",
    "library_version",
    "read_npz",
    "save_pytree",
    "restore_pytree",
    "pytree_arrays",
    "pytree_from_arrays",
    "host_tree",
]


def library_version() -> str:
  """The installed udd_jax version, recorded in every artifact."""
  return __version__


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> pathlib.Path:
  """Writes ``path`` so that it is always either the old or the complete new file.

  ``write(f)`` fills a temporary file beside ``path`` (``<name>.tmp``, same directory, so
  the rename stays on one file system); it is flushed and fsynced, then renamed over
  ``path``. A kill at any moment leaves at worst a stray ``.tmp`` file, which readers
  ignore and the next write replaces.

  In a multi-process run, only process 0 writes; the others return ``path`` at once.
  """
  path = pathlib.Path(path)
  if jax.process_index() != 0:
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  try:
    with open(tmp, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  with contextlib.suppress(OSError):  # make the rename itself durable (not possible on every OS)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
  return path


def atomic_write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
  """:func:`atomic_write` of a text file (UTF-8)."""
  return atomic_write(path, lambda f: f.write(text.encode()))


def atomic_savez(path: str | os.PathLike, arrays: dict[str, Any]) -> pathlib.Path:
  """:func:`atomic_write` of an uncompressed ``.npz`` (no pickled objects)."""
  return atomic_write(path, lambda f: np.savez(f, **arrays))


def read_npz(path: str | os.PathLike, what: str) -> dict[str, np.ndarray]:
  """Every array of an ``.npz`` file, with errors that name ``what`` was expected.

  Raises:
    FileNotFoundError: no such file.
    ValueError: not an ``.npz`` archive, or truncated / corrupted.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no {what} at {str(path)!r}.")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != b"PK\x03\x04":  # every .npz is a zip archive
    raise ValueError(f"{path} is not a {what}: not an .npz (zip) archive.")
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except Exception as e:  # a zip whose members are cut or are not arrays
    reason = "it holds pickled objects" if "allow_pickle" in str(e) else f"truncated or corrupted ({type(e).__name__})"
    raise ValueError(f"{path} is not a readable {what}: {reason}.") from None


def _path_name(path: tuple[Any, ...]) -> str:
  return "/".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)


def host_tree(tree: Any) -> Any:
  """``tree`` with its arrays on the host: numpy arrays, and typed PRNG keys as keys on this process's device.

  An array split across the processes of a multi-process run is gathered from all of
  them, so every process must call this at the same point (a collective).
  """

  def one(leaf):
    if not isinstance(leaf, jax.Array):
      return leaf
    is_key = jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)
    data = jax.random.key_data(leaf) if is_key else leaf
    if not (data.is_fully_addressable or data.is_fully_replicated):
      data = multihost_utils.process_allgather(data, tiled=True)
    data = np.asarray(data)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf)) if is_key else data

  return jax.tree.map(one, tree)


def pytree_arrays(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
  """The leaves of ``tree`` as host arrays keyed by ``prefix`` + their pytree path (:func:`host_tree`).

  Typed PRNG keys are stored as their raw key data.
  """
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(host_tree(tree))[0]:
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    out[prefix + _path_name(path)] = np.asarray(leaf)
  return out


def pytree_from_arrays(template: Any, arrays: dict[str, np.ndarray], prefix: str = "") -> Any:
  """Inverse of :func:`pytree_arrays`: the arrays put back into ``template``'s structure.

  Raises:
    ValueError: a leaf of the template is missing, has another shape, or ``arrays`` holds
      leaves the template does not have; the message names the leaf.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
  names = [prefix + _path_name(path) for path, _ in leaves]
  extra = sorted(k for k in arrays if k.startswith(prefix) and k not in set(names))
  if extra:
    raise ValueError(f"the checkpoint holds {extra[:3]}, which this run's state does not have: a different configuration.")
  restored = []
  for name, (_, leaf) in zip(names, leaves):
    if name not in arrays:
      raise ValueError(f"the checkpoint lacks {name!r}, which this run's state has: a different configuration.")
    value = arrays[name]
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      restored.append(jax.random.wrap_key_data(jnp.asarray(value)))
      continue
    if value.shape != leaf.shape:
      raise ValueError(f"checkpoint array {name!r} has shape {value.shape}, this run's state {leaf.shape}: a different configuration.")
    restored.append(jnp.asarray(value, leaf.dtype))
  return jax.tree_util.tree_unflatten(treedef, restored)


def save_pytree(path: str | os.PathLike, tree: Any, **metadata: Any) -> pathlib.Path:
  """Checkpoints ``tree`` atomically; ``metadata`` values are stored as JSON under ``meta/<name>``."""
  arrays = pytree_arrays(tree, "state/")
  arrays.update({f"meta/{k}": np.asarray(json.dumps(v)) for k, v in metadata.items()})
  arrays["meta/library_version"] = np.asarray(json.dumps(library_version()))
  return atomic_savez(path, arrays)


def restore_pytree(path: str | os.PathLike, template: Any) -> tuple[Any, dict[str, Any]]:
  """Reads a :func:`save_pytree` checkpoint into ``template``'s structure; returns (tree, metadata).

  Raises:
    FileNotFoundError, ValueError: as :func:`read_npz` and :func:`pytree_from_arrays`, with
      "delete it to start over" advice for an unreadable file.
  """
  try:
    arrays = read_npz(path, "checkpoint")
    meta = {k[len("meta/"):]: json.loads(str(v)) for k, v in arrays.items() if k.startswith("meta/")}
  except (ValueError, json.JSONDecodeError) as e:
    raise ValueError(f"{e} Delete it to start over.") from None
  return pytree_from_arrays(template, arrays, "state/"), meta
