"""Saving and loading a SupervisedResult: bit-exact round trip, atomic write, each corruption's error."""

import json
import pathlib

import numpy as np
import pytest

import udd_jax
from udd_jax.supervised import artifacts
from udd_jax.supervised.result import SupervisedResult


def make_result(step_sizes=True, soft_labels=False):
  rng = np.random.default_rng(0)
  labels = rng.random((6, 3)).astype(np.float32) if soft_labels else np.array([0, 0, 1, 1, 2, 2], np.int32)
  return SupervisedResult(
      images=rng.standard_normal((6, 5, 5, 1)).astype(np.float32),
      labels=labels,
      config={"method": "dd", "ipc": 2, "network": "convnet", "options": {"lr": 0.01}, "seed": 3, "iterations": 2},
      history=[{"iteration": 0, "loss": 2.3, "seconds": 0.1}, {"iteration": 1, "loss": float("nan"), "seconds": 0.2}],
      step_sizes=rng.random(4).astype(np.float32) if step_sizes else None,
  )


@pytest.mark.parametrize("step_sizes, soft_labels", [(True, False), (False, True)])
def test_round_trip_is_bit_exact(tmp_path, step_sizes, soft_labels):
  result = make_result(step_sizes, soft_labels)
  path = artifacts.save_result(result, tmp_path / "sub" / "set.npz")
  assert path == tmp_path / "sub" / "set.npz" and not path.with_name("set.npz.tmp").exists()
  loaded = artifacts.load_result(path)
  for name in ("images", "labels"):
    got, want = getattr(loaded, name), getattr(result, name)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == want.tobytes()
  if step_sizes:
    assert loaded.step_sizes.dtype == np.float32 and loaded.step_sizes.tobytes() == result.step_sizes.tobytes()
  else:
    assert loaded.step_sizes is None
  assert loaded.config == result.config
  assert loaded.history[0] == result.history[0] and np.isnan(loaded.history[1]["loss"])


def test_file_is_plain_npz_with_version_fields(tmp_path):
  path = artifacts.save_result(make_result(), tmp_path / "set.npz")
  with np.load(path, allow_pickle=False) as f:
    assert int(f["format_version"]) == artifacts.FORMAT_VERSION
    assert str(f["library_version"]) == udd_jax.__version__
    assert json.loads(str(f["config"]))["method"] == "dd"
    assert set(f.files) == {"format_version", "library_version", "images", "labels", "config", "history", "step_sizes"}


def test_numpy_scalars_in_config_and_history_are_saved_as_numbers(tmp_path):
  result = make_result()
  result = SupervisedResult(result.images, result.labels, {"lr": np.float32(0.5), "ipc": np.int64(2), "shape": np.arange(2)},
                            [{"loss": np.float64(1.5)}])
  loaded = artifacts.load_result(artifacts.save_result(result, tmp_path / "set.npz"))
  assert loaded.config == {"lr": 0.5, "ipc": 2, "shape": [0, 1]} and loaded.history == [{"loss": 1.5}]


def test_a_failed_write_leaves_the_previous_file(tmp_path, monkeypatch):
  path = artifacts.save_result(make_result(), tmp_path / "set.npz")
  before = path.read_bytes()

  def crash(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(np, "savez", crash)
  with pytest.raises(OSError, match="disk full"):
    artifacts.save_result(make_result(step_sizes=False), path)
  assert path.read_bytes() == before and not (tmp_path / "set.npz.tmp").exists()


def test_save_errors(tmp_path):
  with pytest.raises(TypeError, match="result must be a SupervisedResult; got dict"):
    artifacts.save_result({"images": np.zeros(1)}, tmp_path / "x.npz")
  bad = SupervisedResult(np.zeros((1, 2, 2, 1)), np.zeros(1, np.int32), {"augment": lambda x: x})
  with pytest.raises(TypeError, match="result.config is not JSON-serialisable"):
    artifacts.save_result(bad, tmp_path / "x.npz")
  assert not (tmp_path / "x.npz").exists()


@pytest.fixture
def saved(tmp_path):
  path = artifacts.save_result(make_result(), tmp_path / "good.npz")
  with np.load(path) as f:
    return path, {k: f[k] for k in f.files}


def _write(tmp_path, name, arrays):
  path = tmp_path / name
  np.savez(path, **arrays)
  return path


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="no supervised distilled set at .*missing.npz"):
    artifacts.load_result(tmp_path / "missing.npz")


def test_truncated_and_garbage_files(saved, tmp_path):
  path, _ = saved
  cut = tmp_path / "cut.npz"
  cut.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
  with pytest.raises(ValueError, match=r"cut.npz is not a readable supervised distilled set \(truncated or corrupted\?\)"):
    artifacts.load_result(cut)
  garbage = tmp_path / "garbage.npz"
  garbage.write_bytes(b"not a zip file at all")
  with pytest.raises(ValueError, match="garbage.npz is not a readable"):
    artifacts.load_result(garbage)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.update(format_version=np.asarray(2)), "bad.npz has format version 2; this udd_jax reads version 1"),
        (lambda a: a.update(format_version=np.asarray("one")), "bad.npz has an unreadable format_version"),
        (lambda a: a.pop("format_version"), "bad.npz is not a udd_jax supervised distilled set: it has no format_version"),
        (lambda a: a.pop("images"), r"bad.npz lacks the field\(s\) \['images'\]"),
        (lambda a: [a.pop("labels"), a.pop("history")], r"bad.npz lacks the field\(s\) \['labels', 'history'\]"),
        (lambda a: a.update(config=np.asarray('{"method": ')), "bad.npz has a corrupted config or history field"),
        (lambda a: a.update(history=np.asarray('{"loss": 1}')), "bad.npz has a config that is not a dict or a history that is not a list"),
        (lambda a: a.update(labels=a["labels"][:5]), r"bad.npz has images of shape \(6, 5, 5, 1\) and labels of shape \(5,\)"),
    ],
)
def test_corrupted_fields(saved, tmp_path, change, match):
  _, arrays = saved
  change(arrays)
  with pytest.raises(ValueError, match=match):
    artifacts.load_result(_write(tmp_path, "bad.npz", arrays))


def test_pickled_arrays_are_refused(saved, tmp_path):
  _, arrays = saved
  arrays["images"] = np.array([{"evil": 1}], dtype=object)
  with pytest.raises(ValueError, match="bad.npz is not a readable.*allow_pickle"):
    artifacts.load_result(_write(tmp_path, "bad.npz", arrays))


def test_path_accepts_strings(tmp_path):
  path = artifacts.save_result(make_result(), str(tmp_path / "s.npz"))
  assert isinstance(path, pathlib.Path) and artifacts.load_result(str(path)).config["ipc"] == 2
