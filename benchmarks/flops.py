"""Achieved GFLOP/s of every solver's outer step against this machine's measured float32 matmul peak.

* Peak: a jitted float32 ``a @ b`` of size n^3 for n in ``--peak_sizes``, best of ``--repeats``.
* FLOPs of a step, four ways:
  - XLA's ``compiled.cost_analysis()['flops']``. XLA counts a loop body ONCE whatever its
    trip count (checked: a scan of 1 or of 10 matmuls reports the same), so it is exact only
    for the loop-free penalty step and a lower bound for the others.
  - A count over the step's jaxpr (``jaxpr_flops``): every ``dot_general`` exactly
    (2 x output size x contracted size), elementwise and reduction ops as one FLOP per
    element; ``scan`` bodies times their length, ``while`` bodies times the iteration
    count the step reported (implicit: ``inner_steps`` then ``cg_steps``; value function:
    its fixed ``inner_steps``). Dead code is removed first (also inside loop bodies). With
    every loop counted once it can be compared with XLA's figure (printed side by side).
  - XLA's count with iterations: the loop-once count plus (iterations - 1) x the XLA count
    of each outermost loop body compiled on its own. The figure used for GFLOP/s. Both
    this and the jaxpr count charge every iteration with the loop-invariant part of its
    body (e.g. the primal half of each CG iteration's HVP, 6 of its 22 NdK) that XLA may
    hoist out of the loop: for the solvers with loops they may over-count.
  - For the penalty step, the analytic matmul count
    30 N d K + tasks (4 B d K + 6 B K C): 5 matmuls of 2NdK in the inner loss and its
    gradient, each with 2 more in the reverse-over-reverse pass, plus the outer features,
    logits and their backward (no gradient for the real batch).
* Achieved GFLOP/s = XLA's FLOPs with iterations / median step time; "% of peak" against
  the peak. For the penalty step (no loops) the XLA, jaxpr and analytic counts agree.

The iterative solvers run fixed work per step, as in scaling.py (implicit: ``inner_tol=0``,
``cg_tol=0``). Default points: the base point (|D|=100, K=128, batch 256) and the issue's
target point (|D|=100, K=1024, batch 1024). Prints a markdown table, writes
benchmarks/results/flops.json and flops.png.

  python benchmarks/flops.py --data_dir ../shared/data            # full: ~5-10 min on 2 idle cores
  python benchmarks/flops.py --data_dir ../shared/data --quick    # smoke run: 1024^3 peak, penalty and implicit at the base point
"""

import math
import time

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

import _common
from udd_jax import bilevel

FIXED_WORK = {"implicit": dict(inner_tol=0.0, cg_tol=0.0)}
# Iteration counts of a step's while loops, in the order they appear in its jaxpr.
WHILE_TRIPS = {"implicit": ("inner_steps", "cg_steps"), "value_function": ("inner_steps",)}
ELEMENTWISE = {
    "add", "sub", "mul", "div", "neg", "exp", "exp2", "log", "log1p", "logistic", "tanh", "max", "min", "pow",
    "integer_pow", "sqrt", "rsqrt", "square", "abs", "sign", "select_n", "expm1", "erf", "reduce_sum", "reduce_max",
    "reduce_min", "argmax", "argmin", "add_any", "cumsum",
}


def matmul_peak(sizes, repeats):
  """Best GFLOP/s of a jitted float32 n^3 matmul, per size and overall."""
  out = {}
  for n in sizes:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    best = math.inf
    for _ in range(repeats):
      t0 = time.perf_counter()
      f(a, b).block_until_ready()
      best = min(best, time.perf_counter() - t0)
    out[n] = 2 * n**3 / best / 1e9
    print(f"  matmul {n}^3: best {best * 1e3:.1f} ms = {out[n]:.1f} GFLOP/s", flush=True)
  return out


def _size(aval):
  return math.prod(aval.shape) if hasattr(aval, "shape") else 1


def _dce(jaxpr):
  """Drops the equations whose results are unused, as XLA does before it runs a computation.

  Matters inside loops: a forward-over-reverse HVP (``jax.jvp`` of ``jax.grad``) also
  computes the primal gradient, which a CG body discards (26 NdK matmul FLOPs per HVP as
  written, 22 NdK after dead-code elimination, as XLA counts the body).
  """
  inner = getattr(jaxpr, "jaxpr", jaxpr)
  try:
    from jax._src.interpreters import partial_eval as pe  # private, hence the fallback

    inner, _ = pe.dce_jaxpr(inner, [True] * len(inner.outvars), instantiate=True)
  except Exception:  # noqa: BLE001 - without DCE the count is an upper bound
    pass
  return inner


def jaxpr_flops(jaxpr, while_trips=(), _loops=None, *, loops_once=False, _in_loop=False):
  """``(matmul FLOPs, other FLOPs, loops)`` of a (closed) jaxpr; see the module docstring.

  ``while_trips`` gives the iteration count of each ``while`` met, in order (pre-order,
  outer loops first); missing counts are 1. ``loops`` lists every loop (``kind``, ``trips``,
  its body's FLOPs, the body itself and whether it is ``nested`` in another loop). With
  ``loops_once`` every loop body counts once, as XLA's cost analysis does (to cross-check
  the two). Each (sub-)jaxpr is first cleared of dead code.
  """
  loops = [] if _loops is None else _loops
  jaxpr = _dce(jaxpr)
  mm = other = 0.0

  def sub(j, in_loop=_in_loop):
    return jaxpr_flops(j, while_trips, loops, loops_once=loops_once, _in_loop=in_loop)

  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval
      mm += 2.0 * _size(eqn.outvars[0].aval) * math.prod(lhs.shape[i] for i in lhs_contract)
    elif name in ("scan", "while"):
      entry = dict(kind=name, nested=_in_loop)
      if name == "scan":
        trips, body = eqn.params["length"], eqn.params["jaxpr"]
      else:
        index = sum(1 for loop in loops if loop["kind"] == "while")
        trips, body = (while_trips[index] if index < len(while_trips) else 1), eqn.params["body_jaxpr"]
      trips = 1 if loops_once else trips
      loops.append(entry)
      bm, bo, _ = sub(body, True)
      cm, co = sub(eqn.params["cond_jaxpr"], True)[:2] if name == "while" else (0.0, 0.0)
      entry |= dict(trips=trips, body_matmul=bm, body_other=bo, body=body)
      mm, other = mm + trips * (bm + cm) + cm, other + trips * (bo + co) + co
    elif name == "cond":
      counts = [sub(b)[:2] for b in eqn.params["branches"]]
      mm, other = mm + max(c[0] for c in counts), other + max(c[1] for c in counts)
    else:
      for value in eqn.params.values():
        for j in value if isinstance(value, (tuple, list)) else (value,):
          if isinstance(j, (jcore.Jaxpr, jcore.ClosedJaxpr)):
            m, o, _ = sub(j)
            mm, other = mm + m, other + o
      if name in ELEMENTWISE:
        size = _size(eqn.invars[0].aval) if name.startswith(("reduce", "arg")) else _size(eqn.outvars[0].aval)
        other += size
  return mm, other, loops


def xla_flops_with_trips(xla_once, loops):
  """XLA's loop-once FLOPs plus (trips - 1) x XLA's FLOPs of each outermost loop body, compiled alone.

  The best estimate of what the step executes: XLA's own count, with the iteration counts
  its cost analysis ignores. Nested loops are left inside their parent's body (once).
  Returns None if a body cannot be compiled on its own.
  """
  total = xla_once
  for loop in loops:
    if loop["nested"] or loop["trips"] <= 1:
      continue
    body = loop["body"]
    closed = body if isinstance(body, jcore.ClosedJaxpr) else jcore.ClosedJaxpr(body, ())
    try:
      args = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in closed.jaxpr.invars]
      cost = jax.jit(jcore.jaxpr_as_fun(closed)).lower(*args).compile().cost_analysis()
      cost = cost[0] if isinstance(cost, list) else cost
    except Exception as e:  # noqa: BLE001
      print(f"  (a {loop['kind']} body would not compile alone: {type(e).__name__}: {e})")
      return None
    loop["xla_body_flops"] = cost.get("flops", 0.0)
    total += (loop["trips"] - 1) * loop["xla_body_flops"]
  return total


def analytic_penalty_matmul_flops(n, d, k, batch, n_classes):
  """Matmul FLOPs of one penalty step with the tied-AE inner loss and softmax heads."""
  return 30.0 * n * d * k + sum(4.0 * batch * d * k + 6.0 * batch * k * c for c in n_classes)


def plot(rows, peak, path, title):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  points = list(dict.fromkeys(r["point"] for r in rows))
  solvers = list(dict.fromkeys(r["solver"] for r in rows))
  fig, ax = plt.subplots(figsize=(7, 3.8))
  width = 0.8 / len(points)
  for j, p in enumerate(points):
    sel = {r["solver"]: r for r in rows if r["point"] == p}
    pos = [i + (j - (len(points) - 1) / 2) * width for i in range(len(solvers))]
    ax.bar(pos, [sel[s]["gflops"] if s in sel else 0 for s in solvers], width, label=p)
  ax.axhline(peak, color="k", ls="--", lw=1, label=f"matmul peak {peak:.0f}")
  ax.axhline(0.4 * peak, color="grey", ls=":", lw=1, label="40% of peak")
  ax.set_xticks(range(len(solvers)), solvers)
  ax.set_ylabel("achieved GFLOP/s (matmul FLOPs / step time)")
  ax.legend(fontsize=7)
  _common.save_figure(fig, title, path)


def main():
  parser = _common.argument_parser(__doc__)
  parser.add_argument("--solvers", nargs="+", default=list(bilevel.SOLVERS), choices=list(bilevel.SOLVERS))
  parser.add_argument("--points", nargs="+", default=["100,128,256", "100,1024,1024"],
                      help="sizes |D|,K,batch (one task)")
  parser.add_argument("--peak_sizes", type=int, nargs="+", default=[2048, 4096])
  parser.add_argument("--repeats", type=int, default=5, help="matmul repeats (best is kept)")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--seconds", type=float, default=20.0, help="time budget per point, after 3 timed steps")
  parser.add_argument("--quick", action="store_true", help="smoke run: 1024^3 peak, penalty + implicit, base point")
  args = parser.parse_args()
  if args.quick:
    args.solvers, args.points, args.peak_sizes, args.repeats, args.steps = (
        ["penalty", "implicit"], ["100,128,256"], [1024], 3, 2)

  meta = _common.machine()
  x, y, source = _common.load_mnist(args.data_dir)
  tasks, n_classes = _common.task_set(x, y, 1)
  meta |= dict(data=source, quick=args.quick, contended=_common.contended(meta), fixed_work=FIXED_WORK)
  print(_common.header(meta))
  peaks = matmul_peak(args.peak_sizes, args.repeats)
  peak = max(peaks.values())
  rows = []
  for point in args.points:
    n, k, b = map(int, point.split(","))
    for solver in args.solvers:
      step, state, _ = _common.make_step(solver, x, tasks, n_classes, n_distill=n, n_hidden=k, batch=b,
                                         **FIXED_WORK.get(solver, {}))
      jitted = _common.jit_step(step)
      cost = jitted.lower(state).compile().cost_analysis()
      cost = cost[0] if isinstance(cost, list) else cost
      jaxpr = jax.make_jaxpr(step)(state)
      timed = _common.time_step(jitted, state, steps=args.steps, warmup=1, max_seconds=args.seconds,
                                min_steps=min(3, args.steps))
      names = WHILE_TRIPS.get(solver, ())
      trips = [timed["metrics"].get(t, bilevel.get_solver(solver).inner_steps if t == "inner_steps" else 1)
               for t in names]
      mm, other, loops = jaxpr_flops(jaxpr, trips)
      once = sum(jaxpr_flops(jaxpr, loops_once=True)[:2])
      xla = cost.get("flops") or 0.0
      xla_trips = xla_flops_with_trips(xla, loops)
      loops = [{k: v for k, v in loop.items() if k != "body"} for loop in loops]
      n_while = sum(1 for loop in loops if loop["kind"] == "while")
      if n_while != len(names):
        print(f"  WARNING: {solver} has {n_while} while loops, expected {len(names)}; unnamed ones counted once")
      seconds = timed["median_s"]
      best = xla_trips if xla_trips else mm + other
      row = dict(point=point, solver=solver, n_distill=n, n_hidden=k, batch=b, step_ms=seconds * 1e3,
                 compile_s=timed["compile_s"], xla_flops_loops_once=xla, xla_transcendentals=cost.get("transcendentals"),
                 xla_flops=xla_trips, jaxpr_flops_loops_once=once, jaxpr_matmul_flops=mm, jaxpr_other_flops=other,
                 loops=loops, flops=best, gflops=best / seconds / 1e9, fraction_of_peak=best / seconds / 1e9 / peak,
                 gflops_jaxpr_matmul=mm / seconds / 1e9,
                 **{t: timed["metrics"][t] for t in names if t in timed["metrics"]})
      if solver == "penalty":
        row["analytic_matmul_flops"] = analytic_penalty_matmul_flops(n, x.shape[1], k, b, n_classes)
      rows.append(row)
      print(f"  {point} {solver}: {row['step_ms']:.2f} ms, {best / 1e9:.3f} GFLOP -> {row['gflops']:.1f} GFLOP/s "
            f"({100 * row['fraction_of_peak']:.0f}% of peak)", flush=True)

  print(f"\nmatmul peak: {peak:.1f} GFLOP/s (" + ", ".join(f"{n}^3: {g:.1f}" for n, g in peaks.items()) + ")")
  headers = ["|D|,K,batch", "solver", "median step (ms)", "XLA, loops once (G)", "jaxpr, loops once (G)",
             "XLA x iterations (G)", "jaxpr matmul x iterations (G)", "analytic matmul (G)", "GFLOP/s", "% of peak",
             "GFLOP/s (jaxpr matmul)"]
  table = [[r["point"], r["solver"], r["step_ms"], r["xla_flops_loops_once"] / 1e9, r["jaxpr_flops_loops_once"] / 1e9,
            r["xla_flops"] / 1e9 if r["xla_flops"] else None, r["jaxpr_matmul_flops"] / 1e9,
            r["analytic_matmul_flops"] / 1e9 if "analytic_matmul_flops" in r else None,
            r["gflops"], 100 * r["fraction_of_peak"], r["gflops_jaxpr_matmul"]] for r in rows]
  print(_common.markdown_table(headers, table))
  print("GFLOP/s = XLA's FLOPs with loop iterations (loop-once count + (iterations - 1) x each loop body's own count)\n"
        "/ median step; with loops it may over-count work XLA hoists out of the loop (see the module docstring).")
  for r in rows:
    if "analytic_matmul_flops" in r:
      print(f"penalty {r['point']}: jaxpr / analytic matmul = {r['jaxpr_matmul_flops'] / r['analytic_matmul_flops']:.3f}, "
            f"XLA / jaxpr (matmul + other) = {r['xla_flops_loops_once'] / (r['jaxpr_matmul_flops'] + r['jaxpr_other_flops']):.3f}")
  json_path, png_path = _common.output_paths("flops", args.quick)
  _common.write_json(json_path, meta, rows, matmul_peak_gflops=peaks, peak_gflops=peak)
  plot(rows, peak, png_path, f"achieved GFLOP/s per step; {meta['cpu']} x{meta['cpus_usable']}"
                             f"{' (CONTENDED)' if meta['contended'] else ''}")


if __name__ == "__main__":
  main()
