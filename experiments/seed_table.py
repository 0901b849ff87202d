"""The seed's table in form: penalty, penalty + diversity and OVR at a few points of training.

  python experiments/seed_table.py --dataset=mnist --data_dir=../shared/data \
      --n_distill=100 --n_hidden=128 --points=1,100,200 --workdir=runs/seed_table
"""

from absl import app, flags, logging

from udd_jax import app_flags, experiment

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", "digits", experiment.BUILTIN_DATASETS, "Dataset (digits is embedded).")
flags.DEFINE_string("data_dir", None, "Directory with <dataset>.npz; defaults to $UDD_DATA_DIR.")
flags.DEFINE_integer("n_distill", 20, "Size of the distilled set.")
flags.DEFINE_integer("n_hidden", 32, "Hidden units K.")
flags.DEFINE_list("points", ["1", "100", "200"], "Outer steps at which to report.")
flags.DEFINE_float("diversity", 0.1, "Weight of the diversity term in the second row.")
flags.DEFINE_multi_string("opt", [], "For all three rows. " + app_flags.opt_help(experiment.JOINT_SOLVERS))
app_flags.define_workdir()


@app_flags.one_line_errors
def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # keep JAX's backend probing out of the output
  experiment.seed_table(**app_flags.app_arguments(FLAGS, experiment.seed_table, points=[int(p) for p in FLAGS.points],
                                                  options=experiment.parse_options(FLAGS.opt)))


if __name__ == "__main__":
  app.run(main)
