"""Memory of the unrolled solver's outer step against the unroll length T, with and without rematerialisation.

For T in ``--unroll`` and |D| in ``--n_distill`` (MNIST, K = 128, batch 256, one task, plain
gradient steps: the unrolled solver's defaults), and each ``remat`` mode of
``udd_jax.Unrolled`` (``False``: every step's intermediates kept; ``"step"``: one carry per
step; ``"segments"``: about 2 sqrt(T) carries), XLA's buffer plan for the compiled step
(``jax.jit(step).lower(state).compile().memory_analysis()``: ``peak = argument + output -
alias + temp``; exact for XLA's static plan, independent of load). Compiling allocates no
buffers, so even the plans that would not fit in memory are read.

The cost in time: the median step time of each mode at ``--time_at`` (|D|, T) points, and,
in a child process of its own, one step of the largest point with ``"segments"`` and its
peak resident set (the "fits in 2 GiB" figure).

  python benchmarks/remat_memory.py --data_dir ../shared/data            # full: ~10 min on 2 cores
  python benchmarks/remat_memory.py --data_dir ../shared/data --quick    # smoke run: ~1 min
"""

import json
import subprocess
import sys

import jax

import _common

MiB = 2**20
MODES = ("none", "step", "segments")
REMAT = {"none": False, "step": "step", "segments": "segments"}


def build(x, tasks, n_classes, n_distill, t, mode):
  return _common.make_step("unrolled", x, tasks, n_classes, n_distill=n_distill, unroll_steps=t, remat=REMAT[mode])


def plan(x, tasks, n_classes, n_distill, t, mode):
  step, state, _ = build(x, tasks, n_classes, n_distill, t, mode)
  m = _common.jit_step(step).lower(state).compile().memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes) / MiB


def child(config):
  """In a process of its own: one timed step of (|D|, T, mode) and the process's peak RSS."""
  import resource

  x, y, _ = _common.load_mnist(config["data_dir"])
  tasks, n_classes = _common.task_set(x, y, 1)
  step, state, _ = build(x, tasks, n_classes, config["n_distill"], config["t"], config["mode"])
  timed = _common.time_step(_common.jit_step(step), state, steps=1, warmup=0, min_steps=1)
  print("RESULT " + json.dumps(dict(step_s=timed["median_s"], compile_s=timed["compile_s"],
                                    ru_maxrss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)), flush=True)


def main():
  parser = _common.argument_parser(__doc__)
  parser.add_argument("--unroll", type=int, nargs="+", default=[50, 100, 200, 500, 1000])
  parser.add_argument("--n_distill", type=int, nargs="+", default=[100, 1000])
  parser.add_argument("--time_at", type=str, nargs="+", default=["100:200"], help="|D|:T points to time every mode at")
  parser.add_argument("--steps", type=int, default=3, help="timed steps per point")
  parser.add_argument("--fit", type=str, default="1000:1000", help="|D|:T of the one-step segments run in a child process")
  parser.add_argument("--quick", action="store_true", help="T 50, 200; |D| 100; time |D| 100, T 50; fit 100:200")
  parser.add_argument("--child", type=str, default=None, help=argparse_suppress())
  args = parser.parse_args()
  if args.child:
    return child(json.loads(args.child))
  if args.quick:
    args.unroll, args.n_distill, args.time_at, args.fit, args.steps = [50, 200], [100], ["100:50"], "100:200", 2
  meta = _common.machine() | dict(benchmark="remat_memory", solver="unrolled", n_hidden=128, batch=256, tasks=1)
  print(_common.header(meta))
  x, y, _ = _common.load_mnist(args.data_dir)
  tasks, n_classes = _common.task_set(x, y, 1)

  rows = []
  for n_distill in args.n_distill:
    for t in args.unroll:
      row = dict(n_distill=n_distill, t=t) | {f"{mode}_mib": plan(x, tasks, n_classes, n_distill, t, mode) for mode in MODES}
      rows.append(row)
      print(json.dumps(row), flush=True)
  slopes = {f"{mode}@{n}": _common.loglog_fit([r["t"] for r in rows if r["n_distill"] == n],
                                              [r[f"{mode}_mib"] for r in rows if r["n_distill"] == n])
            for mode in MODES for n in args.n_distill}

  timings = []
  for point in args.time_at:
    n_distill, t = (int(v) for v in point.split(":"))
    for mode in MODES:
      step, state, _ = build(x, tasks, n_classes, n_distill, t, mode)
      timed = _common.time_step(_common.jit_step(step), state, steps=args.steps)
      timings.append(dict(n_distill=n_distill, t=t, mode=mode, step_s=timed["median_s"], compile_s=timed["compile_s"]))
      print(json.dumps(timings[-1]), flush=True)

  n_distill, t = (int(v) for v in args.fit.split(":"))
  config = dict(data_dir=args.data_dir, n_distill=n_distill, t=t, mode="segments")
  proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(config)], capture_output=True, text=True)
  lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
  fit = config | (json.loads(lines[-1][len("RESULT "):]) if lines else dict(error=proc.stderr[-2000:]))
  print(json.dumps(fit), flush=True)

  print(_common.markdown_table(["|D|", "T"] + [f"{m} (MiB)" for m in MODES],
                               [[r["n_distill"], r["t"]] + [r[f"{m}_mib"] for m in MODES] for r in rows]))
  print("log-log slope of memory against T: " + ", ".join(f"{k} {v:.2f}" for k, v in slopes.items() if v is not None))
  print(_common.markdown_table(["|D|", "T", "remat", "step (s)", "compile (s)"],
                               [[r["n_distill"], r["t"], r["mode"], r["step_s"], r["compile_s"]] for r in timings]))
  json_path, _ = _common.output_paths("remat_memory", args.quick)
  _common.write_json(json_path, meta, rows, slopes=slopes, timings=timings, fit=fit)


def argparse_suppress():
  import argparse

  return argparse.SUPPRESS


if __name__ == "__main__":
  main()
