"""The supervised results table: every method and coreset on a grid of datasets and ipc, one protocol.

Each cell is one :func:`udd_jax.supervised.experiment.run` in
``<root>/<dataset>_ipc<ipc>_<method>``: a wall-time budget of distillation, then the
DC-BENCH evaluation. :func:`run_grid` runs the cells a process owns (``shard`` ``"i/k"``
or ``"claim"``), skipping finished ones, so a stopped grid resumes; :func:`probe_cells`
adds the unsupervised protocol; :func:`table` collects every ``evaluation.json`` into a
markdown table; :func:`budget_figure` plots accuracy against budget.
``experiments/supervised_table.py`` is the absl app around them.

Examples:
  >>> [c[:3] for c in cells(["digits"], [1, 10], ["dc"], [60.0])]
  [('digits', 1, 'dc'), ('digits', 10, 'dc')]
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable, Sequence

import numpy as np

from udd_jax import _validation
from udd_jax.data import load_dataset
from udd_jax.driver import load_distilled
from udd_jax.supervised import artifacts, compare, experiment

# What each method distils with when the grid does not say: the papers' choices where the
# ConvNet would not fit the budget on a CPU (DD's LeNet, GTN's MLP learner, KIP's FC kernel).
METHOD_OPTIONS = {
    "dd": {"network": "lenet"},
    "mtt": {"expert_n_experts": 2, "expert_epochs": 2},
}  # udd: the unsupervised set of the same size (--udd_root)

# Published test accuracies (%) at 1 / 10 images per class (ConvNet, docs/METHOD.md section 7).
PUBLISHED = {
    ("mnist", "dc"): {1: 91.7, 10: 97.4},
    ("mnist", "dsa"): {1: 88.7, 10: 97.8},
    ("mnist", "kip"): {1: 97.3, 10: 99.1},
    ("mnist", "dd"): {10: 79.5},
}




@dataclasses.dataclass(frozen=True)
class Grid:
  """Where the grid's cells run and how they are evaluated (the table app's flags).

  Attributes:
    root: one workdir per cell below this directory.
    data_dir: directory with ``<dataset>.npz`` (None: ``$UDD_DATA_DIR``).
    width: ConvNet channels in distillation and evaluation.
    eval_runs, eval_epochs, eval_dsa, cross_arch: the evaluation (:func:`experiment.run`).
    experts_root: MTT's experts go to ``<experts_root>/experts_<dataset>`` (None: ``root``).
    udd_root: the ``udd`` cells evaluate ``<udd_root>/udd_<dataset>_<10 * ipc>/distilled.npz``.
  """

  root: pathlib.Path
  data_dir: str | None = None
  width: int = 32
  eval_runs: int = 2
  eval_epochs: int = 300
  eval_dsa: bool = True
  cross_arch: tuple[str, ...] = ("mlp", "lenet")
  experts_root: str | None = None
  udd_root: str = "runs"


Cell = tuple[str, int, str, float]


def cells(datasets: Sequence[str], ipcs: Sequence[int], methods: Sequence[str], budgets: Sequence[float]) -> list[Cell]:
  """The grid's cells ``(dataset, ipc, method, max_seconds)``; ``budgets`` holds one value, or one per ipc."""
  if len(budgets) not in (1, len(ipcs)):
    raise ValueError(f"--max_seconds has {len(budgets)} values for {len(ipcs)} ipcs; give one, or one per ipc.")
  budgets = list(budgets) * len(ipcs) if len(budgets) == 1 else list(budgets)
  return [(d, int(ipc), m, float(b)) for d in datasets for ipc, b in zip(ipcs, budgets) for m in methods]


def cell_workdir(root: pathlib.Path, cell: Cell) -> pathlib.Path:
  dataset, ipc, method, _ = cell
  return pathlib.Path(root) / f"{dataset}_ipc{ipc}_{method}"


def run_grid(grid: Grid, grid_cells: Sequence[Cell], shard: str = "0/1",
             run_cell: Callable[[Grid, Cell, pathlib.Path], None] | None = None) -> list[str]:
  """Runs this shard's missing cells; returns the failed ones (a failure does not stop the others).

  Args:
    grid: the settings.
    grid_cells: every cell of the grid (:func:`cells`).
    shard: ``"i/k"``: the cells whose index is ``i`` modulo ``k``; ``"claim"``: any cell no live
      process has claimed (``<workdir>/.claim`` holds the pid), so several processes share a grid.
    run_cell: runs one cell (default :func:`run_cell`).
  """
  claiming = shard == "claim"
  index, count = (0, 1) if claiming else parse_shard(shard)
  run_cell = run_cell or globals()["run_cell"]
  failed = []
  for i, cell in enumerate(grid_cells):
    workdir = cell_workdir(grid.root, cell)
    if i % count != index or (workdir / "evaluation.json").is_file() or (claiming and not claim(workdir)):
      continue
    print(f"=== {workdir} ===", flush=True)
    try:
      run_cell(grid, cell, workdir)
    except Exception as e:  # one failed cell must not stop the grid: it is reported and left empty
      failed.append(f"{workdir}: {type(e).__name__}: {e}")
      print(f"FAILED {failed[-1]}", flush=True)
  return failed


def parse_shard(spec: str) -> tuple[int, int]:
  """``"i/k"`` as ``(i, k)``."""
  parts = spec.split("/")
  if len(parts) != 2 or not all(p.isdigit() for p in parts) or not int(parts[0]) < int(parts[1]):
    raise ValueError(f"--shard must be 'i/k' with 0 <= i < k (e.g. 0/2) or 'claim'; got {spec!r}.")
  return int(parts[0]), int(parts[1])


def claim(workdir: pathlib.Path) -> bool:
  """Claims a cell for this process: False when a live process holds it."""
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / ".claim"
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
  except FileExistsError:
    try:
      os.kill(int(path.read_text() or 0), 0)
      return False  # its process is alive
    except (ProcessLookupError, ValueError):
      path.unlink(missing_ok=True)  # a stopped run's claim
      return claim(workdir)
  os.write(fd, str(os.getpid()).encode())
  os.close(fd)
  return True


def run_cell(grid: Grid, cell: Cell, workdir: pathlib.Path) -> None:
  """One cell: :func:`experiment.run` with the grid's evaluation; distillers are budgeted by wall time."""
  dataset, ipc, method, budget = cell
  distiller = method in experiment.DISTILLERS  # coresets and udd sets are not distilled here
  experiment.run(method=method, dataset=dataset, data_dir=grid.data_dir, ipc=ipc, network="convnet", width=grid.width,
                 max_seconds=budget if distiller else None, iterations=100_000 if distiller else None, seed=0,
                 workdir=str(workdir), eval_runs=grid.eval_runs, eval_epochs=grid.eval_epochs, eval_dsa=grid.eval_dsa,
                 cross_arch=tuple(grid.cross_arch), options=cell_options(grid, dataset, ipc, method))


def cell_options(grid: Grid, dataset: str, ipc: int, method: str) -> dict:
  """The method options of a cell: :data:`METHOD_OPTIONS`, MTT's shared experts, the udd set's path."""
  if method == "udd":
    return {"source": str(pathlib.Path(grid.udd_root) / f"udd_{dataset}_{10 * ipc}" / "distilled.npz")}
  options = dict(METHOD_OPTIONS.get(method, {}))
  if method == "mtt":  # one set of experts per dataset, shared by its ipc cells
    options["expert_dir"] = str(pathlib.Path(grid.experts_root or grid.root) / f"experts_{dataset}")
  return options


@_validation.renamed(seeds="n_seeds")
def probe_cells(root: pathlib.Path, *, data_dir: str | None, probe_ipcs: Sequence[int], n_seeds: int) -> None:
  """Adds ``feature_probe`` (the unsupervised protocol) to every evaluated cell lacking it.

  The set goes back to raw pixels through its standardisation; KIP's sets live in its ZCA
  space and are left out. A udd set is probed from its source, with the default recipe
  and with its own learned one (``feature_probe_own_recipe``).
  """
  splits = {}
  for path in sorted(pathlib.Path(root).glob("*/evaluation.json")):
    evaluation = json.loads(path.read_text())
    if "feature_probe" in evaluation or evaluation["method"] == "kip" or int(evaluation["ipc"]) not in probe_ipcs:
      continue
    dataset = evaluation["dataset"]
    if dataset not in splits:
      splits[dataset] = load_dataset(dataset, data_dir=data_dir)
    train, test = splits[dataset]
    result = artifacts.load_result(path.parent / "result.npz")
    if evaluation["method"] == "udd":
      source = load_distilled(result.config["source"])
      raw = np.asarray(source.images)
      evaluation["feature_probe_own_recipe"] = compare.feature_probe(raw, train, test, n_seeds=n_seeds, recipe=source.recipe)
    else:
      prep = result.config["preprocessing"]
      raw = np.asarray(result.images)[..., 0] * prep["std"] + prep["mean"]
    evaluation["feature_probe"] = compare.feature_probe(raw, train, test, n_seeds=n_seeds)
    path.write_text(json.dumps(evaluation, indent=1))
    print(f"{path.parent.name}: unsupervised protocol {100 * evaluation['feature_probe']['mean']:.2f}%", flush=True)


def _mean_std(row) -> str:
  return f"{100 * row['mean']:.1f} ± {100 * row['std']:.1f}"


def _cell(rows, network: str, dsa: bool) -> str:
  row = next((r for r in rows if r["network"] == network and r["dsa"] == dsa), None)
  return "" if row is None else _mean_std(row)


def table(root: pathlib.Path) -> str:
  """The markdown table of every ``evaluation.json`` under ``root``, published figures beside."""
  evaluations = [json.loads(p.read_text()) for p in sorted(pathlib.Path(root).glob("*/evaluation.json"))]
  order = {m: i for i, m in enumerate(experiment.METHODS)}
  evaluations.sort(key=lambda e: (e["dataset"], e["ipc"], order.get(e["method"], len(order)), e["method"]))
  lines = ["| dataset | ipc | method | iterations | distil s | ConvNet | ConvNet + DSA | MLP | LeNet | method's own | "
           "AE probe | published |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for e in evaluations:
    own = ""
    if "krr_accuracy" in e:
      own = f"KRR {100 * e['krr_accuracy']:.1f}"
    elif "dd_recipe_accuracy" in e:
      accs = e["dd_recipe_accuracy"]
      own = f"learned steps {100 * sum(accs) / len(accs):.1f}"
    elif "feature_probe_own_recipe" in e:
      own = f"AE probe, own recipe {_mean_std(e['feature_probe_own_recipe'])}"
    probe = _mean_std(e["feature_probe"]) if "feature_probe" in e else ""
    published = PUBLISHED.get((e["dataset"], e["method"]), {}).get(e["ipc"], "")
    seconds = e.get("distill_seconds")
    lines.append(
        f"| {e['dataset']} | {e['ipc']} | {e['method']} | {e.get('iterations') or 0} | "
        f"{'' if seconds is None else f'{seconds:.0f}'} | {_cell(e['rows'], 'convnet', False)} | "
        f"{_cell(e['rows'], 'convnet', True)} | {_cell(e['rows'], 'mlp', False)} | {_cell(e['rows'], 'lenet', False)} | "
        f"{own} | {probe} | {published} |")
  return "\n".join(lines) + "\n"


def budget_figure(roots: list[pathlib.Path], path: pathlib.Path) -> str:
  """ConvNet accuracy (no DSA) against distillation seconds, one line per (dataset, ipc, method) run at two
  budgets or more; returns the same points as a markdown table."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  points: dict[tuple, list[tuple[float, float, float, int]]] = {}
  for root in roots:
    for p in root.glob("*/evaluation.json"):
      e = json.loads(p.read_text())
      row = next((r for r in e["rows"] if r["network"] == "convnet" and not r["dsa"]), None)
      if row is not None and e["method"] in experiment.DISTILLERS:
        points.setdefault((e["dataset"], e["ipc"], e["method"]), []).append(
            (e["distill_seconds"], 100 * row["mean"], 100 * row["std"], e["iterations"]))
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  lines = ["| dataset | ipc | method | distillation s (iterations): ConvNet accuracy (%) |", "|---|---|---|---|"]
  for key in sorted(k for k, v in points.items() if len(v) > 1):  # a curve needs two budgets
    pts = sorted(points[key])
    xs, ys, es, _ = zip(*pts)
    ax.errorbar(xs, ys, yerr=es, marker="o", capsize=2, label=f"{key[2]} ({key[0]}, ipc {key[1]})")
    lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + ", ".join(f"{x:.0f} s ({i}): {y:.1f}" for x, y, _, i in pts) + " |")
  ax.set_xscale("log")
  ax.set_xlabel("distillation wall time (s, 2-core CPU)")
  ax.set_ylabel("test accuracy, ConvNet trained on the set (%)")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return "\n".join(lines) + "\n"
