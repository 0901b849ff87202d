"""Shared pieces of the benchmark scripts: data, the jitted solver step, timing, results.

Every script records :func:`machine` in its JSON, so that a figure can always be traced
to the platform, CPU count, library versions and the load on the machine when it ran
(a 1-minute load average above half the usable CPUs at the start marks a run as
contended: its timings are not figures to quote).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import udd_jax
from udd_jax import bilevel

RESULTS = pathlib.Path(__file__).parent / "results"
DEFAULT_DATA_DIR = os.environ.get("UDD_DATA_DIR", "../shared/data")
# The base point of every benchmark: MNIST-sized inputs, the sizes of docs/SOLVERS.md's table.
N_VISIBLE, N_DISTILL, N_HIDDEN, BATCH = 784, 100, 128, 256


def cpu_model() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
  """Where and how a benchmark ran: platform, CPUs, versions, load, niceness, git commit."""
  device = jax.devices()[0]
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=pathlib.Path(__file__).parent, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    commit = ""
  info = dict(
      date=datetime.datetime.now().isoformat(timespec="seconds"),
      platform=platform.platform(),
      machine=platform.machine(),
      cpu=cpu_model(),
      cpus=os.cpu_count(),
      cpus_usable=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
      load_average=[round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
      nice=os.nice(0) if hasattr(os, "nice") else None,
      python=platform.python_version(),
      jax=jax.__version__,
      jaxlib=getattr(__import__("jaxlib"), "__version__", "?"),
      numpy=np.__version__,
      udd_jax=udd_jax.__version__,
      backend=jax.default_backend(),
      device=str(device.device_kind),
      n_devices=jax.device_count(),
      xla_flags=os.environ.get("XLA_FLAGS", ""),
      git_commit=commit,
  )
  if "torch" in sys.modules:
    torch = sys.modules["torch"]
    info |= dict(torch=torch.__version__, torch_threads=torch.get_num_threads())
  return info


def contended(info: dict[str, Any]) -> bool:
  """Whether the 1-minute load average, before this run, exceeded half the usable CPUs."""
  load = info.get("load_average")
  return bool(load) and load[0] > 0.5 * (info.get("cpus_usable") or 1)


def load_mnist(data_dir: str | None, n: int | None = None) -> tuple[jax.Array, jax.Array, str]:
  """MNIST training images flattened to (n, 784) float32 in [0, 1] and labels; random pixels if absent."""
  try:
    (x, y), _ = udd_jax.load_dataset("mnist", data_dir=data_dir)
    source = "mnist"
  except FileNotFoundError:
    rng = np.random.default_rng(0)
    x, y = rng.uniform(size=(60000, 28, 28)).astype(np.float32), rng.integers(0, 10, 60000)
    source = "random pixels (mnist.npz not found)"
  x = np.asarray(x).reshape(len(x), -1)[:n]
  return jnp.asarray(x), jnp.asarray(np.asarray(y)[:n], jnp.int32), source


def task_set(x: jax.Array, y: jax.Array, n_tasks: int) -> tuple[tuple[tuple[jax.Array, jax.Array], ...], list[int]]:
  """1 task (digit) or 3 tasks (digit, parity, digit >= 5) on the same images."""
  tasks = ((x, y), (x, y % 2), (x, (y >= 5).astype(jnp.int32)))[:n_tasks]
  return tasks, [10, 2, 2][:n_tasks]


def default_head(name: str) -> str:
  """The head ``udd_jax.distill`` uses with this solver (its class's ``default_head``)."""
  return bilevel.SOLVERS[name].default_head


def make_step(name: str, x: jax.Array, tasks, n_classes: Sequence[int], *, n_distill: int = N_DISTILL,
              n_hidden: int = N_HIDDEN, batch: int = BATCH, head: str | None = None,
              **options: Any) -> tuple[Callable, Any, Any]:
  """One outer step ``state -> (state, metrics)`` of a solver (not jitted), its initial state and problem.

  The batch is drawn inside the step (on device, as ``udd_jax.distill`` does). D starts as
  the first ``n_distill`` real images (cycled if there are fewer). Jit it with :func:`jit_step`.
  """
  problem = bilevel.make_problem(n_visible=x.shape[1], n_hidden=n_hidden, n_classes=list(n_classes),
                                 head=head or default_head(name))
  solver = bilevel.get_solver(name, **options)
  images = x[jnp.arange(n_distill) % x.shape[0]]
  state = solver.init(problem, jax.random.key(0), images)
  # Donation needs one buffer per leaf (a solver state may alias an array twice).
  state = jax.tree.map(jnp.copy, state)

  def step(state):
    b = bilevel.sample_batch(jax.random.fold_in(state.key, 1), tasks, batch)
    return solver.step(problem, state, b)

  return step, state, problem


def jit_step(step: Callable, *, chunk: int = 1, donate: bool = True) -> Callable:
  """``jax.jit`` of one step, or of a ``lax.scan`` over ``chunk`` steps (metrics of the last) as
  ``udd_jax.distill`` runs them; the state's buffers are donated, as in the library's loop."""
  if chunk > 1:
    def run(state):
      state, metrics = jax.lax.scan(lambda s, _: step(s), state, None, length=chunk)
      return state, jax.tree.map(lambda m: m[-1], metrics)
  else:
    run = step
  return jax.jit(run, donate_argnums=0 if donate else ())


def xla_flops(compiled: Any) -> float:
  """XLA's FLOP count of a compiled function (``cost_analysis``; NaN when it gives none)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan")))


def first_and_median(fn: Callable, *args: Any, repeats: int) -> tuple[Any, float, float]:
  """``fn(*args)``'s output, the seconds of its first call (compilation, for a jitted ``fn``) and the
  median seconds of ``repeats`` calls after it."""
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  first_s = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return out, first_s, statistics.median(times)


def time_step(step: Callable, state: Any, *, steps: int, warmup: int = 1, max_seconds: float | None = None,
              min_steps: int = 3) -> dict[str, Any]:
  """Compile time of the first call, then per-step times after ``warmup`` more calls.

  Stops after ``steps`` timed steps, or after ``max_seconds`` once ``min_steps`` are timed.
  Returns the median, the min, every time, the last metrics and the final state.
  """
  t0 = time.perf_counter()
  state, metrics = step(state)
  jax.block_until_ready((state, metrics))
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    state, metrics = step(state)
  jax.block_until_ready((state, metrics))
  times = []
  start = time.perf_counter()
  while len(times) < steps:
    t0 = time.perf_counter()
    state, metrics = step(state)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
    if max_seconds is not None and len(times) >= min_steps and time.perf_counter() - start > max_seconds:
      break
  return dict(compile_s=compile_s, median_s=statistics.median(times), min_s=min(times), times_s=times,
              metrics={k: float(v) for k, v in metrics.items()}, state=state)


class RssSampler:
  """Peak resident set size of this process while active, sampled from /proc by a thread.

  A jitted step releases the GIL while it runs, so the sampler sees the step's own
  allocations (temporaries freed before the step returns included, if they live > period).
  """

  def __init__(self, period_s: float = 0.001):
    self.period_s = period_s
    self.peak = 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  @staticmethod
  def current() -> int:
    """Current RSS in bytes (0 where /proc is unavailable)."""
    try:
      return int(pathlib.Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
      return 0

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, self.current())
      time.sleep(self.period_s)

  def __enter__(self) -> RssSampler:
    self.peak = self.current()
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, self.current())


def loglog_fit(xs: Sequence[float], ys: Sequence[float]) -> float | None:
  """Slope of log y against log x by least squares (the scaling exponent); None if < 2 points."""
  pts = [(x, y) for x, y in zip(xs, ys) if x > 0 and y is not None and y > 0]
  if len(pts) < 2:
    return None
  lx, ly = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
  return float(np.polyfit(lx, ly, 1)[0])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  def fmt(v):
    if v is None:
      return "-"
    if isinstance(v, float):
      return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)

  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def output_paths(name: str, quick: bool) -> tuple[pathlib.Path, pathlib.Path]:
  """``results/<name>[_quick][_<backend>].json`` and ``.png``; quick runs never overwrite full ones."""
  RESULTS.mkdir(exist_ok=True)
  stem = name + ("_quick" if quick else "") + ("" if jax.default_backend() == "cpu" else f"_{jax.default_backend()}")
  return RESULTS / f"{stem}.json", RESULTS / f"{stem}.png"


def write_json(path: pathlib.Path, meta: dict[str, Any], rows: Any, **extra: Any) -> None:
  path.write_text(json.dumps(dict(meta=meta, rows=rows, **extra), indent=1, default=float) + "\n")
  print(f"wrote {path}")


def header(meta: dict[str, Any]) -> str:
  """One line on the machine, with a warning when the load says timings are contended."""
  line = (f"{meta['cpu']} x{meta['cpus_usable']} ({meta['backend']}, {meta['device']}); jax {meta['jax']}; "
          f"load {meta['load_average']}; nice {meta['nice']}")
  if contended(meta):
    line += "\nWARNING: the machine was loaded when this run started; its timings are contended, not figures."
  return line


def argument_parser(doc: str) -> argparse.ArgumentParser:
  """The parser every benchmark starts from: its docstring's first line and ``--data_dir``."""
  parser = argparse.ArgumentParser(description=doc.split("\n")[0])
  parser.add_argument("--data_dir", default=DEFAULT_DATA_DIR)
  return parser


def save_figure(fig: Any, title: str, path: pathlib.Path) -> None:
  """Titles, lays out and writes a benchmark's figure, and says where."""
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  print(f"wrote {path}")
