"""Compile time and median time per outer step of every solver on MNIST-sized inputs.

|D| = 100 images of 784 pixels, K = 128 hidden units, batch 256 real images per task,
float32, default options of each solver class, one task (MNIST digits) and three tasks
(digit, parity, digit >= 5). Each step is jitted with the state's buffers donated and the
batch drawn on device, as ``udd_jax.distill`` does; "in loop" is the time per step of a
``lax.scan`` over ``--chunk`` steps (distill's own loop, no host round trip between
steps). Prints a markdown table, writes benchmarks/results/step_time.json and a PNG.

  python benchmarks/step_time.py --data_dir ../shared/data            # full: ~3-5 min on 2 idle cores
  python benchmarks/step_time.py --data_dir ../shared/data --quick    # smoke run (~30 s): 1 task, 3 steps
"""


import jax

import _common
from udd_jax import bilevel


def measure(name, data, n_tasks, args):
  tasks, n_classes = _common.task_set(*data, n_tasks)
  step, state, _ = _common.make_step(name, data[0], tasks, n_classes, n_distill=args.n_distill, n_hidden=args.n_hidden,
                                     batch=args.batch)
  init = jax.tree.map(lambda a: a.copy(), state)
  timed = _common.time_step(_common.jit_step(step), state, steps=args.steps, warmup=args.warmup)
  row = dict(solver=name, tasks=n_tasks, head=_common.default_head(name), compile_s=timed["compile_s"],
             step_ms=timed["median_s"] * 1e3, step_min_ms=timed["min_s"] * 1e3)
  row |= {k: timed["metrics"][k] for k in ("inner_steps", "cg_steps") if k in timed["metrics"]}
  if args.chunk > 1:
    chunked = _common.time_step(_common.jit_step(step, chunk=args.chunk), init, steps=max(2, args.steps // args.chunk),
                                warmup=args.warmup)
    row |= dict(chunk_compile_s=chunked["compile_s"], in_loop_ms=chunked["median_s"] * 1e3 / args.chunk)
  return row


def plot(rows, path, title):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  solvers = list(dict.fromkeys(r["solver"] for r in rows))
  task_counts = sorted({r["tasks"] for r in rows})
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  width = 0.8 / len(task_counts)
  for j, n in enumerate(task_counts):
    sel = {r["solver"]: r for r in rows if r["tasks"] == n}
    pos = [i + (j - (len(task_counts) - 1) / 2) * width for i in range(len(solvers))]
    axes[0].bar(pos, [sel[s]["step_ms"] for s in solvers], width, label=f"{n} task(s)")
    axes[1].bar(pos, [sel[s]["compile_s"] for s in solvers], width, label=f"{n} task(s)")
  for ax, label in zip(axes, ("median step (ms, log)", "compile, first step (s)")):
    ax.set_xticks(range(len(solvers)), solvers, rotation=15)
    ax.set_ylabel(label)
    ax.legend()
  axes[0].set_yscale("log")
  _common.save_figure(fig, title, path)


def main():
  parser = _common.argument_parser(__doc__)
  parser.add_argument("--steps", type=int, default=30, help="timed steps per solver (after warm-up)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (compiling) one")
  parser.add_argument("--chunk", type=int, default=10, help="steps per lax.scan for the in-loop column; 0 skips it")
  parser.add_argument("--tasks", type=int, nargs="+", default=[1, 3], choices=[1, 2, 3])
  parser.add_argument("--solvers", nargs="+", default=list(bilevel.SOLVERS), choices=list(bilevel.SOLVERS))
  parser.add_argument("--n_distill", type=int, default=_common.N_DISTILL)
  parser.add_argument("--n_hidden", type=int, default=_common.N_HIDDEN)
  parser.add_argument("--batch", type=int, default=_common.BATCH)
  parser.add_argument("--quick", action="store_true", help="smoke run (~30 s): 1 task, 3 steps, no in-loop column; writes *_quick.*")
  args = parser.parse_args()
  if args.quick:
    args.tasks, args.steps, args.warmup, args.chunk = [1], 3, 1, 0

  meta = _common.machine()
  x, y, source = _common.load_mnist(args.data_dir)
  meta |= dict(data=source, n_distill=args.n_distill, n_hidden=args.n_hidden, batch=args.batch, steps=args.steps,
               chunk=args.chunk, quick=args.quick, contended=_common.contended(meta))
  print(_common.header(meta))
  rows = []
  for name in args.solvers:
    for n_tasks in args.tasks:
      rows.append(measure(name, (x, y), n_tasks, args))
      r = rows[-1]
      print(f"  {name}, {n_tasks} task(s): compile {r['compile_s']:.2f} s, step {r['step_ms']:.1f} ms", flush=True)
  headers = ["solver", "tasks", "head", "compile (s)", "median step (ms)", "min step (ms)",
             f"in loop (ms/step, scan of {args.chunk})" if args.chunk > 1 else "in loop (ms/step)", "notes"]
  table = [[r["solver"], r["tasks"], r["head"], r["compile_s"], r["step_ms"], r["step_min_ms"], r.get("in_loop_ms"),
            ", ".join(f"{k} {r[k]:.0f}" for k in ("inner_steps", "cg_steps") if k in r)] for r in rows]
  print(_common.markdown_table(headers, table))
  json_path, png_path = _common.output_paths("step_time", args.quick)
  _common.write_json(json_path, meta, rows)
  plot(rows, png_path, f"step time, |D|={args.n_distill} K={args.n_hidden} batch={args.batch}; {meta['cpu']} "
                       f"x{meta['cpus_usable']}{' (CONTENDED)' if meta['contended'] else ''}")


if __name__ == "__main__":
  main()
