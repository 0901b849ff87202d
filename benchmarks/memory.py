"""Peak memory of every solver's outer step, and its growth with the unroll length T and CG iterations.

Two measurements per configuration, each in a fresh child process (so that no allocator
cache or earlier compilation is carried from one configuration to the next):

* XLA's buffer assignment for the compiled step, ``jax.jit(step).lower(state).compile()
  .memory_analysis()``: argument, output, alias (donated inputs reused for outputs) and
  temp bytes. ``peak = argument + output - alias + temp`` is what the step needs live at
  once; it is exact for XLA's static plan and independent of load on the machine.
* Process RSS: the resident set before the first step (after compilation) and its peak
  while ``--steps`` steps run, sampled every millisecond by a thread (steps release the
  GIL); "RSS growth" is the difference. The child's ``ru_maxrss`` (peak over its whole
  life, compilation included) is recorded too. RSS includes Python, JAX and XLA's own heap,
  so only its growth during steps is comparable with XLA's figure.

The unrolled sweep runs T in ``--unroll`` for each inner optimiser in ``--unrolled_optimizers``
(distill's default plain gradient steps, ``sgd``, and ``adam``); the
implicit sweep fixes the CG iteration count (``cg_tol=0``) in ``--cg``; the base rows use
each solver class's defaults at |D|=100, K=128, batch 256, one task. Prints a markdown
table, writes benchmarks/results/memory.json and memory.png.

  python benchmarks/memory.py --data_dir ../shared/data            # full: ~4-5 min (25 children)
  python benchmarks/memory.py --data_dir ../shared/data --quick    # smoke run: 5 children, ~1 min
"""

import argparse
import json
import resource
import subprocess
import sys

import jax
import numpy as np

import _common
from udd_jax import bilevel

MiB = 2**20


def child(config):
  """Runs in a fresh process: compile one step, read XLA's plan, run it under the RSS sampler."""
  x, y, _ = _common.load_mnist(config["data_dir"])
  tasks, n_classes = _common.task_set(x, y, 1)
  step, state, _ = _common.make_step(config["solver"], x, tasks, n_classes, n_distill=config["n_distill"],
                                     n_hidden=config["n_hidden"], batch=config["batch"], **config["options"])
  compiled = _common.jit_step(step).lower(state).compile()
  m = compiled.memory_analysis()
  out = dict(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes, alias=m.alias_size_in_bytes,
             temp=m.temp_size_in_bytes, generated_code=m.generated_code_size_in_bytes)
  out["xla_peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  rss_before = _common.RssSampler.current()
  with _common.RssSampler() as sampler:
    for _ in range(config["steps"]):
      state, metrics = compiled(state)
      jax.block_until_ready((state, metrics))
  out |= dict(rss_before=rss_before, rss_peak=sampler.peak, rss_growth=sampler.peak - rss_before,
              ru_maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              metrics={k: float(v) for k, v in metrics.items() if k in ("inner_steps", "cg_steps")})
  print("RESULT " + json.dumps(out), flush=True)


def run_child(config):
  proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(config)], capture_output=True, text=True)
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  raise RuntimeError(f"child {config} failed:\n{proc.stderr[-3000:]}")


def configs(args):
  base = dict(data_dir=args.data_dir, n_distill=_common.N_DISTILL, n_hidden=_common.N_HIDDEN, batch=_common.BATCH,
              steps=args.steps)
  out = [dict(base, sweep="base", solver=s, value=None, options={}) for s in args.solvers]
  for opt in args.unrolled_optimizers:
    for t in args.unroll:
      out.append(dict(base, sweep=f"unroll_T_{opt}", solver="unrolled", value=t,
                      options=dict(unroll_steps=t, inner_optimizer=opt, inner_lr=0.02)))
  for c in args.cg:
    out.append(dict(base, sweep="cg_steps", solver="implicit", value=c, options=dict(cg_steps=c, cg_tol=0.0)))
  return out


def plot(rows, path, title):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for ax, prefix, label in zip(axes, ("unroll_T", "cg_steps"), ("unroll length T (unrolled)", "CG iterations (implicit)")):
    sweeps = sorted({r["sweep"] for r in rows if r["sweep"].startswith(prefix)})
    if not sweeps:
      continue
    for sweep in sweeps:
      sel = [r for r in rows if r["sweep"] == sweep]
      xs = [r["value"] for r in sel]
      tag = f" ({sweep[len(prefix) + 1:]})" if sweep != prefix else ""
      for key, name, style in (("xla_peak", "XLA plan: argument + output - alias + temp", "o-"),
                               ("rss_growth", "RSS growth during steps", "x:")):
        ax.plot(xs, [r[key] / MiB for r in sel], style, label=name + tag)
    ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("MiB")
    ax.legend(fontsize=7)
  _common.save_figure(fig, title, path)


def main():
  parser = _common.argument_parser(__doc__)
  parser.add_argument("--steps", type=int, default=5, help="steps run under the RSS sampler")
  parser.add_argument("--solvers", nargs="+", default=list(bilevel.SOLVERS), choices=list(bilevel.SOLVERS))
  parser.add_argument("--unroll", type=int, nargs="*", default=[5, 10, 20, 50, 100, 200, 500])
  parser.add_argument("--unrolled_optimizers", nargs="+", default=["sgd", "adam"], choices=["sgd", "adam"])
  parser.add_argument("--cg", type=int, nargs="*", default=[5, 10, 20, 50, 100, 200])
  parser.add_argument("--quick", action="store_true", help="smoke run: penalty base row, T in 5 10, CG in 5 10")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    return child(json.loads(args.child))
  if args.quick:
    args.solvers, args.unroll, args.cg, args.steps = ["penalty"], [5, 10], [5, 10], 2
    args.unrolled_optimizers = ["sgd"]

  meta = _common.machine()
  meta |= dict(quick=args.quick, contended=_common.contended(meta), steps=args.steps,
               method="XLA memory_analysis of the compiled, donated step + sampled process RSS, one child per row")
  print(_common.header(meta))
  rows = []
  for config in configs(args):
    result = run_child(config)
    rows.append(dict(sweep=config["sweep"], solver=config["solver"], value=config["value"], options=config["options"],
                     **result))
    r = rows[-1]
    print(f"  {r['sweep']} {r['solver']} {r['value'] or ''}: XLA peak {r['xla_peak'] / MiB:.1f} MiB, "
          f"temp {r['temp'] / MiB:.1f} MiB, RSS growth {r['rss_growth'] / MiB:.1f} MiB", flush=True)
  fits = {}
  for sweep in sorted({r["sweep"] for r in rows} - {"base"}):
    sel = [r for r in rows if r["sweep"] == sweep]
    if len(sel) >= 2:
      slope = np.polyfit([r["value"] for r in sel], [r["xla_peak"] for r in sel], 1)[0]
      fits[sweep] = dict(xla_bytes_per_unit=float(slope),
                         loglog_exponent=_common.loglog_fit([r["value"] for r in sel], [r["xla_peak"] for r in sel]))
  headers = ["sweep", "solver", "T / CG its", "argument", "output", "alias", "temp", "XLA peak", "RSS growth",
             "child max RSS", "notes"]
  table = [[r["sweep"], r["solver"], r["value"], *(f"{r[k] / MiB:.2f}" for k in
            ("argument", "output", "alias", "temp", "xla_peak", "rss_growth", "ru_maxrss")),
            ", ".join(f"{k} {v:.0f}" for k, v in r["metrics"].items())] for r in rows]
  print("sizes in MiB")
  print(_common.markdown_table(headers, table))
  for sweep, fit in fits.items():
    print(f"{sweep}: XLA peak grows by {fit['xla_bytes_per_unit'] / MiB:.3f} MiB per unit (log-log exponent "
          f"{fit['loglog_exponent']:.2f})")
  json_path, png_path = _common.output_paths("memory", args.quick)
  _common.write_json(json_path, meta, rows, fits=fits)
  plot(rows, png_path, f"memory of one outer step, |D|=100 K=128 batch=256; {meta['cpu']} x{meta['cpus_usable']}")


if __name__ == "__main__":
  main()
