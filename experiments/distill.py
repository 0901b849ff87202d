"""Distil a dataset, evaluate it honestly, and write every artifact into a workdir.

  python experiments/distill.py --dataset=digits --workdir=/tmp/udd_digits
  python experiments/distill.py --dataset=mnist --data_dir=../shared/data --n_distill=100 \
      --n_hidden=128 --solver=unrolled --workdir=runs/mnist_100

Solver options: --opt key=value (repeatable), e.g. --opt mu=10 --opt unroll_steps=100.
A restarted run with the same workdir resumes from its last checkpoint. Ctrl-C (SIGINT)
or SIGTERM stops it at the end of the current chunk of --log_every steps, after writing
a checkpoint; re-running the same command resumes (on CPU, bit for bit).
"""

from absl import app, flags, logging

from udd_jax import experiment

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "digits", "Dataset name (digits is embedded; others read from --data_dir).")
flags.DEFINE_string("data_dir", None, "Directory with <dataset>.npz; defaults to $UDD_DATA_DIR.")
flags.DEFINE_string("inner", "ae", "Inner loss: ae, score_matching, denoising_score_matching.")
flags.DEFINE_string("solver", None, "pool, unrolled, implicit, penalty or value_function (default: the library's).")
flags.DEFINE_integer("n_distill", 20, "Size of the distilled set.")
flags.DEFINE_integer("n_hidden", 32, "Hidden units K.")
flags.DEFINE_integer("steps", None, "Outer steps (default: the library's).")
flags.DEFINE_integer("seed", 0, "Seed of the distillation run.")
flags.DEFINE_string("workdir", None, "Where everything is written.", required=True)
flags.DEFINE_integer("batch_size", 2048, "Real examples per task per step.")
flags.DEFINE_string("init", "real", "Initial D: real, kmeans or random.")
flags.DEFINE_string("preprocessing", "none", "none, standardize or zca.")
flags.DEFINE_integer("eval_every", 100, "Steps between honest-accuracy probes (0: never).")
flags.DEFINE_integer("eval_seeds", 5, "Fresh learner seeds of the final evaluation (0: no final evaluation).")
flags.DEFINE_integer("log_every", 10, "Steps per jitted chunk and per metrics line.")
flags.DEFINE_integer("checkpoint_every", 50, "Steps between checkpoints (rounded up to a multiple of --log_every).")
flags.DEFINE_list("baselines", list(experiment.BASELINES), "Baselines of the final evaluation.")
flags.DEFINE_list("transfer", [], "Cross-learner transfer rows, e.g. K=256,inner=score_matching.")
flags.DEFINE_multi_string("opt", [], "Solver or problem option key=value (repeatable).")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # keep JAX's backend probing out of the output
  experiment.run(
      dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, inner=FLAGS.inner, solver=FLAGS.solver,
      n_distill=FLAGS.n_distill, n_hidden=FLAGS.n_hidden, steps=FLAGS.steps, seed=FLAGS.seed,
      workdir=FLAGS.workdir, batch_size=FLAGS.batch_size, init=FLAGS.init, preprocessing=FLAGS.preprocessing,
      eval_every=FLAGS.eval_every, eval_seeds=FLAGS.eval_seeds, baselines=FLAGS.baselines,
      transfer=FLAGS.transfer, options=experiment.parse_options(FLAGS.opt), log_every=FLAGS.log_every,
      checkpoint_every=FLAGS.checkpoint_every,
  )


if __name__ == "__main__":
  app.run(main)
