"""The supervised results table: every method and coreset on a grid of datasets and ipc, one protocol.

  python experiments/supervised_table.py --data_dir=../shared/data --root=runs/supervised_table \
      --shard=0/2 &   # and --shard=1/2 beside it: two processes share the grid
  python experiments/supervised_table.py --root=runs/supervised_table --table_only \
      --output=docs/supervised_table.md

Each cell is one ``experiments/supervised.py`` run (``udd_jax.supervised.experiment.run``)
in ``<root>/<dataset>_ipc<ipc>_<method>``: a wall-time budget of distillation, then the
DC-BENCH evaluation (ConvNet of ``--width`` channels with and without DSA, MLP and LeNet
beside). A cell whose ``evaluation.json`` exists is skipped, so a stopped grid resumes.
``--table_only`` collects every ``evaluation.json`` under ``--root`` into a markdown table
with the published figures beside.
"""

import json
import os
import pathlib

import numpy as np
from absl import app, flags

from udd_jax.data import load_dataset
from udd_jax.distill import load_distilled
from udd_jax.supervised import artifacts, compare, experiment

FLAGS = flags.FLAGS
flags.DEFINE_list("datasets", ["mnist", "fashion_mnist"], "Datasets of the grid.")
flags.DEFINE_list("ipcs", ["1", "10"], "Images per class of the grid.")
flags.DEFINE_list("methods", list(experiment.METHODS), "Methods and coresets of the grid.")
flags.DEFINE_string("data_dir", None, "Directory with <dataset>.npz; defaults to $UDD_DATA_DIR.")
flags.DEFINE_string("root", "runs/supervised_table", "One workdir per cell below this directory.")
flags.DEFINE_integer("width", 32, "ConvNet channels in distillation and evaluation (the papers use 128).")
flags.DEFINE_list("max_seconds", ["90", "150"], "Distillation wall-time budget per ipc of --ipcs (one value or one each).")
flags.DEFINE_integer("eval_runs", 2, "Networks trained from scratch per evaluation row.")
flags.DEFINE_integer("eval_epochs", 300, "Epochs of each evaluation training.")
flags.DEFINE_list("cross_arch", ["mlp", "lenet"], "Other networks the sets are evaluated on.")
flags.DEFINE_bool("eval_dsa", True, "Also evaluate with DSA augmentation during training.")
flags.DEFINE_string("experts_root", None, "MTT's experts go to <experts_root>/experts_<dataset> (default: --root).")
flags.DEFINE_list("curve_roots", [], "Grid roots run at different budgets: adds accuracy against distillation time "
                  "(a table, and the figure --curve_output).")
flags.DEFINE_string("curve_output", "docs/figures/supervised_budget.png", "The accuracy-against-budget figure.")
flags.DEFINE_string("udd_root", "runs", "The udd cells evaluate <udd_root>/udd_<dataset>_<10 * ipc>/distilled.npz "
                    "(experiments/distill.py workdirs).")
flags.DEFINE_bool("probe", True, "Also put every set through the unsupervised protocol (tied AE, K = 128, on the set; "
                  "logistic head on real features).")
flags.DEFINE_list("probe_ipcs", ["10"], "The ipc values whose cells get the unsupervised-protocol probe.")
flags.DEFINE_integer("probe_seeds", 3, "Autoencoder inits of the unsupervised protocol.")
flags.DEFINE_string("shard", "0/1", "i/k: this process runs the cells whose index is i modulo k; 'claim': any cell "
                    "no live process has claimed (<workdir>/.claim holds the pid), so several processes share a grid.")
flags.DEFINE_bool("table_only", False, "Only collect the evaluations under --root into --output.")
flags.DEFINE_string("output", None, "Markdown file for the table (default: print it).")

# What each method distils with when the grid does not say: the papers' choices where the
# ConvNet would not fit the budget on a CPU (DD's LeNet, GTN's MLP learner, KIP's FC kernel).
METHOD_OPTIONS = {
    "dd": {"network": "lenet"},
    "mtt": {"expert_n_experts": 2, "expert_epochs": 2},
}  # udd: the unsupervised set of the same size (--udd_root)

# Published test accuracies (%) at 1 / 10 images per class (ConvNet, SPEC section 7).
PUBLISHED = {
    ("mnist", "dc"): {1: 91.7, 10: 97.4},
    ("mnist", "dsa"): {1: 88.7, 10: 97.8},
    ("mnist", "kip"): {1: 97.3, 10: 99.1},
    ("mnist", "dd"): {10: 79.5},
}


def cells() -> list[tuple[str, int, str, float]]:
  ipcs = [int(i) for i in FLAGS.ipcs]
  budgets = [float(b) for b in FLAGS.max_seconds]
  if len(budgets) not in (1, len(ipcs)):
    raise ValueError(f"--max_seconds has {len(budgets)} values for {len(ipcs)} ipcs; give one, or one per ipc.")
  budgets = budgets * len(ipcs) if len(budgets) == 1 else budgets
  return [(d, ipc, m, b) for d in FLAGS.datasets for ipc, b in zip(ipcs, budgets) for m in FLAGS.methods]


def run_grid() -> list[str]:
  """Runs this shard's missing cells; returns the failed ones (a failure does not stop the others)."""
  claim = FLAGS.shard == "claim"
  index, count = (0, 1) if claim else _parse_shard(FLAGS.shard)
  failed = []
  for i, (dataset, ipc, method, budget) in enumerate(cells()):
    workdir = pathlib.Path(FLAGS.root) / f"{dataset}_ipc{ipc}_{method}"
    if i % count != index or (workdir / "evaluation.json").is_file() or (claim and not _claim(workdir)):
      continue
    print(f"=== {workdir} ===", flush=True)
    try:
      _run_cell(dataset, ipc, method, budget, workdir)
    except Exception as e:  # one failed cell must not stop the grid: it is reported and left empty
      failed.append(f"{workdir}: {type(e).__name__}: {e}")
      print(f"FAILED {failed[-1]}", flush=True)
  return failed


def _parse_shard(spec: str) -> tuple[int, int]:
  parts = spec.split("/")
  if len(parts) != 2 or not all(p.isdigit() for p in parts) or not int(parts[0]) < int(parts[1]):
    raise ValueError(f"--shard must be 'i/k' with 0 <= i < k (e.g. 0/2) or 'claim'; got {spec!r}.")
  return int(parts[0]), int(parts[1])


def _claim(workdir: pathlib.Path) -> bool:
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
      return _claim(workdir)
  os.write(fd, str(os.getpid()).encode())
  os.close(fd)
  return True


def _run_cell(dataset: str, ipc: int, method: str, budget: float, workdir: pathlib.Path) -> None:
  distiller = method in experiment.DISTILLERS  # budgeted by wall time; coresets and udd sets are not distilled here
  experiment.run(method=method, dataset=dataset, data_dir=FLAGS.data_dir, ipc=ipc, network="convnet", width=FLAGS.width,
                 max_seconds=budget if distiller else None, iterations=100_000 if distiller else None, seed=0,
                 workdir=str(workdir), eval_runs=FLAGS.eval_runs, eval_epochs=FLAGS.eval_epochs,
                 eval_dsa=FLAGS.eval_dsa, cross_arch=tuple(FLAGS.cross_arch), options=_options(dataset, ipc, method))


def _options(dataset: str, ipc: int, method: str) -> dict:
  if method == "udd":
    return {"source": str(pathlib.Path(FLAGS.udd_root) / f"udd_{dataset}_{10 * ipc}" / "distilled.npz")}
  options = dict(METHOD_OPTIONS.get(method, {}))
  if method == "mtt":  # one set of experts per dataset, shared by its ipc cells
    options["expert_dir"] = str(pathlib.Path(FLAGS.experts_root or FLAGS.root) / f"experts_{dataset}")
  return options


def probe_cells(root: pathlib.Path) -> None:
  """Adds ``feature_probe`` (the unsupervised protocol) to every evaluated cell lacking it.

  The set goes back to raw pixels through its standardisation; KIP's sets live in its ZCA
  space and are left out. A udd set is probed from its source, with the default recipe
  and with its own learned one (``feature_probe_own_recipe``).
  """
  splits = {}
  for path in sorted(root.glob("*/evaluation.json")):
    evaluation = json.loads(path.read_text())
    if ("feature_probe" in evaluation or evaluation["method"] == "kip"
        or str(evaluation["ipc"]) not in FLAGS.probe_ipcs):
      continue
    dataset = evaluation["dataset"]
    if dataset not in splits:
      splits[dataset] = load_dataset(dataset, data_dir=FLAGS.data_dir)
    train, test = splits[dataset]
    result = artifacts.load_result(path.parent / "result.npz")
    if evaluation["method"] == "udd":
      source = load_distilled(result.config["source"])
      raw = np.asarray(source.images)
      evaluation["feature_probe_own_recipe"] = compare.feature_probe(raw, train, test, seeds=FLAGS.probe_seeds,
                                                                     recipe=source.recipe)
    else:
      prep = result.config["preprocessing"]
      raw = np.asarray(result.images)[..., 0] * prep["std"] + prep["mean"]
    evaluation["feature_probe"] = compare.feature_probe(raw, train, test, seeds=FLAGS.probe_seeds)
    path.write_text(json.dumps(evaluation, indent=1))
    print(f"{path.parent.name}: unsupervised protocol {100 * evaluation['feature_probe']['mean']:.2f}%", flush=True)


def _mean_std(row) -> str:
  return f"{100 * row['mean']:.1f} ± {100 * row['std']:.1f}"


def _cell(rows, network: str, dsa: bool) -> str:
  row = next((r for r in rows if r["network"] == network and r["dsa"] == dsa), None)
  return "" if row is None else _mean_std(row)


def table(root: pathlib.Path) -> str:
  evaluations = [json.loads(p.read_text()) for p in sorted(root.glob("*/evaluation.json"))]
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


def main(argv):
  del argv
  failed = []
  if not FLAGS.table_only:
    failed = run_grid()
    if FLAGS.probe:
      probe_cells(pathlib.Path(FLAGS.root))
  text = table(pathlib.Path(FLAGS.root))
  if FLAGS.curve_roots:
    text += "\n" + budget_figure([pathlib.Path(r) for r in FLAGS.curve_roots], pathlib.Path(FLAGS.curve_output))
  if FLAGS.output:
    pathlib.Path(FLAGS.output).write_text(text)
  else:
    print(text)
  if failed:
    raise RuntimeError("cells failed:\n" + "\n".join(failed))


if __name__ == "__main__":
  app.run(main)
