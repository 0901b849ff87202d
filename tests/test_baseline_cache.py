"""evaluate(baseline_cache=...): baseline rows stored once per setting and read back, bit for bit."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import udd_jax
from udd_jax import experiment
from udd_jax.evaluation import cache as cache_lib

SHORT = udd_jax.Recipe("adam", 0.01, 20, 0.01)
ROWS = ("raw_pixels", "random_w", "random_subset", "full_data")


@pytest.fixture(scope="module")
def digits():
  return udd_jax.load_dataset("digits")


def run(digits, images, directory, **kwargs):
  (x, y), (xt, yt) = digits
  settings = dict(n_hidden=8, n_seeds=2, standard_recipe=SHORT, baselines=ROWS, head_steps=50, progress=False)
  return udd_jax.evaluate(images, (x, y), (xt, yt), baseline_cache=directory, **(settings | kwargs))


@pytest.mark.slow
def test_cached_rows_equal_computed_ones_and_are_read_for_another_set(digits, tmp_path, capsys):
  (x, _), _ = digits
  plain = run(digits, x[:10], None)
  cold = run(digits, x[:10], tmp_path)
  assert cold.rows == plain.rows and cold.settings["baseline_cache"]["rows_from_cache"] == []
  assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == sorted(ROWS)
  capsys.readouterr()
  other = run(digits, x[10:20], tmp_path, progress=True)  # another set, same setting: its own D row, the stored baselines
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) == 5 and lines[0].startswith("evaluate: row 1/5 distilled D") and lines[0].endswith("ETA 0m00s")
  assert all("(from the baseline cache)" in line for line in lines[1:]) and "(from" not in lines[0]
  assert other.settings["baseline_cache"]["rows_from_cache"] == list(ROWS)
  assert other.rows[0] != plain.rows[0] and other.rows[1:] == plain.rows[1:]
  assert "Baseline rows read from the cache in" in str(other) and "Baseline rows read" not in str(plain)


@pytest.mark.slow
def test_a_stored_row_is_what_the_next_evaluation_reports(digits, tmp_path):
  (x, _), _ = digits
  run(digits, x[:10], tmp_path, baselines=("raw_pixels",))
  (path,) = tmp_path.iterdir()
  record = json.loads(path.read_text())
  record["rows"][0]["accuracies"] = [0.125]  # a forged value shows the row is read, not recomputed
  path.write_text(json.dumps(record))
  assert run(digits, x[:10], tmp_path, baselines=("raw_pixels",))["raw pixels"].accuracies == [0.125]


@pytest.mark.slow
@pytest.mark.parametrize("change", [dict(seed=7), dict(n_hidden=9), dict(head_l2=1e-4)])
def test_another_setting_is_another_entry(digits, tmp_path, change):
  (x, _), _ = digits
  run(digits, x[:10], tmp_path, baselines=("random_w",))
  again = run(digits, x[:10], tmp_path, baselines=("random_w",), **change)
  assert again.settings["baseline_cache"]["rows_from_cache"] == []
  assert len(list(tmp_path.iterdir())) == 2


def test_other_data_is_another_entry(tmp_path):
  x = np.random.default_rng(0).normal(size=(30, 4))
  settings = dict(head_l2=0.0, head_steps=1, head_method="newton", devices=1)
  keys = dict(keys=jnp.zeros((2, 2), jnp.uint32))
  one = cache_lib.BaselineCache(tmp_path, dict(z_train=x) | keys, settings)
  two = cache_lib.BaselineCache(tmp_path, dict(z_train=x.copy()) | keys, settings)
  x[0, 0] += 1e-12
  three = cache_lib.BaselineCache(tmp_path, dict(z_train=x) | keys, settings)
  depends = ("z_train", "keys")
  assert one.path("random_w", depends) == two.path("random_w", depends) != three.path("random_w", depends)
  assert one.path("random_w", depends) != one.path("kmeans", depends)
  with pytest.raises(KeyError, match="n_hidden"):
    one.path("random_w", depends + ("n_hidden",))


def test_an_unreadable_entry_is_recomputed_with_a_warning(tmp_path):
  cache = cache_lib.BaselineCache(tmp_path, {}, {})
  row = udd_jax.evaluation.Row("raw pixels", [0.5], accuracies_standardized=[0.25])
  path = cache.put("raw_pixels", (), [row])
  assert cache.get("raw_pixels", ()) == [row] and cache.hits == ["raw_pixels"]
  path.write_text("{not json")
  with pytest.warns(UserWarning, match="unreadable baseline cache file"):
    assert cache.get("raw_pixels", ()) is None


def test_bad_cache_arguments_are_named(digits, tmp_path):
  (x, _), _ = digits
  afile = tmp_path / "a_file"
  afile.write_text("")
  with pytest.raises(ValueError, match="is an existing file, not a directory"):
    run(digits, x[:10], afile)
  with pytest.raises(TypeError, match="baseline_cache must be a directory path or None; got int"):
    run(digits, x[:10], 3)


def test_default_directory_follows_the_environment(monkeypatch, tmp_path):
  monkeypatch.setenv(cache_lib.CACHE_ENV, str(tmp_path))
  assert cache_lib.default_cache_dir() == tmp_path / "baselines"
  monkeypatch.delenv(cache_lib.CACHE_ENV)
  assert cache_lib.default_cache_dir() == type(tmp_path)(os.path.expanduser("~")) / ".cache" / "udd_jax" / "baselines"


@pytest.mark.slow
def test_the_app_reads_the_cache_on_a_second_run(tmp_path):
  settings = dict(dataset="digits", n_distill=10, n_hidden=8, steps=4, eval_every=0, eval_seeds=1,
                  baselines=("raw_pixels",), solver="unrolled", options=dict(unroll_steps=3), batch_size=64,
                  log_every=2, checkpoint_every=2, progress=False, baseline_cache=str(tmp_path / "cache"))
  experiment.run(workdir=str(tmp_path / "one"), **settings)
  assert "read from the cache" not in (tmp_path / "one" / "report.md").read_text()
  experiment.run(workdir=str(tmp_path / "two"), **settings)
  report = (tmp_path / "two" / "report.md").read_text()
  assert f"Baseline rows read from the cache in {tmp_path / 'cache'}" in report and report.endswith("\n")
  saved = json.loads((tmp_path / "two" / "evaluation.json").read_text())
  assert saved["settings"]["baseline_cache"]["rows_from_cache"] == ["raw_pixels"]
