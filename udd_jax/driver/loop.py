"""The chunk loop: checkpoints, resume, progress, divergence and signals."""

from __future__ import annotations

import json
import pathlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from udd_jax import io
from udd_jax.driver.build import Run
from udd_jax.sharding import is_primary


class Progress:
  """One line per report with rate and ETA (to stderr), e.g. ``step 120/500 | 3.1 it/s | ETA 2m03s``."""

  SHOWN = ("outer_loss", "inner_grad_norm", "penalty", "honest_accuracy", "recipe_accuracy")

  def __init__(self, total: int, start: int, enabled: bool):
    self.total, self.start, self.enabled = total, start, enabled
    self.t0 = time.perf_counter()

  def report(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    elapsed = time.perf_counter() - self.t0
    rate = (step - self.start) / max(elapsed, 1e-9)
    eta = (self.total - step) / max(rate, 1e-9)
    shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k in self.SHOWN)
    print(f"step {step}/{self.total} | {rate:.2f} it/s | ETA {int(eta // 60)}m{int(eta % 60):02d}s | {shown}", file=sys.stderr, flush=True)


class StopOnSignal:
  """While active, SIGINT and SIGTERM only set ``signum``; the run stops at the end of its chunk.

  Handlers are installed from the main thread only (Python allows no other), never over
  a signal that is ignored, and :meth:`restore` puts the previous ones back. A second
  signal stops at once.
  """

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}

  def install(self) -> StopOnSignal:
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(sig)
        if previous in (signal.SIG_IGN, None):
          continue
        self._previous[sig] = previous
        signal.signal(sig, self._handle)
    return self

  @property
  def previous(self) -> dict[int, Any]:
    """The handlers that :meth:`install` replaced (and :meth:`restore` puts back)."""
    return dict(self._previous)

  def restore(self) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)

  def _handle(self, signum: int, frame: Any) -> None:
    again = self.signum is not None
    self.signum = signum
    if again:
      self.exit()

  def exit(self) -> NoReturn:
    """Raises what the signal asks for: KeyboardInterrupt for SIGINT, SystemExit(128 + signal number) otherwise."""
    if self.signum == signal.SIGINT:
      raise KeyboardInterrupt
    raise SystemExit(128 + self.signum)


_NOT_SET = object()


def _plain(value: Any) -> Any:
  return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def config_differences(saved: Mapping[str, Any], new: Mapping[str, Any], ignore: Collection[str] = ("steps",)) -> list[str]:
  """The settings in which two run configs differ, one ``"name: saved -> new"`` line each.

  Nested dicts (``solver_options``, ``problem_options``) are compared key by key and named
  with dots; a key on one side only reads ``(not set)`` on the other; tuples equal lists (as
  after a JSON round trip). Top-level keys in ``ignore`` are skipped (a run may be extended
  with more ``steps``).

  Examples:
    >>> config_differences({"n_hidden": 8, "steps": 5}, {"n_hidden": 16, "steps": 9})
    ['n_hidden: 8 -> 16']
    >>> config_differences({"solver_options": {"mu": 1}}, {"solver_options": {"mu": 2, "damping": 0.1}})
    ['solver_options.damping: (not set) -> 0.1', 'solver_options.mu: 1 -> 2']
  """
  lines = []
  for name in sorted((set(saved) | set(new)) - set(ignore), key=str):
    old, now = saved.get(name, _NOT_SET), new.get(name, _NOT_SET)
    if isinstance(old, Mapping) and isinstance(now, Mapping):
      lines += [f"{name}.{line}" for line in config_differences(old, now, ignore=())]
    elif _plain(old) != _plain(now):
      lines.append(f"{name}: " + " -> ".join("(not set)" if v is _NOT_SET else repr(_plain(v)) for v in (old, now)))
  return lines


def check_workdir(workdir: pathlib.Path) -> pathlib.Path:
  """The workdir as a directory (created); a path that is an existing file is refused clearly."""
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f"workdir {str(workdir)!r} is an existing file, not a directory; give a directory path.")
  workdir.mkdir(parents=True, exist_ok=True)
  return workdir


def save_checkpoint(workdir: pathlib.Path, state: Any, history: list[dict[str, float]]) -> None:
  """Writes the checkpoint (every process gathers the state; only process 0 writes)."""
  io.save_pytree(workdir / "checkpoint.npz", state, history=history)


def load_checkpoint(ckpt: pathlib.Path, template: Any) -> tuple[Any, list[dict[str, float]]]:
  """The state (in ``template``'s structure) and history of a checkpoint; a clear error if unreadable."""
  state, meta = io.restore_pytree(ckpt, template)
  return state, meta["history"]


def resume(workdir: pathlib.Path, config: dict[str, Any], state: Any) -> tuple[Any, list[dict[str, float]]]:
  """The run's state and history from ``workdir``'s checkpoint, or ``state`` and ``[]`` for a fresh run.

  Raises:
    ValueError: the workdir holds a run with another configuration (naming each setting that differs).
  """
  ckpt = workdir / "checkpoint.npz"
  if not ckpt.is_file():  # a fresh run, or one killed before its first checkpoint: start over
    if is_primary():
      (workdir / "metrics.jsonl").unlink(missing_ok=True)
    return state, []
  saved_config = json.loads((workdir / "config.json").read_text()) if (workdir / "config.json").is_file() else None
  if saved_config is not None:
    differences = config_differences(saved_config, config)
    if differences:
      raise ValueError(f"{workdir} holds a run with another configuration ({'; '.join(differences)}); use a new workdir.")
  # Only checkpoint.npz is read: a stray checkpoint.npz.tmp from a write that was killed is ignored.
  state, history = load_checkpoint(ckpt, state)
  # Lines logged after the checkpoint will be logged again: drop them from metrics.jsonl.
  io.atomic_write_text(workdir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
  return state, history


def first_non_finite(finite: dict[str, Any], record: dict[str, float], step0: int, step: int) -> tuple[int, list[str]] | None:
  """The first step of a chunk with a non-finite metric or state, and what was non-finite; None if all is finite."""
  per_step = finite["steps"]
  for i in range(step - step0):
    bad = sorted(k for k, ok in per_step.items() if not ok[i])
    if bad:
      return step0 + i + 1, bad
  bad = [k for k, v in record.items() if not np.isfinite(v)]
  bad += [f"solver state ({f})" for f, ok in finite["state"].items() if not ok]
  return (step, bad) if bad else None


def stop_diverged(step: int, quantities: list[str], workdir: pathlib.Path | None, run: Run) -> NoReturn:
  """Raises FloatingPointError; with a workdir, first writes the last good checkpoint's distilled set."""
  named = ", ".join(f"{q} (the hypergradient's norm)" if q == "image_grad_norm" else q for q in quantities)
  message = f"distillation diverged at step {step}: non-finite {named}. The run stopped"
  if workdir is None:
    message += "; nothing was kept (give a workdir to keep the last good checkpoint)"
  else:
    ckpt = workdir / "checkpoint.npz"
    good_state, good_history = load_checkpoint(ckpt, run.state)
    result = run.result(good_state, good_history)
    result.config["diverged_at_step"] = step
    path = result.save(workdir / "distilled.npz")
    message += f"; the last good checkpoint (step {int(good_state.step)}) is {ckpt} and its distilled set {path}"
  raise FloatingPointError(message + ". Try smaller step sizes (e.g. image_lr) in a new workdir.")


class _Schedule:
  """When a chunk's end is due for an honest probe: every ``eval_every`` steps, at the end, or by wall time."""

  def __init__(self, s: Any):
    self.s, self.next_time = s, s.eval_every_seconds

  def due(self, step: int, wall_time: float, out_of_time: bool) -> bool:
    s = self.s
    due = bool(s.eval_every and step % s.eval_every < s.log_every) or step >= s.steps or out_of_time
    if self.next_time is not None and wall_time >= self.next_time:
      due, self.next_time = True, wall_time + s.eval_every_seconds
    return due


def run_loop(run: Run, workdir: pathlib.Path | None, state: Any, history: list[dict[str, float]],
             probe: Callable[[Any], dict[str, float]] | None) -> Any:
  """Runs chunks until ``steps`` (or ``max_seconds``), logging, probing and checkpointing; returns the final state."""
  s = run.settings
  bar, schedule = Progress(s.steps, int(state.step), s.progress and is_primary()), _Schedule(s)
  metrics_file = open(workdir / "metrics.jsonl", "a") if workdir is not None and is_primary() else None
  # With a workdir, SIGINT / SIGTERM stop the run at the end of the current chunk, after a checkpoint.
  stop = StopOnSignal().install() if workdir is not None else None
  t_start, step = time.perf_counter(), int(state.step)
  try:
    while step < s.steps:
      step0 = step
      state, metrics, finite = run.run_chunk(state, jnp.asarray(step0))
      # One transfer per chunk: the step counter, the metrics and the finiteness flags together.
      host_step, metrics, finite = jax.device_get((state.step, metrics, finite))
      step = int(host_step)
      record = {k: float(v) for k, v in metrics.items()}
      diverged = first_non_finite(finite, record, step0, step)
      if diverged is not None:
        stop_diverged(*diverged, workdir, run)
      record["step"], record["wall_time"] = step, _agreed(time.perf_counter() - t_start)
      out_of_time = s.max_seconds is not None and record["wall_time"] >= s.max_seconds
      if probe is not None and schedule.due(step, record["wall_time"], out_of_time):
        record.update(probe(state))
      history.append(record)
      checkpointed = workdir is not None and _log(metrics_file, workdir, state, history, record, s)
      bar.report(step, record)
      if s.callback is not None:
        s.callback(step, record)
      if stop is not None and stop.signum is not None:
        _stop_on_signal(stop, checkpointed, workdir, state, history, step, s.steps)
      if out_of_time:
        break
  finally:
    if stop is not None:
      stop.restore()
    if metrics_file is not None:
      metrics_file.close()
  return state, history


def _agreed(wall_time: float) -> float:
  """Process 0's wall time on every process, so that time-based decisions (probe, budget) agree across processes."""
  if jax.process_count() == 1:
    return wall_time
  return float(multihost_utils.broadcast_one_to_all(np.float64(wall_time)))


def _log(metrics_file, workdir: pathlib.Path, state: Any, history: list[dict[str, float]], record: dict[str, float], s: Any) -> bool:
  """Appends the record to metrics.jsonl (process 0) and checkpoints when due; returns whether it checkpointed."""
  if metrics_file is not None:
    metrics_file.write(json.dumps(record) + "\n")
    metrics_file.flush()
  step = record["step"]
  if step % s.checkpoint_every < s.log_every or step >= s.steps:
    save_checkpoint(workdir, state, history)
    return True
  return False


def _stop_on_signal(stop: StopOnSignal, checkpointed: bool, workdir: pathlib.Path, state: Any,
                    history: list[dict[str, float]], step: int, steps: int) -> NoReturn:
  if not checkpointed:
    save_checkpoint(workdir, state, history)
  print(f"udd_jax.distill: stopped by {signal.Signals(stop.signum).name} at step {step}/{steps}; the checkpoint "
        f"is {workdir / 'checkpoint.npz'}. Re-run the same command (same workdir) to resume.", file=sys.stderr, flush=True)
  stop.exit()
