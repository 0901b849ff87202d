"""Where the time of ``udd_jax.evaluate`` goes: learner training and the two logistic probes.

Times each part of the protocol on MNIST-sized data (|D| = 100, K = 128, all 60k real
training images, 10k test images) with ``n_seeds`` fresh learners, each part compiled first
and then timed on a second call:

  python benchmarks/evaluate_time.py --data_dir ../shared/data --n_seeds 5

Writes ``benchmarks/results/evaluate_time.json``.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import udd_jax
from udd_jax import training
from udd_jax.evaluation import baselines

from _common import DEFAULT_DATA_DIR, RESULTS, machine


def timed(fn, *args, **kwargs) -> tuple[float, float, object]:
  """(compile + first run, second run) seconds, and the second result."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args, **kwargs))
  t1 = time.perf_counter()
  out = jax.block_until_ready(fn(*args, **kwargs))
  return t1 - t0, time.perf_counter() - t1, out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default=DEFAULT_DATA_DIR)
  parser.add_argument("--n_seeds", type=int, default=5)
  parser.add_argument("--head_steps", type=int, default=1000)
  args = parser.parse_args()

  (x, y), (xt, yt) = udd_jax.load_dataset("mnist", data_dir=args.data_dir)
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
    first, second, accs = timed(baselines.probe_accuracies, f_train, yj, f_test, ytj, 2e-5, n_classes=10,
                                standardize=standardize, max_steps=args.head_steps)
    rows[f"logistic head, {'standardised' if standardize else 'raw'} features"] = dict(
        first_s=first, second_s=second, accuracy=float(np.mean(accs)))
  for name, r in rows.items():
    print(f"{name:40s} first {r['first_s']:7.1f} s  second {r['second_s']:7.1f} s  "
          + " ".join(f"{k}={v:.4g}" for k, v in r.items() if k not in ("first_s", "second_s")))
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / "evaluate_time.json").write_text(json.dumps(dict(machine=machine(), n_seeds=args.n_seeds, rows=rows), indent=1))


if __name__ == "__main__":
  main()
