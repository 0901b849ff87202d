"""The supervised results grid: cells, shards and claims, failures, and the markdown table (no training)."""

import json
import os
import subprocess

import pytest

from udd_jax.supervised import table


def test_cells_expand_the_grid_with_one_budget_or_one_per_ipc():
  assert table.cells(["mnist"], [1, 10], ["dc", "kip"], [90.0]) == [
      ("mnist", 1, "dc", 90.0), ("mnist", 1, "kip", 90.0), ("mnist", 10, "dc", 90.0), ("mnist", 10, "kip", 90.0)]
  assert [c[3] for c in table.cells(["mnist", "usps"], [1, 10], ["dm"], [30, 60])] == [30.0, 60.0, 30.0, 60.0]
  with pytest.raises(ValueError, match="3 values for 2 ipcs"):
    table.cells(["mnist"], [1, 10], ["dc"], [1, 2, 3])


def test_run_grid_runs_its_shard_skips_finished_cells_and_reports_failures(tmp_path):
  grid = table.Grid(root=tmp_path)
  grid_cells = table.cells(["mnist"], [1, 10], ["dc", "dm"], [60])
  (tmp_path / "mnist_ipc1_dm").mkdir()
  (tmp_path / "mnist_ipc1_dm" / "evaluation.json").write_text("{}")  # finished
  ran = []

  def run_cell(g, cell, workdir):
    ran.append((cell[:3], workdir.name))
    if cell[2] == "dc" and cell[1] == 10:
      raise RuntimeError("boom")

  failed = table.run_grid(grid, grid_cells, "0/1", run_cell)
  assert ran == [(("mnist", 1, "dc"), "mnist_ipc1_dc"), (("mnist", 10, "dc"), "mnist_ipc10_dc"),
                 (("mnist", 10, "dm"), "mnist_ipc10_dm")]
  assert len(failed) == 1 and "mnist_ipc10_dc: RuntimeError: boom" in failed[0]
  ran.clear()
  table.run_grid(grid, grid_cells, "1/2", run_cell)
  assert [c for c, _ in ran] == [("mnist", 10, "dm")]  # index 3 only: index 1 is finished
  with pytest.raises(ValueError, match="--shard must be 'i/k'"):
    table.run_grid(grid, grid_cells, "2/2", run_cell)


def test_claim_refuses_a_cell_a_live_process_holds_and_takes_over_a_stopped_one(tmp_path):
  assert table.claim(tmp_path / "cell")
  assert (tmp_path / "cell" / ".claim").read_text() == str(os.getpid())
  assert not table.claim(tmp_path / "cell")  # this (live) process holds it
  stopped = subprocess.Popen(["true"])
  stopped.wait()
  (tmp_path / "cell" / ".claim").write_text(str(stopped.pid))  # a stopped process's claim
  assert table.claim(tmp_path / "cell")
  assert (tmp_path / "cell" / ".claim").read_text() == str(os.getpid())


def test_cell_options_and_table(tmp_path):
  grid = table.Grid(root=tmp_path, udd_root="u", experts_root="e")
  assert table.cell_options(grid, "mnist", 1, "udd") == {"source": os.path.join("u", "udd_mnist_10", "distilled.npz")}
  assert table.cell_options(grid, "mnist", 1, "mtt")["expert_dir"] == os.path.join("e", "experts_mnist")
  assert table.cell_options(grid, "mnist", 1, "dd") == {"network": "lenet"}
  row = lambda net, dsa, mean: dict(network=net, dsa=dsa, mean=mean, std=0.01, accuracies=[mean])
  for method, extra in (("dc", {}), ("kip", {"krr_accuracy": 0.95})):
    (tmp_path / method).mkdir()
    evaluation = dict(method=method, dataset="mnist", ipc=1, iterations=5, distill_seconds=12.0,
                      rows=[row("convnet", False, 0.9), row("mlp", False, 0.8)], **extra)
    (tmp_path / method / "evaluation.json").write_text(json.dumps(evaluation))
  lines = table.table(tmp_path).splitlines()
  assert len(lines) == 4 and lines[0].startswith("| dataset | ipc | method |")
  assert lines[2] == "| mnist | 1 | dc | 5 | 12 | 90.0 ± 1.0 |  | 80.0 ± 1.0 |  |  |  | 91.7 |"
  assert "KRR 95.0" in lines[3] and "| 97.3 |" in lines[3]
