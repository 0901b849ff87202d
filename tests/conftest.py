"""Strict numerics for every test: float64, so gradient comparisons are meaningful."""

import os
import pathlib

import jax
import pytest

jax.config.update("jax_enable_x64", True)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def real_data_dir() -> pathlib.Path:
  """The directory with the real ``.npz`` datasets.

  ``$UDD_DATA_DIR`` if set, else ``../shared/data`` beside the repository. In CI
  (``CI=true``) a missing directory is a failure, never a skip.
  """
  path = pathlib.Path(os.environ.get("UDD_DATA_DIR") or SHARED_DATA)
  if not (path / "mnist.npz").is_file():
    message = f"real data not found: {path / 'mnist.npz'} (set UDD_DATA_DIR)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
      pytest.fail(message)
    pytest.skip(message)
  return path


@pytest.fixture(scope="session", autouse=True)
def baseline_cache_in_tmp(tmp_path_factory):
  """The apps' default baseline cache (``$UDD_CACHE_DIR/baselines``) in a temporary directory, never the user's."""
  old = os.environ.get("UDD_CACHE_DIR")
  os.environ["UDD_CACHE_DIR"] = str(tmp_path_factory.mktemp("udd_cache"))
  yield
  if old is None:
    os.environ.pop("UDD_CACHE_DIR")
  else:
    os.environ["UDD_CACHE_DIR"] = old
