"""Compile time and median time per outer step of every solver on MNIST-sized inputs.

|D| = 100 images of 784 pixels, K = 128 hidden units, batch 256 real images per task,
float32, default solver options, one task (MNIST digits) and three tasks (digit, parity,
digit >= 5). Prints a markdown table and writes benchmarks/results/step_time.json.

  python benchmarks/step_time.py [--data_dir ../shared/data] [--steps 30]
"""

import argparse
import json
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import udd_jax
from udd_jax import bilevel

N_DISTILL, N_HIDDEN, BATCH = 100, 128, 256


def load(data_dir):
  try:
    (x, y), _ = udd_jax.load_dataset("mnist", data_dir=data_dir)
    source = "mnist"
  except FileNotFoundError:
    rng = np.random.default_rng(0)
    x, y = rng.uniform(size=(60000, 28, 28)).astype(np.float32), rng.integers(0, 10, 60000)
    source = "random (mnist.npz not found)"
  x = jnp.asarray(x.reshape(len(x), -1))
  y = jnp.asarray(y, jnp.int32)
  return x, y, source


def time_solver(name, x, tasks, n_classes, steps, head):
  problem = bilevel.make_problem(n_visible=784, n_hidden=N_HIDDEN, n_classes=n_classes, head=head)
  solver = bilevel.get_solver(name)
  state = solver.init(problem, jax.random.key(0), x[:N_DISTILL])

  @jax.jit
  def step(state):
    batch = bilevel.sample_batch(jax.random.fold_in(state.key, 1), tasks, BATCH)
    return solver.step(problem, state, batch)

  t0 = time.perf_counter()
  state, metrics = step(state)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = step(state)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  extra = {k: float(metrics[k]) for k in ("inner_steps", "cg_steps") if k in metrics}
  return compile_s, statistics.median(times), extra


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--steps", type=int, default=30)
  args = parser.parse_args()
  x, y, source = load(args.data_dir)
  task_sets = {1: ((x, y),), 3: ((x, y), (x, y % 2), (x, (y >= 5).astype(jnp.int32)))}
  classes = {1: [10], 3: [10, 2, 2]}
  device = jax.devices()[0]
  print(f"data: {source}; device: {device.device_kind} ({jax.default_backend()}); jax {jax.__version__}")
  print("| solver | tasks | head | compile (s) | median step (ms) | notes |")
  print("|---|---|---|---|---|---|")
  rows = []
  for name in bilevel.SOLVERS:
    head = "ridge" if name == "unrolled" else "softmax"
    for n_tasks in (1, 3):
      compile_s, step_s, extra = time_solver(name, x, task_sets[n_tasks], classes[n_tasks], args.steps, head)
      notes = ", ".join(f"{k} {v:.0f}" for k, v in extra.items())
      print(f"| {name} | {n_tasks} | {head} | {compile_s:.2f} | {step_s * 1e3:.1f} | {notes} |")
      rows.append(dict(solver=name, tasks=n_tasks, head=head, compile_s=compile_s, step_ms=step_s * 1e3, **extra))
  out = pathlib.Path(__file__).parent / "results"
  out.mkdir(exist_ok=True)
  meta = dict(device=str(device.device_kind), backend=jax.default_backend(), machine=platform.machine(),
              cpus=__import__("os").cpu_count(), jax=jax.__version__, data=source,
              n_distill=N_DISTILL, n_hidden=N_HIDDEN, batch=BATCH)
  suffix = "" if jax.default_backend() == "cpu" else f"_{jax.default_backend()}"
  (out / f"step_time{suffix}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
  main()
