"""Wall time for ``udd_jax.distill`` (default solver) to reach an honest accuracy on MNIST, |D| = 100.

Runs ``udd_jax.distill`` with its defaults (solver ``udd_jax.driver.DEFAULT_SOLVER`` with its
class defaults, K = 128, the solver's ``default_steps`` unless ``--steps``) with the honest probe every
``--eval_every`` steps and stops at the first probe at or above ``--threshold``, or when
``--budget_seconds`` of wall time is spent (``distill``'s ``max_seconds``), or after
``--steps``, and reports which. The probe is the evaluation protocol's with one fresh
seed: a fresh learner re-trained on D with the shipped recipe, a logistic head fitted on
all real training images (``fit_logistic``'s defaults: Newton for K = 128, at most 500 steps; L-BFGS
until 2026-12-07, docs/BENCHMARKS.md section (j)), accuracy on the
whole test set. (distill's own training-curve probe uses 10k/10k images and 300 head
steps and reads about a point lower; ``--cheap_probe`` uses it.)

Times: ``wall_time`` is distill's own clock (from its loop's start: compilation of the
first chunk and all earlier probes included); ``train_time`` subtracts the time spent in
the probes (each timed by wrapping distill's probe) and is the figure to quote;
``process_time`` adds distill's setup (preprocessing, initial D). Prints a markdown
table, writes benchmarks/results/time_to_accuracy.json and .png (accuracy against time).

  python benchmarks/time_to_accuracy.py --data_dir ../shared/data                 # full: up to --budget_seconds (1 h)
  python benchmarks/time_to_accuracy.py --data_dir ../shared/data --quick         # smoke run: T=10, batch 256, 20 steps, threshold 0.5
"""

import functools
import time

import numpy as np

import _common
import udd_jax

from udd_jax.driver import api as distill_module  # where distill builds its probe


class Reached(Exception):
  """Raised from the callback to stop distill at the first probe above the threshold."""


def plot(history, threshold, path, title):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  probed = [h for h in history if "honest_accuracy" in h]
  fig, ax = plt.subplots(figsize=(6.5, 3.8))
  if probed:
    ax.plot([h["train_time"] for h in probed], [100 * h["honest_accuracy"] for h in probed], "o-", label="honest (fresh learner)")
    ax.plot([h["train_time"] for h in probed], [100 * h["current_w_accuracy"] for h in probed], ".--",
            label="solver's current w")
  ax.axhline(100 * threshold, color="k", ls=":", lw=1, label=f"threshold {100 * threshold:.0f}%")
  ax.set_xlabel("training wall time, probes excluded (s)")
  ax.set_ylabel("test accuracy (%)")
  ax.legend(fontsize=8)
  _common.save_figure(fig, title, path)


def main():
  parser = _common.argument_parser(__doc__)
  parser.add_argument("--solver", default=distill_module.DEFAULT_SOLVER)
  parser.add_argument("--n_distill", type=int, default=100)
  parser.add_argument("--n_hidden", type=int, default=128)
  parser.add_argument("--threshold", type=float, default=None, help="honest accuracy to reach (default 0.95; quick 0.5)")
  parser.add_argument("--budget_seconds", type=float, default=3600.0, help="give up after this much wall time")
  parser.add_argument("--steps", type=int, default=None, help="outer steps at most (default: distill's)")
  parser.add_argument("--eval_every", type=int, default=20, help="steps between honest probes")
  parser.add_argument("--log_every", type=int, default=10, help="steps per jitted chunk (distill's log_every)")
  parser.add_argument("--batch_size", type=int, default=None, help="default: distill's")
  parser.add_argument("--unroll_steps", type=int, default=None, help="unrolled solver's T (default: distill's)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--cheap_probe", action="store_true", help="distill's 10k/10k training-curve probe, not the protocol's")
  parser.add_argument("--quick", action="store_true", help="smoke run: T=10, batch 256, 20 steps, threshold 0.5, 120 s")
  args = parser.parse_args()
  options = {}
  if args.quick:
    args.steps, args.eval_every, args.log_every, args.cheap_probe = 20, 10, 5, True
    args.threshold = 0.5 if args.threshold is None else args.threshold
    args.budget_seconds, args.batch_size = min(args.budget_seconds, 120.0), args.batch_size or 256
    if args.solver == "unrolled":
      args.unroll_steps = args.unroll_steps or 10
  if args.threshold is None:
    args.threshold = 0.95
  if args.batch_size:
    options["batch_size"] = args.batch_size
  if args.unroll_steps:
    options["unroll_steps"] = args.unroll_steps

  meta = _common.machine()
  (x_train, y_train), (x_test, y_test) = udd_jax.load_dataset("mnist", data_dir=args.data_dir)
  meta |= dict(data="mnist", quick=args.quick, contended=_common.contended(meta), solver=args.solver,
               n_distill=args.n_distill, n_hidden=args.n_hidden, threshold=args.threshold,
               budget_seconds=args.budget_seconds, steps=args.steps, eval_every=args.eval_every,
               log_every=args.log_every, options=options, seed=args.seed,
               probe="cheap (10k/10k, 300 head steps)" if args.cheap_probe else "protocol head, 1 seed (60k/10k, 500 head steps)")
  print(_common.header(meta))

  probe_times = []
  original = getattr(distill_module, "make_honest_probe", None)
  if original is not None:
    factory = original if args.cheap_probe else functools.partial(original, n_train=None, n_test=None, head_steps=500)

    def timed_factory(*a, **k):
      run = factory(*a, **k)

      def timed(*args_, **kwargs_):
        t0 = time.perf_counter()
        out = run(*args_, **kwargs_)
        probe_times.append(time.perf_counter() - t0)
        return out
      return timed
    distill_module.make_honest_probe = timed_factory

  history = []
  t_call = time.perf_counter()

  def callback(step, record):
    h = dict(record, process_time=time.perf_counter() - t_call)
    if "honest_accuracy" in record:
      # distill's wall_time is taken before this chunk's probe: subtract only the earlier probes.
      h["probe_time_before"] = sum(probe_times[:-1]) if original is not None else None
      h["train_time"] = record["wall_time"] - (h["probe_time_before"] or 0.0)
      print(f"  step {step}: honest {100 * record['honest_accuracy']:.2f}%, current w "
            f"{100 * record['current_w_accuracy']:.2f}%, train time {h['train_time']:.1f} s", flush=True)
    history.append(h)
    if record.get("honest_accuracy", -1.0) >= args.threshold:
      raise Reached

  outcome = "steps"
  try:
    udd_jax.distill(x_train, y_train, n_distill=args.n_distill, n_hidden=args.n_hidden, solver=args.solver,
                    steps=args.steps, seed=args.seed, log_every=args.log_every, eval_every=args.eval_every,
                    eval_data=(x_train, y_train, x_test, y_test), max_seconds=args.budget_seconds, progress=False,
                    callback=callback, **options)
  except Reached:
    outcome = "reached"
  finally:
    if original is not None:
      distill_module.make_honest_probe = original
  if outcome != "reached" and history and history[-1]["wall_time"] >= args.budget_seconds:
    outcome = "budget"

  probed = [h for h in history if "honest_accuracy" in h]
  best = max(probed, key=lambda h: h["honest_accuracy"]) if probed else None
  first = next((h for h in probed if h["honest_accuracy"] >= args.threshold), None)
  summary = dict(outcome=outcome, reached=first is not None, threshold=args.threshold,
                 step=first["step"] if first else None, train_time_s=first["train_time"] if first else None,
                 wall_time_s=first["wall_time"] if first else None, process_time_s=first["process_time"] if first else None,
                 best_honest_accuracy=best["honest_accuracy"] if best else None, best_step=best["step"] if best else None,
                 steps_run=history[-1]["step"] if history else 0, probes=len(probe_times),
                 mean_probe_s=float(np.mean(probe_times)) if probe_times else None)
  if first:
    print(f"\nreached {100 * args.threshold:.1f}% honest accuracy at step {first['step']}: train time "
          f"{first['train_time']:.1f} s (distill wall time {first['wall_time']:.1f} s, with setup {first['process_time']:.1f} s)")
  else:
    why = {"budget": f"within the budget of {args.budget_seconds:.0f} s", "steps": f"within {summary['steps_run']} steps"}[outcome]
    print(f"\nnever reached {100 * args.threshold:.1f}% {why}; best honest accuracy "
          f"{100 * (summary['best_honest_accuracy'] or 0):.2f}% at step {summary['best_step']}")
  headers = ["solver", "|D|", "K", "threshold", "outcome", "step", "train time (s)", "best honest acc.", "steps run",
             "probes (mean s)"]
  print(_common.markdown_table(headers, [[args.solver, args.n_distill, args.n_hidden, args.threshold, outcome,
                                          summary["step"], summary["train_time_s"], summary["best_honest_accuracy"],
                                          summary["steps_run"], summary["mean_probe_s"]]]))
  json_path, png_path = _common.output_paths("time_to_accuracy", args.quick)
  _common.write_json(json_path, meta, history, summary=summary, probe_times_s=probe_times)
  plot(history, args.threshold, png_path, f"{args.solver}, MNIST |D|={args.n_distill} K={args.n_hidden}; {meta['cpu']} "
                                          f"x{meta['cpus_usable']}{' (CONTENDED)' if meta['contended'] else ''}")


if __name__ == "__main__":
  main()
