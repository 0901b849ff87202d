"""Scaling of the outer step time with |D|, the real batch and K, with fitted log-log exponents.

One factor at a time around the base point |D| = 100, batch 256, K = 128 (784 pixels,
one task, float32): |D| in 10 .. 10,000, batch in 64 .. 4096, K in 32 .. 1024. Each point
compiles the donated, jitted step once and reports the median of up to ``--steps`` steps
(at least 3, at most ``--seconds`` per point after the first). By default the iterative
solvers run a fixed amount of work per step (implicit: ``inner_tol=0``, ``cg_tol=0``, so
its 5 inner steps and up to 5 CG iterations, which stop early only on negative curvature;
value function: its fixed 10 inner steps) so that the exponent measures the cost of the
work, not how the stopping rules react to the size; ``--adaptive`` uses the defaults.

For each solver and factor, two exponents b of time ~ size^b: over all points, and over
the points at or above the base value (the asymptotic regime; small sizes are dominated
by per-step overheads). Linear scaling is b = 1. Prints markdown tables, writes
benchmarks/results/scaling.json and scaling.png.

  python benchmarks/scaling.py --data_dir ../shared/data            # full: ~15-20 min on 2 idle cores (9 min with --seconds 6 --steps 8)
  python benchmarks/scaling.py --data_dir ../shared/data --quick    # smoke run: penalty, 2 points per factor, ~40 s
"""


import numpy as np

import _common
from udd_jax import bilevel

SWEEPS = {
    "n_distill": [10, 30, 100, 300, 1000, 3000, 10000],
    "batch": [64, 128, 256, 512, 1024, 2048, 4096],
    "n_hidden": [32, 64, 128, 256, 512, 1024],
}
BASE = {"n_distill": _common.N_DISTILL, "batch": _common.BATCH, "n_hidden": _common.N_HIDDEN}
LABELS = {"n_distill": "|D|", "batch": "batch", "n_hidden": "K"}
FIXED_WORK = {"implicit": dict(inner_tol=0.0, cg_tol=0.0)}


def affine_fit(xs, ts):
  """Least-squares ``t = fixed + per_unit * x`` in relative error (weights 1/t), over the given points.

  A step is a fixed cost (dispatch, the parts that do not depend on the factor) plus work
  proportional to the factor; a log-log exponent below 1 can hide exact linearity in x.
  Returns the two coefficients and the largest relative deviation of a point from the line.
  """
  xs, ts = np.asarray(xs, float), np.asarray(ts, float)
  if len(xs) < 2:
    return None
  per_unit, fixed = np.polyfit(xs, ts, 1, w=1.0 / ts)
  return dict(fixed_ms=float(fixed), per_unit_ms=float(per_unit),
              max_relative_deviation=float(np.max(np.abs(fixed + per_unit * xs - ts) / ts)))


def plot(rows, fits, path, title):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  factors = [f for f in SWEEPS if any(r["factor"] == f for r in rows)]
  fig, axes = plt.subplots(1, len(factors), figsize=(4.2 * len(factors), 3.8), squeeze=False)
  for ax, factor in zip(axes[0], factors):
    for solver in dict.fromkeys(r["solver"] for r in rows):
      sel = [r for r in rows if r["factor"] == factor and r["solver"] == solver]
      b = fits.get(f"{solver}/{factor}", {}).get("exponent_upper")
      ax.plot([r["value"] for r in sel], [r["step_ms"] for r in sel], "o-",
              label=f"{solver} (b={b:.2f})" if b is not None else solver)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(LABELS[factor])
    ax.set_ylabel("median step (ms)")
    ax.axvline(BASE[factor], color="grey", lw=0.5)
    ax.legend(fontsize=7)
  _common.save_figure(fig, title, path)


def main():
  parser = _common.argument_parser(__doc__)
  parser.add_argument("--solvers", nargs="+", default=list(bilevel.SOLVERS), choices=list(bilevel.SOLVERS))
  parser.add_argument("--factors", nargs="+", default=list(SWEEPS), choices=list(SWEEPS))
  for factor, values in SWEEPS.items():
    parser.add_argument(f"--{factor}", type=int, nargs="+", default=values, help=f"values of {LABELS[factor]}")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per point (at most)")
  parser.add_argument("--seconds", type=float, default=20.0, help="time budget per point, after 3 timed steps")
  parser.add_argument("--adaptive", action="store_true", help="the solvers' own stopping rules (default: fixed work)")
  parser.add_argument("--quick", action="store_true", help="smoke run: penalty, 2 smallest points per factor, 2 steps")
  args = parser.parse_args()
  if args.quick:
    args.solvers, args.steps, args.seconds = ["penalty"], 2, 1.0
    for factor in SWEEPS:
      setattr(args, factor, getattr(args, factor)[:2])

  meta = _common.machine()
  x, y, source = _common.load_mnist(args.data_dir)
  tasks, n_classes = _common.task_set(x, y, 1)
  meta |= dict(data=source, base=BASE, quick=args.quick, adaptive=args.adaptive, contended=_common.contended(meta),
               fixed_work={} if args.adaptive else FIXED_WORK, steps=args.steps, seconds=args.seconds)
  print(_common.header(meta))
  rows, fits = [], {}
  for solver in args.solvers:
    options = {} if args.adaptive else FIXED_WORK.get(solver, {})
    for factor in args.factors:
      for value in getattr(args, factor):
        sizes = dict(BASE, **{factor: value})
        step, state, _ = _common.make_step(solver, x, tasks, n_classes, **sizes, **options)
        timed = _common.time_step(_common.jit_step(step), state, steps=args.steps, warmup=1,
                                  max_seconds=args.seconds, min_steps=min(3, args.steps))
        rows.append(dict(solver=solver, factor=factor, value=value, **sizes, compile_s=timed["compile_s"],
                         step_ms=timed["median_s"] * 1e3, step_min_ms=timed["min_s"] * 1e3, timed_steps=len(timed["times_s"]),
                         **{k: v for k, v in timed["metrics"].items() if k in ("inner_steps", "cg_steps")}))
        print(f"  {solver} {LABELS[factor]}={value}: {rows[-1]['step_ms']:.2f} ms (compile {timed['compile_s']:.1f} s)",
              flush=True)
      sel = [r for r in rows if r["solver"] == solver and r["factor"] == factor]
      xs, ts = [r["value"] for r in sel], [r["step_ms"] for r in sel]
      upper = [(v, t) for v, t in zip(xs, ts) if v >= BASE[factor]]
      fits[f"{solver}/{factor}"] = dict(
          exponent_all=_common.loglog_fit(xs, ts),
          exponent_upper=_common.loglog_fit(*zip(*upper)) if len(upper) >= 2 else None,
          affine_upper=affine_fit(*zip(*upper)) if len(upper) >= 2 else None,
          range=[min(xs), max(xs)])

  for factor in args.factors:
    values = getattr(args, factor)
    print(f"\nmedian step (ms) against {LABELS[factor]} (others at base)")
    table = []
    for solver in args.solvers:
      by_value = {r["value"]: r["step_ms"] for r in rows if r["solver"] == solver and r["factor"] == factor}
      fit = fits[f"{solver}/{factor}"]
      affine = fit["affine_upper"] or {}
      table.append([solver, *(by_value.get(v) for v in values), fit["exponent_all"], fit["exponent_upper"],
                    affine.get("fixed_ms"), affine.get("per_unit_ms"), affine.get("max_relative_deviation")])
    print(_common.markdown_table(["solver", *map(str, values), "exponent (all)", f"exponent (>= {BASE[factor]})",
                                  "affine: fixed (ms)", "per unit (ms)", "max deviation"], table))
  json_path, png_path = _common.output_paths("scaling", args.quick)
  _common.write_json(json_path, meta, rows, fits=fits)
  plot(rows, fits, png_path, f"step time scaling around |D|=100 K=128 batch=256; {meta['cpu']} x{meta['cpus_usable']}"
                             f"{' (CONTENDED)' if meta['contended'] else ''}")


if __name__ == "__main__":
  np.seterr(all="ignore")
  main()
