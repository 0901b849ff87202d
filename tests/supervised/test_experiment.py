"""The supervised experiment end to end on the embedded digits, and unsupervised sets in its table."""

import itertools
import json

import numpy as np
import pytest

import udd_jax
from udd_jax import evaluation as protocol
from udd_jax.supervised import artifacts, compare, experiment

FAST_EVAL = dict(eval_runs=1, eval_epochs=2)


@pytest.fixture(scope="module")
def digits():
  return udd_jax.load_dataset("digits")


@pytest.fixture(scope="module")
def unsupervised_set(digits, tmp_path_factory):
  (x, y), _ = digits
  result = udd_jax.distill(x, y, n_distill=10, n_hidden=8, steps=3, solver="unrolled", unroll_steps=5, batch_size=64,
                           progress=False)
  return result.save(tmp_path_factory.mktemp("udd") / "distilled.npz")


@pytest.mark.slow
def test_run_distils_evaluates_and_only_reevaluates_a_finished_run(tmp_path, capsys):
  evaluation = experiment.run(method="dc", dataset="digits", data_dir=None, ipc=1, network="convnet", width=4,
                              iterations=2, workdir=str(tmp_path), cross_arch=("mlp",), **FAST_EVAL)
  for name in ("result.npz", "images.png", "evaluation.json", "report.md"):
    assert (tmp_path / name).is_file(), name
  assert [(r["network"], r["dsa"]) for r in evaluation["rows"]] == [
      ("convnet", False), ("convnet", True), ("mlp", False), ("mlp", True)]
  assert evaluation["width"] == 4 and evaluation["iterations"] == 2
  result = artifacts.load_result(tmp_path / "result.npz")
  assert result.config["width"] == 4 and result.images.shape == (10, 8, 8, 1)
  assert json.loads((tmp_path / "evaluation.json").read_text())["rows"] == evaluation["rows"]
  saved = (tmp_path / "result.npz").read_bytes()
  again = experiment.run(method="dc", dataset="digits", data_dir=None, ipc=1, network="convnet", width=4,
                         iterations=2, workdir=str(tmp_path), eval_dsa=False, **FAST_EVAL)
  assert "exists: evaluating it" in capsys.readouterr().out
  assert (tmp_path / "result.npz").read_bytes() == saved
  same = lambda row: {k: v for k, v in row.items() if k != "seconds"}
  assert same(again["rows"][0]) == same(evaluation["rows"][0])  # same set, same evaluation seed


def test_nearest_labels_match_brute_force():
  rng = np.random.default_rng(0)
  train, labels, queries = rng.standard_normal((300, 4, 4, 1)), rng.integers(0, 5, 300), rng.standard_normal((7, 4, 4, 1))
  distances = ((queries.reshape(7, 1, -1) - train.reshape(1, 300, -1)) ** 2).sum(-1)
  np.testing.assert_array_equal(compare.nearest_labels(queries, train, labels), labels[distances.argmin(1)])
  with pytest.raises(ValueError, match="images have shape"):
    compare.nearest_labels(queries[:, :3], train, labels)


def test_balanced_labels_solve_the_assignment_by_brute_force():
  rng = np.random.default_rng(1)
  train, labels = rng.standard_normal((60, 3, 3, 1)), np.arange(60) % 3
  queries = rng.standard_normal((6, 3, 3, 1))
  d = ((queries.reshape(6, 1, -1) - train.reshape(1, 60, -1)) ** 2).sum(-1)
  per_class = np.stack([d[:, labels == c].min(1) for c in range(3)], axis=1)  # (6, 3)
  # Every way of giving each of the 3 classes 2 of the 6 images, by brute force.
  best = min((assignment for assignment in itertools.product(range(3), repeat=6)
              if np.all(np.bincount(assignment, minlength=3) == 2)),
             key=lambda a: per_class[np.arange(6), a].sum())
  got = compare.balanced_labels(queries, train, labels, ipc=2)
  np.testing.assert_array_equal(got, best)
  assert np.bincount(got, minlength=3).tolist() == [2, 2, 2]
  # Already balanced nearest labels are kept.
  near = train[[0, 1, 2]] + 1e-3
  np.testing.assert_array_equal(compare.balanced_labels(near, train, labels, ipc=1), labels[:3])
  with pytest.raises(ValueError, match="ipc=1 with 3 classes needs 3"):
    compare.balanced_labels(queries, train, labels, ipc=1)
  with pytest.raises(ValueError, match="lacks class"):
    compare.balanced_labels(queries[:3], train, np.where(labels == 1, 0, labels), ipc=1)


@pytest.mark.slow
def test_udd_method_evaluates_an_unsupervised_set_with_nearest_labels(digits, unsupervised_set, tmp_path):
  evaluation = experiment.run(method="udd", dataset="digits", data_dir=None, ipc=1, network="mlp", workdir=str(tmp_path),
                              eval_dsa=False, options={"source": str(unsupervised_set)}, **FAST_EVAL)
  result = artifacts.load_result(tmp_path / "result.npz")
  source = udd_jax.load_distilled(unsupervised_set)
  (x, y), _ = digits
  mean, std = float(x.mean()), float(x.std())
  np.testing.assert_allclose(result.images[..., 0], (source.images - mean) / std, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(result.labels,
                                compare.balanced_labels(result.images, ((x - mean) / std)[..., None], y, ipc=1))
  assert result.config["method"] == "udd" and result.config["source"] == str(unsupervised_set)
  assert result.config["label_counts"] == [1] * 10 and len(evaluation["rows"]) == 1
  experiment.run(method="udd", dataset="digits", data_dir=None, ipc=1, network="mlp", workdir=str(tmp_path / "nearest"),
                 eval_runs=0, options={"source": str(unsupervised_set), "labels": "nearest"})
  nearest = artifacts.load_result(tmp_path / "nearest" / "result.npz")
  np.testing.assert_array_equal(nearest.labels, compare.nearest_labels(result.images, ((x - mean) / std)[..., None], y))


def test_udd_method_errors(unsupervised_set, tmp_path):
  with pytest.raises(ValueError, match="options\\['source'\\]"):
    experiment.run(method="udd", dataset="digits", data_dir=None, ipc=1, workdir=str(tmp_path), eval_runs=0)
  with pytest.raises(ValueError, match="unknown labels 'closest'"):
    experiment.run(method="udd", dataset="digits", data_dir=None, ipc=1, workdir=str(tmp_path), eval_runs=0,
                   options={"source": str(unsupervised_set), "labels": "closest"})
  with pytest.raises(ValueError, match="takes the options 'source' and 'labels'; got also \\['lr'\\]"):
    experiment.run(method="udd", dataset="digits", data_dir=None, ipc=1, workdir=str(tmp_path), eval_runs=0,
                   options={"source": str(unsupervised_set), "lr": 1})
  with pytest.raises(ValueError, match="holds 10 images; ipc=2 with 10 classes needs 20"):
    experiment.run(method="udd", dataset="digits", data_dir=None, ipc=2, workdir=str(tmp_path), eval_runs=0,
                   options={"source": str(unsupervised_set)})


@pytest.mark.slow
def test_feature_probe_is_the_protocol_on_the_first_training_images(digits):
  (x, y), test = digits
  images = x[:20]
  probe = compare.feature_probe(images, (x, y), test, n_hidden=8, n_seeds=2, n_train=500)
  report = protocol.evaluate(images, (x[:500], y[:500]), test, n_hidden=8, n_seeds=2, baselines=())
  assert [(r.name, r.recipe) for r in report.rows] == [("distilled D", "standard")]  # the standard recipe, one row
  assert probe["accuracies"] == report.rows[0].accuracies and probe["n_train"] == 500
  assert probe["recipe"] == udd_jax.STANDARD_RECIPE.to_config() == report.settings["recipes"]["standard"]
  assert probe["mean"] > 0.5  # ten classes: features of an AE fitted on 20 digits are far above chance
  # Another recipe replaces the standard one (a config dict is accepted) and is reported back.
  quick = udd_jax.Recipe("adam", 0.01, 50, 0.01)
  other = compare.feature_probe(images, (x, y), test, n_hidden=8, n_seeds=1, n_train=500, recipe=quick.to_config())
  assert other["recipe"] == quick.to_config() and len(other["accuracies"]) == 1
