"""All four solvers on the same wall-time budget: one table and one figure.

  python experiments/compare_solvers.py --dataset=mnist --data_dir=../shared/data \
      --n_distill=100 --n_hidden=128 --budget_seconds=600 --workdir=runs/compare
"""

from absl import app, flags, logging

from udd_jax import experiment

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "digits", "Dataset name.")
flags.DEFINE_string("data_dir", None, "Directory with <dataset>.npz; defaults to $UDD_DATA_DIR.")
flags.DEFINE_string("inner", "ae", "Inner loss.")
flags.DEFINE_integer("n_distill", 20, "Size of the distilled set.")
flags.DEFINE_integer("n_hidden", 32, "Hidden units K.")
flags.DEFINE_float("budget_seconds", 60.0, "Wall-time budget of each solver.")
flags.DEFINE_list("solvers", ["penalty", "value_function", "implicit", "unrolled"], "Solvers to compare.")
flags.DEFINE_integer("eval_seeds", 3, "Fresh learner seeds of the final evaluation.")
flags.DEFINE_string("workdir", None, "Where everything is written.", required=True)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # keep JAX's backend probing out of the output
  experiment.compare_solvers(
      dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, workdir=FLAGS.workdir, n_distill=FLAGS.n_distill,
      n_hidden=FLAGS.n_hidden, budget_seconds=FLAGS.budget_seconds, solvers=FLAGS.solvers, inner=FLAGS.inner,
      eval_seeds=FLAGS.eval_seeds,
  )


if __name__ == "__main__":
  app.run(main)
