"""Interruption and resume: real processes killed with SIGKILL, SIGTERM and SIGINT, then re-run.

The subprocess tests run ``experiments/distill.py`` (the absl app) on the embedded digits,
without the final evaluation, on CPU. Every child shares one persistent JAX compilation
cache, so only the first one compiles; all calls have timeouts, so a hung child fails
the test instead of hanging it.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import chex
import numpy as np
import pytest

import udd_jax

from udd_jax import io
from udd_jax.driver import loop as loop_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 300
APP = [
    sys.executable, str(REPO / "experiments" / "distill.py"), "--dataset=digits", "--n_distill=10", "--n_hidden=16",
    "--batch_size=64", f"--steps={STEPS}", "--log_every=3", "--checkpoint_every=30", "--eval_every=0", "--eval_seeds=0",
    "--solver=unrolled", "--opt=unroll_steps=5",
]
TIMEOUT = 600  # seconds for any one child; they take a few (more on a loaded machine)


@pytest.fixture(scope="module")
def child_env(tmp_path_factory):
  cache = tmp_path_factory.mktemp("jax_cache")
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env.pop("JAX_ENABLE_X64", None)
  return env


def start(workdir: pathlib.Path, env: dict[str, str]) -> subprocess.Popen:
  # A shell may start background jobs with SIGINT ignored, and a child inherits an ignored
  # signal (a handled one is reset to the default). No preexec_fn: forking JAX is unsafe.
  ignored = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
  if ignored:
    signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with open(workdir.parent / f"{workdir.name}.log", "a") as log:
      return subprocess.Popen(APP + [f"--workdir={workdir}"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
  finally:
    if ignored:
      signal.signal(signal.SIGINT, signal.SIG_IGN)


def log_of(workdir: pathlib.Path) -> str:
  return (workdir.parent / f"{workdir.name}.log").read_text()


def finish(proc: subprocess.Popen) -> int:
  try:
    return proc.wait(timeout=TIMEOUT)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    pytest.fail(f"the child ran past {TIMEOUT} s")


def run_to_end(workdir: pathlib.Path, env: dict[str, str]) -> None:
  rc = finish(start(workdir, env))
  assert rc == 0, log_of(workdir)


def wait_for_lines(proc: subprocess.Popen, workdir: pathlib.Path, n: int) -> None:
  """Waits until metrics.jsonl has ``n`` lines (so a checkpoint exists and the run is mid-way)."""
  metrics = workdir / "metrics.jsonl"
  deadline = time.monotonic() + TIMEOUT
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      pytest.fail(f"the child exited with {proc.returncode} before it was interrupted:\n{log_of(workdir)}")
    if metrics.is_file() and metrics.read_text().count("\n") >= n:
      return
    time.sleep(0.01)
  proc.kill()
  proc.wait()
  pytest.fail(f"no {n} metrics lines within {TIMEOUT} s")


def checkpoint_history(workdir: pathlib.Path) -> list[dict]:
  with np.load(workdir / "checkpoint.npz") as f:
    return json.loads(str(f["meta/history"]))


def without_wall_time(history: list[dict]) -> list[dict]:
  return [{k: v for k, v in h.items() if k != "wall_time"} for h in history]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, child_env):
  workdir = tmp_path_factory.mktemp("runs") / "uninterrupted"
  run_to_end(workdir, child_env)
  return udd_jax.load_distilled(workdir / "distilled.npz")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda s: signal.Signals(s).name)
def test_interrupted_app_resumes_bit_for_bit(tmp_path, child_env, uninterrupted, sig):
  workdir = tmp_path / "run"
  proc = start(workdir, child_env)
  wait_for_lines(proc, workdir, 12)
  # Freeze the child before signalling, so that on a loaded machine it cannot run on to the
  # end between our check and the signal; SIGTERM / SIGINT are then handled on SIGCONT.
  proc.send_signal(signal.SIGSTOP)
  proc.send_signal(sig)
  proc.send_signal(signal.SIGCONT)
  rc = finish(proc)
  log = log_of(workdir)
  history = checkpoint_history(workdir)
  stopped_at = history[-1]["step"]
  assert stopped_at < STEPS and not (workdir / "distilled.npz").exists(), log
  if sig == signal.SIGKILL:
    assert rc == -signal.SIGKILL
    assert stopped_at >= 30 and stopped_at % 30 == 0  # the last of the checkpoints every 30 steps
    # A kill during a checkpoint write leaves at worst a truncated temp file beside it: resume ignores it.
    data = (workdir / "checkpoint.npz").read_bytes()
    (workdir / "checkpoint.npz.tmp").write_bytes(data[: len(data) // 2])
  else:
    # A clean stop: a checkpoint of the step it stopped at (not only every 30 steps), one line saying so.
    assert rc == (143 if sig == signal.SIGTERM else -signal.SIGINT), log
    assert stopped_at >= 36  # it was interrupted after 12 metrics lines of 3 steps
    assert f"stopped by {signal.Signals(sig).name} at step {stopped_at}/{STEPS}" in log
    assert "Re-run the same command (same workdir) to resume." in log
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == stopped_at
  run_to_end(workdir, child_env)
  resumed = udd_jax.load_distilled(workdir / "distilled.npz")
  chex.assert_trees_all_equal((resumed.images, resumed.params), (uninterrupted.images, uninterrupted.params))
  assert without_wall_time(resumed.history) == without_wall_time(uninterrupted.history)
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == list(range(3, STEPS + 1, 3))


@pytest.mark.slow
@pytest.mark.parametrize("flag, error", [
    ("--steps=-1", "ValueError: steps must be a positive integer; got -1"),
    ("--data_dir=MISSING", "FileNotFoundError: data_dir '{missing}' is not an existing directory"),
], ids=["negative steps", "missing data_dir"])
def test_app_refuses_bad_flags_before_training(tmp_path, child_env, flag, error):
  missing = str(tmp_path / "missing")
  workdir = tmp_path / "run"
  proc = subprocess.run(APP + [flag.replace("MISSING", missing), f"--workdir={workdir}"], env=child_env, cwd=REPO,
                        capture_output=True, text=True, timeout=TIMEOUT)
  assert proc.returncode == 1 and error.format(missing=missing) in proc.stderr.strip().splitlines()[-1], proc.stderr
  assert not (workdir / "config.json").exists() and not (workdir / "checkpoint.npz").exists()


# In-process pieces of the same machinery. Those that signal this very process need the
# handlers, which only the main thread can install: elsewhere SIGTERM would end the test run.
needs_main_thread = pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                                       reason="signal handlers can only be installed from the main thread")


def test_an_interrupted_checkpoint_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
  path = tmp_path / "checkpoint.npz"
  io.atomic_savez(path, {"a": np.arange(3)})
  real_savez = np.savez

  def killed_midway(f, **arrays):
    real_savez(f, **arrays)
    f.truncate(10)
    raise KeyboardInterrupt

  monkeypatch.setattr(np, "savez", killed_midway)
  with pytest.raises(KeyboardInterrupt):
    io.atomic_savez(path, {"a": np.arange(5)})
  with np.load(path) as f:
    np.testing.assert_array_equal(f["a"], np.arange(3))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.npz"]


@needs_main_thread
def test_stop_on_signal_defers_the_first_signal_and_restores_handlers():
  before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  stop = loop_lib.StopOnSignal().install()
  try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)  # let the interpreter run the handler
    assert stop.signum == signal.SIGTERM
    with pytest.raises(SystemExit) as info:  # a second signal stops at once
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(1.0)
    assert info.value.code == 143
  finally:
    stop.restore()
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_stop_on_signal_installs_nothing_outside_the_main_thread():
  before = signal.getsignal(signal.SIGTERM)
  seen = []
  thread = threading.Thread(target=lambda: seen.append(loop_lib.StopOnSignal().install().previous))
  thread.start()
  thread.join()
  assert seen == [{}] and signal.getsignal(signal.SIGTERM) is before


@pytest.mark.slow
@needs_main_thread
def test_sigterm_during_distill_checkpoints_that_step(tmp_path, capsys):
  (x, y), _ = udd_jax.load_dataset("digits")
  before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)

  def terminate_at_step_4(step, metrics):
    if step == 4:
      os.kill(os.getpid(), signal.SIGTERM)

  with pytest.raises(SystemExit) as info:
    udd_jax.distill(x, y, n_distill=10, n_hidden=8, steps=50, solver="value_function", batch_size=64, log_every=2,
                    checkpoint_every=50, workdir=tmp_path, progress=False, callback=terminate_at_step_4)
  assert info.value.code == 143
  assert [h["step"] for h in checkpoint_history(tmp_path)] == [2, 4]
  assert f"stopped by SIGTERM at step 4/50; the checkpoint is {tmp_path / 'checkpoint.npz'}" in capsys.readouterr().err
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
