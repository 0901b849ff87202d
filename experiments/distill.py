"""Distil a dataset, evaluate it honestly, and write every artifact into a workdir.

  python experiments/distill.py --dataset=digits --workdir=/tmp/udd_digits
  python experiments/distill.py --dataset=mnist --data_dir=../shared/data --n_distill=100 \
      --n_hidden=128 --workdir=runs/mnist_100
  python experiments/distill.py --dataset=mnist --data_dir=../shared/data --n_distill=100 \
      --n_hidden=128 --solver=unrolled --opt unroll_steps=100 --workdir=runs/mnist_100_unrolled

The default solver is pool. Solver or problem options: --opt key=value (repeatable), e.g.
--opt pool_size=16 --opt head_l2=0.01 (--help lists every solver's options); an unknown name
is refused with the list of both kinds, and any bad value stops the app with one line naming
it. A restarted run with the same workdir resumes from its last checkpoint. Ctrl-C (SIGINT) or SIGTERM stops it at the end of the current
chunk of --log_every steps, after writing a checkpoint; re-running the same command resumes (on
CPU, bit for bit). Re-running a finished run prints its saved report and recomputes nothing
(--rerun_evaluation evaluates it again).

Several devices (--devices=4) or processes (--coordinator_address=host:port --num_processes=2
--process_id=0, one command per process): docs/SCALING.md.
"""

from absl import app, flags, logging

from udd_jax import app_flags, experiment
from udd_jax.evaluation import default_cache_dir
from udd_jax.evaluation.cache import CACHE_ENV

FLAGS = flags.FLAGS
app_flags.define_enum_list("dataset", ["digits"], experiment.BUILTIN_DATASETS,
                           "Dataset(s): digits is embedded, the others read from --data_dir; several share one D.")
flags.DEFINE_string("data_dir", None, "Directory with <dataset>.npz; defaults to $UDD_DATA_DIR.")
flags.DEFINE_enum("inner", "ae", experiment.LEARNERS, "Inner loss.")
flags.DEFINE_enum("solver", experiment.DEFAULT_SOLVER, sorted(experiment.SOLVERS), "Solver.")
flags.DEFINE_integer("n_distill", 20, "Size of the distilled set.")
flags.DEFINE_integer("n_hidden", 32, "Hidden units K.")
flags.DEFINE_integer("steps", None, app_flags.steps_help())
flags.DEFINE_integer("seed", 0, "Seed of the distillation run.")
app_flags.define_workdir()
flags.DEFINE_integer("batch_size", 2048, "Real examples per task per step.")
flags.DEFINE_enum("init", "real", experiment.INITS, "Initial D.")
flags.DEFINE_enum("preprocessing", "none", experiment.PREPROCESSING_METHODS, "Map from pixels to the learner's inputs.")
flags.DEFINE_enum("lr_schedule", None, experiment.LR_SCHEDULES, "Schedule of the image / model step sizes (default: "
                  "constant); the same as --opt lr_schedule=...")
flags.DEFINE_integer("eval_every", 100, "Steps between honest-accuracy probes (0: never).")
flags.DEFINE_integer("eval_seeds", 5, "Fresh learner seeds of the final evaluation (0: no final evaluation).")
flags.DEFINE_integer("log_every", 10, "Steps per jitted chunk and per metrics line.")
flags.DEFINE_integer("checkpoint_every", 50, "Steps between checkpoints (rounded up to a multiple of --log_every).")
flags.DEFINE_float("max_seconds", None, "Stop the distillation after this much wall time, even before --steps.")
app_flags.define_enum_list("baselines", experiment.BASELINES, experiment.BASELINES,
                           "Baselines of the final evaluation (--baselines= for none).")
flags.DEFINE_list("transfer", [], "Cross-learner transfer rows, one per item: K=256,inner=score_matching gives two rows "
                  "(K = 256; score matching); join the parts of one row with ;, e.g. 'K=256;inner=score_matching'.")
flags.DEFINE_multi_string("opt", [], app_flags.opt_help())
flags.DEFINE_string("baseline_cache", str(default_cache_dir()),
                    "Directory keeping the evaluation's baseline rows, shared by every set judged in the same setting "
                    f"(default ${CACHE_ENV}/baselines or ~/.cache/udd_jax/baselines; --baseline_cache= computes them "
                    "every time).")
flags.DEFINE_string("prior", None, "A saved image prior (experiments/fit_prior.py): with --opt prior_weight=LAM D's outer "
                    "objective adds -LAM mean log p(D); the report gives D's naturalness under it in any case.")
flags.DEFINE_bool("rerun_evaluation", False, "Evaluate a finished run again instead of printing its saved report.")
app_flags.define_devices()


@app_flags.one_line_errors
def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # keep JAX's backend probing out of the output
  app_flags.start_distributed(FLAGS)
  experiment.run(**app_flags.app_arguments(FLAGS, experiment.run, dataset=",".join(FLAGS.dataset),
                                           options=experiment.parse_options(FLAGS.opt)))


if __name__ == "__main__":
  app.run(main)
