"""Step time and memory of every solver when ``udd_jax.distill`` splits its work over 1, 2, 4 and 8 devices.

For each solver (pool, penalty, value_function, implicit, unrolled) and each device count N
in ``--devices``, a fresh child process with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
(the flag must be set before JAX starts) runs ``udd_jax.distill(x, y, ..., devices=N)`` on
MNIST (|D| = 100, K = 128, batch_size 2048, pool_size 8, library defaults otherwise): the
pool solver splits its 8 learners across the devices, the others the real batch. A
baseline child runs ``devices=None`` (no mesh at all) with one device. Each child reports:

* compile (s): the first chunk's wall time (``result.history[0]["wall_time"]``: compilation
  of the chunk plus its ``log_every`` steps);
* s/step: the median over the next ``--timed_chunks`` chunks of (chunk wall time) / ``log_every``;
* peak RSS: the child's ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (whole life: the
  188 MB MNIST array, preprocessing, compilation and the run);
* the distilled images, from which the parent takes max |D_N - D_baseline| (same seed, same
  batches: the split should change only the order of floating-point sums).

On a CPU the simulated devices are threads of one process sharing the same cores, so this
measures what splitting costs on one machine (partitioned programs, collectives, smaller
blocks per device), not a speed-up.

  python benchmarks/devices.py --data_dir ../shared/data            # full: ~6 min on 2 cores
  python benchmarks/devices.py --data_dir ../shared/data --quick    # smoke run: penalty, 1 and 2 devices, ~1 min
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

import _common

SOLVERS = ("pool", "penalty", "value_function", "implicit", "unrolled")
# Steps per chunk: enough that one chunk takes a fraction of a second or more at 1 device,
# so that the per-chunk host round trip does not dominate; unrolled steps cost ~1 s each.
LOG_EVERY = dict(pool=10, penalty=20, value_function=10, implicit=10, unrolled=2)
N_DISTILL, N_HIDDEN, BATCH, POOL = 100, 128, 2048, 8


def child(config):
  """In a process of its own (XLA_FLAGS already set): one distill run; prints RESULT and saves D."""
  import resource
  import traceback

  import jax

  import udd_jax

  out = dict(jax_devices=jax.device_count())
  try:
    (x, y), _ = udd_jax.load_dataset("mnist", data_dir=config["data_dir"])
    options = dict(config["options"])
    if config["solver"] == "pool":
      options["pool_size"] = POOL
    log_every, chunks = config["log_every"], 1 + config["timed_chunks"]
    marks = []
    t0 = time.perf_counter()
    result = udd_jax.distill(x, y, n_distill=N_DISTILL, n_hidden=N_HIDDEN, batch_size=BATCH, solver=config["solver"],
                             steps=log_every * chunks, log_every=log_every, progress=False, devices=config["devices"],
                             callback=lambda step, record: marks.append(time.perf_counter()), **options)
    total_s = time.perf_counter() - t0
    walls = [h["wall_time"] for h in result.history]
    per_step = [(b - a) / log_every for a, b in zip(walls, walls[1:])]
    np.save(config["images_path"], np.asarray(result.images, np.float32))
    out |= dict(compile_s=walls[0], step_s=float(np.median(per_step)), step_s_all=per_step,
                callback_gaps_s=[b - a for a, b in zip(marks, marks[1:])], distill_total_s=total_s,
                setup_s=total_s - walls[-1], steps=log_every * chunks, log_every=log_every,
                solver_options=result.config["solver_options"])
  except Exception as e:  # reported in the row, so one failing count does not lose the others
    out |= dict(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
  out["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print("RESULT " + json.dumps(out), flush=True)


def cpu_seconds(pid):
  """User + system CPU seconds of process ``pid`` (from /proc; None where unreadable)."""
  try:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
  except (OSError, IndexError, ValueError):
    return None


def run_child(config, n_devices, timeout_s, idle_s):
  """Runs :func:`child` with ``n_devices`` simulated CPU devices; returns its RESULT (or the failure).

  A child that uses no CPU for ``idle_s`` seconds is stopped as hung (every device thread
  waiting, e.g. on a collective), one that runs past ``timeout_s`` as too slow.
  """
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n_devices}"])
  t0 = time.perf_counter()
  with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(config)], stdout=out, stderr=err,
                            text=True, env=env)
    error, last_cpu, last_change = None, -1.0, time.perf_counter()
    while proc.poll() is None:
      time.sleep(1)
      cpu, now = cpu_seconds(proc.pid), time.perf_counter()
      if cpu is not None and cpu > last_cpu + 0.05:
        last_cpu, last_change = cpu, now
      if now - last_change > idle_s:
        error = f"hung: no CPU used for {idle_s:.0f} s (after {last_cpu:.1f} CPU s, {now - t0:.0f} s wall); killed"
      elif now - t0 > timeout_s:
        error = f"timed out after {timeout_s:.0f} s; killed"
      if error:
        proc.kill()
        proc.wait()
        break
    out.seek(0)
    err.seek(0)
    stdout, stderr = out.read(), err.read()
  row = dict(child_s=time.perf_counter() - t0)
  if error:
    return row | dict(error=error, stderr=stderr[-3000:])
  lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
  if not lines:
    return row | dict(error=f"child exited {proc.returncode} without a result", stderr=stderr[-3000:])
  return json.loads(lines[-1][len("RESULT "):]) | row


def plot(rows, meta, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for solver in sorted({r["solver"] for r in rows}, key=SOLVERS.index):
    pts = [r for r in rows if r["solver"] == solver and r["devices"] is not None and "error" not in r]
    base = next((r for r in rows if r["solver"] == solver and r["devices"] is None and "error" not in r), None)
    if not pts or base is None:
      continue
    ns = [r["n_devices"] for r in pts]
    axes[0].plot(ns, [r["step_s"] / base["step_s"] for r in pts], "o-", label=solver)
    axes[1].plot(ns, [r["ru_maxrss_mib"] for r in pts], "o-", label=solver)
  for ax, label in zip(axes, ["s/step relative to devices=None", "child peak RSS (MiB)"]):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("simulated CPU devices")
    ax.set_ylabel(label)
    ax.legend(fontsize=7)
  _common.save_figure(fig, f"distill split over simulated devices; {meta['cpu']} x{meta['cpus_usable']}, "
                           f"jax {meta['jax']}, {meta['date']}, load {meta['load_average']}", path)


def main():
  parser = _common.argument_parser(__doc__)
  parser.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=SOLVERS)
  parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
  parser.add_argument("--timed_chunks", type=int, default=3, help="chunks timed after the first (compiling) one")
  parser.add_argument("--unroll_steps", type=int, default=None,
                      help="the unrolled solver's T (default: the class default, 200)")
  parser.add_argument("--timeout", type=float, default=240, help="seconds before a child is killed as too slow")
  parser.add_argument("--idle", type=float, default=30, help="seconds without CPU use before a child is killed as hung")
  parser.add_argument("--quick", action="store_true", help="penalty only, 1 and 2 devices, 1 timed chunk")
  parser.add_argument("--child", type=str, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    return child(json.loads(args.child))
  if args.quick:
    args.solvers, args.devices, args.timed_chunks = ["penalty"], [1, 2], 1
  meta = _common.machine() | dict(
      benchmark="devices", n_distill=N_DISTILL, n_hidden=N_HIDDEN, batch_size=BATCH, pool_size=POOL,
      timed_chunks=args.timed_chunks, log_every=LOG_EVERY, unroll_steps=args.unroll_steps, dataset="mnist",
      child_timeout_s=args.timeout, child_idle_s=args.idle,
      method="one child per (solver, device count) with XLA_FLAGS=--xla_force_host_platform_device_count=N; "
             "compile = first chunk's wall_time, s/step = median later chunk wall_time / log_every, "
             "RSS = child's ru_maxrss; max |dD| against the devices=None child's images")
  meta["contended"] = _common.contended(meta)
  print(_common.header(meta), flush=True)

  rows = []
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    for solver in args.solvers:
      options = dict(unroll_steps=args.unroll_steps) if solver == "unrolled" and args.unroll_steps else {}
      base_images = None
      for devices in [None] + args.devices:
        n = devices or 1
        images_path = str(pathlib.Path(tmp) / f"{solver}_{devices}.npy")
        config = dict(data_dir=args.data_dir, solver=solver, devices=devices, options=options,
                      log_every=LOG_EVERY[solver], timed_chunks=args.timed_chunks, images_path=images_path)
        row = dict(solver=solver, devices=devices, n_devices=n, options=options) | run_child(config, n, args.timeout, args.idle)
        if "error" not in row:
          images = np.load(images_path)
          if devices is None:
            base_images = images
          elif base_images is not None:
            row["max_abs_diff"] = float(np.max(np.abs(images - base_images)))
        rows.append(row)
        brief = {k: v for k, v in row.items() if k not in ("traceback", "stderr", "step_s_all", "callback_gaps_s",
                                                           "solver_options")}
        print(json.dumps(brief), f"[{time.perf_counter() - start:.0f} s]", flush=True)

  def label(r):
    return "None (baseline)" if r["devices"] is None else str(r["devices"])

  print(_common.markdown_table(
      ["solver", "devices", "compile (s)", "s/step", "peak RSS (MiB)", "max |dD| vs 1 device", "notes"],
      [[r["solver"], label(r), r.get("compile_s"), r.get("step_s"), r.get("ru_maxrss_mib"), r.get("max_abs_diff"),
        r.get("error", "")] for r in rows]))
  print(f"total {time.perf_counter() - start:.0f} s")
  json_path, png_path = _common.output_paths("devices", args.quick)
  _common.write_json(json_path, meta, rows, total_s=time.perf_counter() - start)
  plot(rows, meta, png_path)


if __name__ == "__main__":
  main()
