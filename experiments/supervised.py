"""Supervised dataset distillation baselines (DD, DC, DSA, DM, MTT, KIP, GTN) and coresets, DC-BENCH evaluation.

  python experiments/supervised.py --method=dc --dataset=mnist --data_dir=../shared/data --ipc=1 \
      --iterations=100 --workdir=runs/sup_dc_mnist_1
  python experiments/supervised.py --method=random --dataset=mnist --ipc=10 --workdir=runs/sup_random_10

Writes result.npz (the labelled set with config, history and learned step sizes),
images.png, evaluation.json and report.md into --workdir. Method options: --opt key=value
(repeatable), e.g. --opt image_lr=0.1 --opt init=random (udd_jax.distill's names; the old
lr_images and init=noise are refused with their new names); for mtt, --opt expert_n_experts=3
--opt expert_epochs=5 set the experts (trained into <workdir>/experts, resumable). A workdir that already holds
result.npz is only re-evaluated.
"""

from absl import app, flags, logging

from udd_jax import app_flags
from udd_jax import experiment as unsupervised_experiment
from udd_jax.data import BUILTIN_DATASETS
from udd_jax.supervised import experiment, networks

FLAGS = flags.FLAGS
flags.DEFINE_enum("method", "dc", list(experiment.METHODS), "Distillation method or coreset baseline.")
flags.DEFINE_enum("dataset", "mnist", BUILTIN_DATASETS, "Dataset (digits is embedded).")
flags.DEFINE_string("data_dir", None, "Directory with <dataset>.npz; defaults to $UDD_DATA_DIR.")
flags.DEFINE_integer("ipc", 1, "Images per class.")
flags.DEFINE_enum("network", "convnet", networks.NETWORKS, "Network distilled with and evaluated on.")
flags.DEFINE_integer("width", 128, "Channels of the ConvNet (hidden units of the MLP) in distillation and evaluation.")
flags.DEFINE_integer("iterations", None, "Outer iterations of the method (default: the method's).")
flags.DEFINE_float("max_seconds", None, "Wall-time budget of the distillation.")
flags.DEFINE_integer("seed", 0, "Seed of the distillation (evaluation uses seed + 1000 onwards).")
app_flags.define_workdir()
flags.DEFINE_integer("eval_runs", 5, "Networks trained from scratch per evaluation row (0: no evaluation).")
flags.DEFINE_integer("eval_epochs", 300, "Epochs of each evaluation training.")
flags.DEFINE_bool("eval_dsa", True, "Also evaluate with DSA augmentation during training.")
app_flags.define_enum_list("cross_arch", [], networks.NETWORKS, "Other networks to evaluate the set on.")
flags.DEFINE_multi_string("opt", [], "Method option key=value (repeatable).")


@app_flags.one_line_errors
def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  experiment.run(method=FLAGS.method, dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, ipc=FLAGS.ipc,
                 network=FLAGS.network, width=FLAGS.width, iterations=FLAGS.iterations, max_seconds=FLAGS.max_seconds, seed=FLAGS.seed,
                 workdir=FLAGS.workdir, eval_runs=FLAGS.eval_runs, eval_epochs=FLAGS.eval_epochs,
                 eval_dsa=FLAGS.eval_dsa, cross_arch=tuple(FLAGS.cross_arch),
                 options=unsupervised_experiment.parse_options(FLAGS.opt))


if __name__ == "__main__":
  app.run(main)
