"""Per-row time of ``udd_jax.evaluate`` on MNIST, and the raw-pixel head before and after Newton-CG.

``--part heads`` (the default) fits the raw-pixel row's headline head (raw features, all
60k training images, 7850 weights and biases) with each of ``--methods`` in turn, the
sequence repeated ``--repeats`` times so that before and after interleave on a shared
machine; it prints time, steps, gradient norm, objective and test accuracy, and each
method's relative objective difference to the first's. ``--part rows`` runs one whole
``udd_jax.evaluate`` (D = the first 100 training images, K = 128, ``--n_seeds`` seeds,
``--baselines``) with ``head_method=--head_method`` and prints each row's wall time from
the progress lines:

  python benchmarks/evaluation_rows.py --data_dir ../shared/data --part heads --methods lbfgs,auto --repeats 1
  python benchmarks/evaluation_rows.py --data_dir ../shared/data --part rows --head_method auto

Writes ``benchmarks/results/evaluation_rows_<part>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import sys
import time

import jax
import jax.numpy as jnp

import udd_jax
from udd_jax.evaluation import logistic

from _common import DEFAULT_DATA_DIR, RESULTS, machine


def heads(args, z, y, zt, yt) -> list[dict]:
  out, reference = [], {}
  for repeat in range(args.repeats):
    for method in args.methods.split(","):
      fit = jax.jit(functools.partial(logistic.fit_logistic, n_classes=10, l2=2e-5, standardize=args.standardize,
                                      max_steps=1000, method=method))
      compiled = fit.lower(z, y).compile()
      t0 = time.perf_counter()
      head = jax.block_until_ready(compiled(z, y))
      r = dict(method=method, repeat=repeat, seconds=time.perf_counter() - t0, steps=int(head.num_steps),
               grad_norm=float(head.grad_norm),
               objective=float(logistic.objective(head, z, y, l2=2e-5, standardize=args.standardize)),
               accuracy=float(logistic.accuracy(head, zt, yt)), load=list(__import__("os").getloadavg()))
      reference.setdefault(repeat, r)
      r["objective_rel_diff"] = (r["objective"] - reference[repeat]["objective"]) / reference[repeat]["objective"]
      r["accuracy_diff"] = r["accuracy"] - reference[repeat]["accuracy"]
      print(" ".join(f"{k}={v:.9g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
      out.append(r)
  return out


def rows(args, x, y, xt, yt) -> list[dict]:
  err = io.StringIO()
  t0 = time.perf_counter()
  with contextlib.redirect_stderr(err):
    report = udd_jax.evaluate(x[:100], (x, y), (xt, yt), n_hidden=128, n_seeds=args.n_seeds,
                              baselines=tuple(b for b in args.baselines.split(",") if b), head_method=args.head_method)
  total = time.perf_counter() - t0
  out, previous = [], 0.0
  for line in err.getvalue().splitlines():
    if line.startswith("evaluate: row"):
      clock = line.split(" | ")[1]
      seconds = int(clock.split("m")[0]) * 60 + int(clock.split("m")[1].rstrip("s"))
      out.append(dict(row=line.split(": ", 1)[1].split(" | ")[0], cumulative_s=seconds, row_s=seconds - previous))
      previous = seconds
      print(f"{out[-1]['row_s']:5.0f} s  (cumulative {seconds:4d} s)  {out[-1]['row']}", flush=True)
  print(f"total {total:.1f} s\n{report}", flush=True)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default=DEFAULT_DATA_DIR)
  parser.add_argument("--part", choices=("heads", "rows"), default="heads")
  parser.add_argument("--methods", default="lbfgs,auto", help="heads: fit_logistic methods, the reference first")
  parser.add_argument("--standardize", action="store_true", help="heads: the standardised head instead of the raw one")
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--n_seeds", type=int, default=5)
  parser.add_argument("--baselines", default=",".join(udd_jax.evaluation.BASELINES))
  parser.add_argument("--head_method", default="auto")
  args = parser.parse_args()
  meta = machine()
  print(f"load at start {meta['load_average']}, commit {meta['git_commit']}", file=sys.stderr)
  (x, y), (xt, yt) = udd_jax.load_dataset("mnist", data_dir=args.data_dir)
  if args.part == "heads":
    z, zt = jnp.asarray(x.reshape(len(x), -1)), jnp.asarray(xt.reshape(len(xt), -1))
    result = heads(args, z, jnp.asarray(y), zt, jnp.asarray(yt))
  else:
    result = rows(args, x, y, xt, yt)
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / f"evaluation_rows_{args.part}.json").write_text(json.dumps(dict(machine=meta, args=vars(args), result=result), indent=1))


if __name__ == "__main__":
  main()
