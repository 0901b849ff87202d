"""All solvers on the same wall-time budget: one table and one figure.

  python experiments/compare_solvers.py --dataset=mnist --data_dir=../shared/data \
      --n_distill=100 --n_hidden=128 --budget_seconds=600 --workdir=runs/compare
"""

from absl import app, flags, logging

from udd_jax import app_flags, experiment

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", "digits", experiment.BUILTIN_DATASETS, "Dataset (digits is embedded).")
flags.DEFINE_string("data_dir", None, "Directory with <dataset>.npz; defaults to $UDD_DATA_DIR.")
flags.DEFINE_enum("inner", "ae", experiment.LEARNERS, "Inner loss.")
flags.DEFINE_integer("n_distill", 20, "Size of the distilled set.")
flags.DEFINE_integer("n_hidden", 32, "Hidden units K.")
flags.DEFINE_float("budget_seconds", 60.0, "Wall-time budget of each solver.")
app_flags.define_enum_list("solvers", ["penalty", "value_function", "implicit", "unrolled", "pool"],
                           sorted(experiment.SOLVERS), "Solvers to compare.")
flags.DEFINE_integer("eval_seeds", 3, "Fresh learner seeds of the final evaluation.")
flags.DEFINE_integer("seed", 0, "Seed of every solver's run.")
app_flags.define_workdir()
app_flags.define_devices()


@app_flags.one_line_errors
def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # keep JAX's backend probing out of the output
  app_flags.start_distributed(FLAGS)
  experiment.compare_solvers(**app_flags.app_arguments(FLAGS, experiment.compare_solvers))


if __name__ == "__main__":
  app.run(main)
