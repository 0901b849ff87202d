"""Where the time of ``udd_jax.evaluate`` goes: learner training and the two logistic probes.

Times each part of the protocol on MNIST-sized data (|D| = 100, K = 128, all 60k real
training images, 10k test images) with ``n_seeds`` fresh learners. Learners and features
are compiled, then timed on a second call; each head solver (``--methods``: L-BFGS vmapped
over seeds, the probe before; Newton with the seeds one by one, the probe now; Newton
vmapped) is compiled ahead of time, then timed on one call,
and its heads are compared with the first method's, seed by seed: relative objective
difference, test-accuracy difference, gradient norm and steps:

  python benchmarks/evaluate_time.py --data_dir ../shared/data --n_seeds 3

Writes ``benchmarks/results/evaluate_time.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import udd_jax
from udd_jax import training
from udd_jax.evaluation import logistic

from _common import DEFAULT_DATA_DIR, RESULTS, machine


def timed(fn, *args, **kwargs) -> tuple[float, float, object]:
  """(compile + first run, second run) seconds, and the second result."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args, **kwargs))
  t1 = time.perf_counter()
  out = jax.block_until_ready(fn(*args, **kwargs))
  return t1 - t0, time.perf_counter() - t1, out


def fmt(values, spec: str = ".2e") -> str:
  return "[" + ", ".join(f"{v:{spec}}" for v in values) + "]"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default=DEFAULT_DATA_DIR)
  parser.add_argument("--n_seeds", type=int, default=5)
  parser.add_argument("--head_steps", type=int, default=1000)
  parser.add_argument("--methods", default="lbfgs,newton-map,newton", help="head solvers, the reference first; '<method>-map' runs the seeds one by one")
  parser.add_argument("--n_train", type=int, default=None, help="real rows for the heads (a smoke run; default all)")
  parser.add_argument("--tag", default="", help="appended to the JSON's name")
  args = parser.parse_args()
  meta = machine()

  (x, y), (xt, yt) = udd_jax.load_dataset("mnist", data_dir=args.data_dir)
  x, y, xt, yt = x[:args.n_train], y[:args.n_train], xt[:args.n_train], yt[:args.n_train]
  z, zt = jnp.asarray(x.reshape(len(x), -1)), jnp.asarray(xt.reshape(len(xt), -1))
  yj, ytj = jnp.asarray(y), jnp.asarray(yt)
  learner = udd_jax.get_inner_learner("ae")
  sets = jnp.broadcast_to(z[:100], (args.n_seeds, 100, z.shape[1]))
  keys = jax.random.split(jax.random.key(0), args.n_seeds)
  recipe = training.STANDARD_RECIPE
  rows = {}
  first, second, (params, _, _, steps) = timed(training.retrain_many, sets, keys, recipe, learner=learner, n_hidden=128)
  rows["train, standard recipe"] = dict(first_s=first, second_s=second, steps=float(jnp.mean(steps)))
  feats = jax.jit(jax.vmap(learner.features, in_axes=(0, None)))
  first, second, (f_train, f_test) = timed(lambda p: (feats(p, z), feats(p, zt)), params)
  rows["features of 60k + 10k images"] = dict(first_s=first, second_s=second)
  for standardize in (False, True):
    basis = "standardised" if standardize else "raw"
    reference = None
    for method in args.methods.split(","):
      one = functools.partial(udd_jax.evaluation.fit_logistic, labels=yj, n_classes=10, l2=2e-5,
                              standardize=standardize, max_steps=args.head_steps, method=method.removesuffix("-map"))
      # "<method>-map": the seeds one after the other (lax.map) instead of vmapped in lockstep.
      fit = jax.jit(functools.partial(jax.lax.map, one) if method.endswith("-map") else jax.vmap(one))
      t0 = time.perf_counter()
      compiled = fit.lower(f_train).compile()
      t1 = time.perf_counter()
      heads = jax.block_until_ready(compiled(f_train))
      seconds = time.perf_counter() - t1
      objective = jax.vmap(lambda h, f: logistic.objective(h, f, yj, l2=2e-5, standardize=standardize))(heads, f_train)
      accuracy = jax.vmap(lambda h, f: logistic.accuracy(h, f, ytj))(heads, f_test)
      r = dict(compile_s=t1 - t0, run_s=seconds, per_head_s=seconds / args.n_seeds, steps=heads.num_steps.tolist(),
               grad_norm=heads.grad_norm.tolist(), objective=objective.tolist(), accuracy=accuracy.tolist())
      if reference is None:
        reference = r
      else:
        r["objective_rel_diff"] = [(a - b) / b for a, b in zip(r["objective"], reference["objective"])]
        r["accuracy_diff"] = [a - b for a, b in zip(r["accuracy"], reference["accuracy"])]
      rows[f"logistic head ({method}), {basis} features"] = r
  for name, r in rows.items():
    if "run_s" in r:
      print(f"{name:44s} compile {r['compile_s']:6.1f} s  run {r['run_s']:7.1f} s  per head {r['per_head_s']:6.2f} s  "
            f"steps {r['steps']}  |grad| {fmt(r['grad_norm'])}  objective {fmt(r['objective'], '.9g')}  "
            f"accuracy {fmt(r['accuracy'], '.4f')}"
            + (f"  rel. objective diff {fmt(r['objective_rel_diff'])}  accuracy diff {fmt(r['accuracy_diff'])}"
               if "accuracy_diff" in r else ""))
    else:
      print(f"{name:44s} first {r['first_s']:7.1f} s  second {r['second_s']:7.1f} s  "
            + " ".join(f"{k}={v:.4g}" for k, v in r.items() if k not in ("first_s", "second_s")))
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / f"evaluate_time{args.tag}{'_quick' if args.n_train else ''}.json").write_text(json.dumps(dict(machine=meta, n_seeds=args.n_seeds, rows=rows), indent=1))


if __name__ == "__main__":
  main()
