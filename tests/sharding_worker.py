"""The multi-device side of tests/test_sharding.py: run in a subprocess that simulates CPU devices.

``XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_worker.py SCENARIO [WORKDIR]``
prints one JSON object (the last line of stdout). It runs in float32, as an accelerator
would: the test compares runs on several devices with one device's to float32 tolerances.
"""

from __future__ import annotations

import json
import shutil
import sys

import jax
import numpy as np

import udd_jax
from udd_jax.bilevel import get_solver
from udd_jax.driver import arguments, build
from udd_jax.sharding import AXIS, make_layout

# The pool runs with the ridge head's MSE, and once more with its default ridge_ce under its own tolerance: see the
# docstring of test_sharding.py.
SOLVERS = {"pool": ("pool", dict(pool_size=8, head="ridge")), "pool_ridge_ce": ("pool", dict(pool_size=8)),
           "penalty": ("penalty", {}), "value_function": ("value_function", {}), "implicit": ("implicit", {}),
           "unrolled": ("unrolled", dict(unroll_steps=5))}
COMMON = dict(n_distill=10, n_hidden=8, batch_size=64, progress=False)


def _digits():
  (x, y), (xt, yt) = udd_jax.load_dataset("digits")
  return x, y, xt, yt


def _differences(a, b) -> dict[str, float]:
  """Max |difference| of the images and max relative difference of the last metrics line."""
  last_a, last_b = a.history[-1], b.history[-1]
  rel = {k: abs(last_a[k] - last_b[k]) / max(abs(last_a[k]), 1e-6) for k in last_a if k not in ("step", "wall_time")}
  return {"images": float(np.abs(a.images - b.images).max()), "metrics": max(rel.values())}


def distill() -> dict:
  """Every solver on 1 (no mesh), 2, 4 and 8 devices: differences from one device."""
  x, y, _, _ = _digits()
  out = {}
  for label, (solver, options) in SOLVERS.items():
    one = udd_jax.distill(x, y, solver=solver, steps=10, **COMMON, **options)
    out[label] = {n: _differences(one, udd_jax.distill(x, y, solver=solver, steps=10, devices=n, **COMMON, **options))
                   for n in (1, 2, 4, 8)}
  return out


def wide_pool() -> dict:
  """MNIST, K = 128, a pool of 8 split over 2 devices (4 learners each): the run that deadlocked XLA:CPU.

  Needs the real data (``$UDD_DATA_DIR``), and fails without it.
  """
  (x, y), _ = udd_jax.load_dataset("mnist")
  kw = COMMON | dict(n_distill=100, n_hidden=128, batch_size=256, pool_size=8, steps=10, log_every=10, head="ridge")
  one = udd_jax.distill(x[:5000], y[:5000], **kw)
  return _differences(one, udd_jax.distill(x[:5000], y[:5000], devices=2, **kw))


def placement() -> dict:
  """Where a built run's state lives, before and after one chunk, for the pool and for a batch-split solver."""
  x, y, _, _ = _digits()
  out = {}
  for solver, options in (("pool", dict(pool_size=8)), ("implicit", {})):
    solver_obj = get_solver(solver, **options)
    settings = arguments.check_arguments(
        x, y, n_distill=10, n_hidden=8, inner="ae", solver=solver_obj, steps=10, seed=0, batch_size=64, init="real",
        preprocessing="none", recipe=None, log_every=10, checkpoint_every=10, eval_every=0, eval_data=None,
        progress=False, callback=None, max_seconds=None, eval_every_seconds=None, options={})
    run = build.build(settings, make_layout(4))
    state, _, _ = run.run_chunk(run.state, jax.numpy.asarray(0))
    spec = lambda a: str(a.sharding.spec) if hasattr(a.sharding, "spec") else "single device"
    out[solver] = {f: sorted({spec(a) for a in jax.tree.leaves(getattr(state, f))}) for f in state._fields
                   if f not in ("key",)}
    out[solver]["devices"] = len(state.images.sharding.device_set)
  out["axis"] = AXIS
  out["errors"] = _errors(x, y)
  return out


def _errors(x, y) -> dict[str, str]:
  """The messages of the settings that a mesh cannot split."""
  x_small, y_small = x[:200], y[:200]
  (xt, yt) = (x[:50], y[:50])
  attempts = {
      "pool_size": lambda: udd_jax.distill(x_small, y_small, pool_size=6, steps=1, log_every=1, devices=4, **COMMON),
      "batch_size": lambda: udd_jax.distill(x_small, y_small, solver="penalty", steps=1, log_every=1, devices=4,
                                            **(COMMON | dict(batch_size=30))),
      "n_seeds": lambda: udd_jax.evaluate(x_small[:10], (x_small, y_small), (xt, yt), n_hidden=8, n_seeds=3, devices=2),
      "too_many": lambda: udd_jax.distill(x_small, y_small, steps=1, log_every=1, devices=16, **COMMON),
      "mesh_axes": lambda: udd_jax.distill(x_small, y_small, steps=1, log_every=1, **COMMON,
                                           devices=jax.make_mesh((2, 2), ("a", "b"))),
  }
  out = {}
  for name, attempt in attempts.items():
    try:
      attempt()
      out[name] = "no error"
    except (ValueError, TypeError) as e:
      out[name] = f"{type(e).__name__}: {e}"
  out["build"], out["build_compilations"] = _build_refusal(x_small, y_small)
  return out


def _build_refusal(x, y) -> tuple[str, int]:
  """``build`` itself, called without ``distill``, on a batch the mesh cannot split: its message and compilations."""
  settings = arguments.check_arguments(
      x, y, n_distill=10, n_hidden=8, inner="ae", solver=get_solver("penalty"), steps=1, seed=0, batch_size=30,
      init="real", preprocessing="standardize", recipe=None, log_every=1, checkpoint_every=1, eval_every=0,
      eval_data=None, progress=False, callback=None, max_seconds=None, eval_every_seconds=None, options={})
  compilations = []
  listener = lambda event, duration, **kwargs: compilations.append(event) if event.endswith("backend_compile_duration") else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    build.build(settings, make_layout(4))
    message = "no error"
  except ValueError as e:
    message = f"ValueError: {e}"
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  return message, len(compilations)


def resume(workdir: str) -> dict:
  """10 steps written on 4 devices, resumed to 20 on 1 and on 2; against 20 uninterrupted steps on one device."""
  x, y, _, _ = _digits()
  kw = dict(COMMON, log_every=5, checkpoint_every=5, head="ridge")
  whole = udd_jax.distill(x, y, steps=20, **kw)
  udd_jax.distill(x, y, steps=10, devices=4, workdir=f"{workdir}/four", **kw)
  out = {}
  for n in (None, 2):
    copy = f"{workdir}/resumed_on_{n or 1}"
    shutil.copytree(f"{workdir}/four", copy)
    resumed = udd_jax.distill(x, y, steps=20, devices=n, workdir=copy, **kw)
    out[str(n or 1)] = _differences(whole, resumed) | {"steps": [h["step"] for h in resumed.history]}
  return out


def evaluate() -> dict:
  """The evaluation's accuracies on 1 (no mesh), 2 and 4 devices, with fixed-length recipes."""
  x, y, xt, yt = _digits()
  short, own = udd_jax.Recipe("adam", 0.01, 60, 0.01), udd_jax.Recipe("adam", 0.01, 40, 0.01)
  reports = {n: udd_jax.evaluate(x[:20], (x, y), (xt, yt), n_hidden=8, n_seeds=4, standard_recipe=short, recipe=own,
                                 head_steps=50, baselines=("random_w", "random_subset"), devices=n) for n in (None, 2, 4)}
  rows = lambda r: [(row.name, row.recipe, row.accuracies, row.accuracies_standardized) for row in r.rows]
  return {str(n): rows(r) for n, r in reports.items()}


if __name__ == "__main__":
  scenario = sys.argv[1]
  result = {"distill": distill, "placement": placement, "evaluate": evaluate, "wide_pool": wide_pool}.get(scenario)
  result = resume(sys.argv[2]) if scenario == "resume" else result()
  print(json.dumps({"devices": jax.device_count(), "result": result}))
