"""The supervised results table: every method and coreset on a grid of datasets and ipc, one protocol.

  python experiments/supervised_table.py --data_dir=../shared/data --root=runs/supervised_table \
      --shard=0/2 &   # and --shard=1/2 beside it: two processes share the grid
  python experiments/supervised_table.py --root=runs/supervised_table --table_only \
      --output=docs/supervised_table.md

Each cell is one ``experiments/supervised.py`` run (``udd_jax.supervised.experiment.run``)
in ``<root>/<dataset>_ipc<ipc>_<method>`` (the grid logic is
``udd_jax.supervised.table``): a wall-time budget of distillation, then the
DC-BENCH evaluation (ConvNet of ``--width`` channels with and without DSA, MLP and LeNet
beside). A cell whose ``evaluation.json`` exists is skipped, so a stopped grid resumes.
``--table_only`` collects every ``evaluation.json`` under ``--root`` into a markdown table
with the published figures beside.
"""

import pathlib

from absl import app, flags

from udd_jax import app_flags
from udd_jax.data import BUILTIN_DATASETS
from udd_jax.supervised import experiment, networks, table

FLAGS = flags.FLAGS
app_flags.define_enum_list("datasets", ["mnist", "fashion_mnist"], BUILTIN_DATASETS, "Datasets of the grid.")
flags.DEFINE_list("ipcs", ["1", "10"], "Images per class of the grid.")
app_flags.define_enum_list("methods", list(experiment.METHODS), experiment.METHODS, "Methods and coresets of the grid.")
flags.DEFINE_string("data_dir", None, "Directory with <dataset>.npz; defaults to $UDD_DATA_DIR.")
flags.DEFINE_string("root", "runs/supervised_table", "One workdir per cell below this directory.")
flags.DEFINE_integer("width", 32, "ConvNet channels in distillation and evaluation (the papers use 128).")
flags.DEFINE_list("max_seconds", ["90", "150"], "Distillation wall-time budget per ipc of --ipcs (one value or one each).")
flags.DEFINE_integer("eval_runs", 2, "Networks trained from scratch per evaluation row.")
flags.DEFINE_integer("eval_epochs", 300, "Epochs of each evaluation training.")
app_flags.define_enum_list("cross_arch", ["mlp", "lenet"], networks.NETWORKS,
                           "Other networks the sets are evaluated on (empty: none).")
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


@app_flags.one_line_errors
def main(argv):
  del argv
  root = pathlib.Path(FLAGS.root)
  failed = []
  if not FLAGS.table_only:
    grid = table.Grid(root=root, data_dir=FLAGS.data_dir, width=FLAGS.width, eval_runs=FLAGS.eval_runs,
                      eval_epochs=FLAGS.eval_epochs, eval_dsa=FLAGS.eval_dsa,
                      cross_arch=tuple(FLAGS.cross_arch), experts_root=FLAGS.experts_root,
                      udd_root=FLAGS.udd_root)
    grid_cells = table.cells(FLAGS.datasets, [int(i) for i in FLAGS.ipcs], FLAGS.methods,
                             [float(b) for b in FLAGS.max_seconds])
    failed = table.run_grid(grid, grid_cells, FLAGS.shard)
    if FLAGS.probe:
      table.probe_cells(root, data_dir=FLAGS.data_dir, probe_ipcs=[int(i) for i in FLAGS.probe_ipcs],
                        n_seeds=FLAGS.probe_seeds)
  text = table.table(root)
  if FLAGS.curve_roots:
    text += "\n" + table.budget_figure([pathlib.Path(r) for r in FLAGS.curve_roots], pathlib.Path(FLAGS.curve_output))
  if FLAGS.output:
    pathlib.Path(FLAGS.output).write_text(text)
  else:
    print(text)
  if failed:
    raise RuntimeError("cells failed:\n" + "\n".join(failed))


if __name__ == "__main__":
  app.run(main)
