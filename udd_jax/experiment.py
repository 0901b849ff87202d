"""The library side of the apps in ``experiments/``: distil, evaluate, write figures and report.

:func:`run` is ``experiments/distill.py``; :func:`compare_solvers` and :func:`seed_table`
are the apps of the same names. Each checks every argument before any data is loaded.
"""

from __future__ import annotations

import ast
import json
import math
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from udd_jax import _validation, io, reporting
from udd_jax.bilevel.solvers import SOLVERS
from udd_jax.data.loading import BUILTIN_DATASETS, load_dataset, resolve_data_dir  # noqa: F401 (the apps' choices)
from udd_jax.data.preprocessing import PREPROCESSING_METHODS, resize_images
from udd_jax.driver import DEFAULT_SOLVER, INITS, config_differences, distill
from udd_jax.driver.arguments import LR_SCHEDULES, solver_and_options
from udd_jax.evaluation import BASELINES, evaluate
from udd_jax.inner import LEARNERS, load_prior, naturalness
from udd_jax.sharding import is_primary

JOINT_SOLVERS = ("penalty", "value_function")
RUN_FILE = "run.json"  # written last by run(): the request and summary of a finished run
# What a finished run may be asked again with (more steps, other logging or evaluation); else a new workdir.
RESUMABLE_SETTINGS = ("steps", "max_seconds", "eval_every", "log_every", "checkpoint_every", "eval_seeds", "baselines",
                      "transfer")


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
  """Parses ``key=value`` strings; values are Python literals where they parse, else strings.

  Examples:
    >>> parse_options(["mu=10", "learn_step_size=False", "inner_optimizer=adam"])
    {'mu': 10, 'learn_step_size': False, 'inner_optimizer': 'adam'}
  """
  options = {}
  for pair in pairs:
    if "=" not in pair:
      raise ValueError(f"option {pair!r} must be key=value.")
    key, value = pair.split("=", 1)
    try:
      options[key.strip()] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      options[key.strip()] = value
  return options


def parse_transfer(spec: str) -> dict[str, Any]:
  """``"K=256,inner=score_matching"`` -> ``{"n_hidden": 256, "inner": "score_matching"}``."""
  out: dict[str, Any] = {}
  for part in spec.replace(";", ",").split(","):
    if not part:
      continue
    key, _, value = part.partition("=")
    key = {"K": "n_hidden", "k": "n_hidden"}.get(key, key)
    if key not in ("n_hidden", "inner"):
      raise ValueError(f"transfer option {key!r} unknown; use K=<int> and/or inner=<loss>.")
    if key == "n_hidden":
      if not value.strip().isdigit() or int(value) <= 0:
        raise ValueError(f"transfer K must be a positive integer; got {value!r} in {spec!r}.")
      out[key] = int(value)
    else:
      out[key] = _validation.check_choice(value, "transfer inner loss", LEARNERS)
  return out


def default_steps(solver: str) -> int:
  """The outer steps a solver runs when ``steps`` is not given (its class's ``default_steps``)."""
  return SOLVERS[_validation.check_choice(solver, "solver", SOLVERS)].default_steps


def check_options(solver: str, options: Mapping[str, Any], steps: int | None = None) -> None:
  """Refuses, before any data is loaded, the options ``distill`` would refuse (the driver's own check).

  An unknown name raises a TypeError listing the solver's options and the problem options.
  """
  if not isinstance(options, Mapping):
    raise TypeError(f"options must be a dict of solver or problem options; got {type(options).__name__}.")
  solver_and_options(solver, steps or default_steps(solver), dict(options))


def check_run_args(
    *, dataset: Any, workdir: Any, n_distill: Any, n_hidden: Any, data_dir: Any = None, inner: Any = "ae",
    solver: Any = None, steps: Any = None, seed: Any = 0, batch_size: Any = 2048, init: Any = "real",
    preprocessing: Any = "none", eval_every: Any = 0, eval_seeds: Any = 1, log_every: Any = 10,
    checkpoint_every: Any = 50, baselines: Sequence[str] = (), options: Mapping[str, Any] | None = None,
) -> Any:
  """Checks :func:`run`'s arguments (the flags of ``experiments/distill.py``) before any data is loaded.

  Returns:
    The seed's JSON record (the int seed, or a key's data): ``seed`` may be an int or a PRNG key.

  Raises:
    ValueError / TypeError: naming the argument and the problem.
    FileNotFoundError: ``data_dir`` given but not an existing directory.
  """
  if not isinstance(dataset, str) or not dataset.replace(",", "").strip():
    raise ValueError(f"dataset must name a dataset, or several separated by commas; got {dataset!r}.")
  if not isinstance(workdir, (str, pathlib.Path)) or not str(workdir):
    raise ValueError(f"workdir must be a directory path; got {workdir!r}.")
  if pathlib.Path(workdir).exists() and not pathlib.Path(workdir).is_dir():
    raise ValueError(f"workdir {str(workdir)!r} exists and is not a directory.")
  for name, value in (("n_distill", n_distill), ("n_hidden", n_hidden), ("batch_size", batch_size),
                      ("log_every", log_every), ("checkpoint_every", checkpoint_every)):
    _validation.check_positive_int(value, name)
  if steps is not None:
    _validation.check_positive_int(steps, "steps")
  _, seed_record = _validation.as_key(seed, "seed")
  for name, value in (("eval_every", eval_every), ("eval_seeds", eval_seeds)):
    _validation.check_non_negative_int(value, name)
  _validation.check_choice(solver or DEFAULT_SOLVER, "solver", SOLVERS)
  _validation.check_choice(inner, "inner loss", LEARNERS)
  _validation.check_choice(init, "init", INITS)
  _validation.check_choice(preprocessing, "preprocessing", PREPROCESSING_METHODS)
  for b in baselines:
    _validation.check_choice(b, "baseline", BASELINES)
  check_options(solver or DEFAULT_SOLVER, options or {}, steps)
  if data_dir is not None:
    resolve_data_dir(data_dir)
  return seed_record


def _load_tasks(names: Sequence[str], data_dir: str | None):
  """Loads each dataset; later ones are resized to the first one's image shape (USPS to 28x28)."""
  splits = [load_dataset(n, data_dir=data_dir) for n in names]
  shape = splits[0][0][0].shape[1:3]
  out = []
  for (xtr, ytr), (xte, yte) in splits:
    if xtr.shape[1:3] != shape:
      xtr, xte = resize_images(xtr, shape), resize_images(xte, shape)
    out.append(((xtr, ytr), (xte, yte)))
  return out


def _with_lr_schedule(options: Mapping[str, Any] | None, lr_schedule: str | None) -> dict[str, Any]:
  options = dict(options or {})
  if lr_schedule is not None:
    if options.get("lr_schedule", lr_schedule) != lr_schedule:
      raise ValueError(f"lr_schedule={lr_schedule!r} and the option lr_schedule={options['lr_schedule']!r} disagree.")
    options["lr_schedule"] = _validation.check_choice(lr_schedule, "lr_schedule", LR_SCHEDULES)
  return options


def _as_json(value: Any) -> Any:
  """``value`` after a JSON round trip, or None where it holds what JSON cannot (an optax transformation)."""
  try:
    return json.loads(json.dumps(value))
  except TypeError:
    return None


def finished_run(workdir: str | pathlib.Path, request: Mapping[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
  """The saved summary of the finished run in ``workdir`` and how ``request`` differs from it.

  Returns ``(None, [])`` where no run finished there (no ``run.json`` or ``report.md``), or
  where either request holds a value JSON cannot hold (e.g. an optax transformation given from
  Python): such runs are compared by the driver only, as before.

  Raises:
    ValueError: ``request`` changes a setting outside :data:`RESUMABLE_SETTINGS` (naming each one).
  """
  path = pathlib.Path(workdir)
  if not (path / RUN_FILE).is_file() or not (path / "report.md").is_file():
    return None, []
  saved, request = json.loads((path / RUN_FILE).read_text()), _as_json(request)
  if saved["request"] is None or request is None:
    return None, []
  changed = config_differences(saved["request"], request, ignore=())
  fixed = [line for line in changed if line.split(":")[0].split(".")[0] not in RESUMABLE_SETTINGS]
  if fixed:
    raise ValueError(f"{path} holds a finished run with another configuration ({'; '.join(fixed)}); use a new workdir "
                     f"(a finished run may be asked again only with other {', '.join(RESUMABLE_SETTINGS)}).")
  return saved["summary"], changed


def _evaluate_tasks(result, names, splits, *, n_hidden, inner, n_seeds, baselines, transfers, joint, devices,
                    progress, baseline_cache):
  """D on each task (every baseline on the first, only raw pixels and random W on the others), with transfer rows."""
  report, from_cache = None, []
  for j, (name, (train, test)) in enumerate(zip(names, splits)):
    part = evaluate(
        result.images, train, test, n_hidden=n_hidden, inner=inner, recipe=result.recipe, n_seeds=n_seeds,
        preprocessing=result.preprocessing, joint_params=result.params if joint else None,
        baselines=baselines if j == 0 else tuple(b for b in baselines if b in ("raw_pixels", "random_w")),
        devices=devices, progress=progress, baseline_cache=baseline_cache,
    )
    for t in transfers:
      k, loss = t.get("n_hidden", n_hidden), t.get("inner", inner)
      other = evaluate(result.images, train, test, n_hidden=k, inner=loss, recipe=result.recipe, recipe_n_hidden=n_hidden,
                       n_seeds=n_seeds, preprocessing=result.preprocessing, baselines=(), devices=devices,
                       progress=progress)
      for row in other.rows:
        row.name = f"transfer to K={k}, {loss}: {row.name}"
        part.rows.append(row)
    for row in part.rows if len(names) > 1 else ():
      row.name = f"{name}: {row.name}"
    hits = part.settings.get("baseline_cache", {}).get("rows_from_cache", [])
    from_cache += [f"{name}: {b}" for b in hits] if len(names) > 1 else hits
    if report is None:
      report = part
    else:
      report.rows.extend(part.rows)
  if report is not None and "baseline_cache" in report.settings:  # the first task's record, naming every task's hits
    report.settings["baseline_cache"]["rows_from_cache"] = from_cache
  return report


def run_devices(devices: int | None, eval_seeds: int) -> int | None:
  """The ``devices`` argument of the run's ``distill`` and ``evaluate`` from the app's ``--devices``.

  None: one device, or every device when several processes run; 0: every device JAX sees;
  N: the first N.

  Raises:
    ValueError: a negative count, or ``eval_seeds`` that the devices do not divide (the
      evaluation splits its seeds across them).
  """
  if devices is None and jax.process_count() > 1 or devices == 0:
    devices = jax.device_count()
  if devices is None:
    return None
  _validation.check_positive_int(devices, "devices")
  if eval_seeds % devices:
    raise ValueError(f"eval_seeds ({eval_seeds}) must be a multiple of the number of devices ({devices}): the "
                     "evaluation splits its seeds across them.")
  return devices


def run(
    *, dataset: str, workdir: str, n_distill: int, n_hidden: int, data_dir: str | None = None, inner: str = "ae",
    solver: str | None = None, steps: int | None = None, seed: Any = 0, batch_size: int = 2048, init: str = "real",
    preprocessing: str = "none", eval_every: int = 100, eval_seeds: int = 5, baselines: Sequence[str] = BASELINES,
    transfer: Sequence[str] = (), options: dict[str, Any] | None = None, lr_schedule: str | None = None,
    progress: bool = True, log_every: int = 10, checkpoint_every: int = 50, max_seconds: float | None = None,
    rerun_evaluation: bool = False, devices: int | None = None, baseline_cache: str | None = None,
    prior: str | None = None,
) -> dict[str, Any]:
  """Runs one distillation end to end and writes its artifacts into ``workdir``.

  ``prior`` is the path of a saved image prior (``experiments/fit_prior.py``): with the
  solver option ``prior_weight > 0`` the distillation adds it to its outer objective, and in
  any case the summary holds D's naturalness under it (:func:`udd_jax.naturalness` against
  the test images).

  ``devices`` is how many devices the distillation and the evaluation split their work
  over (:func:`run_devices`; docs/SCALING.md); in a multi-process run only process 0
  writes files and prints the report.

  ``dataset`` may name several datasets separated by commas: they become tasks sharing
  one D (resized to the first one's image size), and D is evaluated on each.
  ``eval_seeds=0`` skips the final evaluation (no ``evaluation.json``; the report has no table).
  ``seed`` is an int or a PRNG key; ``lr_schedule`` is the option of that name.
  ``baseline_cache`` is a directory that keeps the baseline rows of the evaluation
  (:func:`udd_jax.evaluate`'s option; the app's default is
  :func:`udd_jax.evaluation.cache.default_cache_dir`); None or ``""`` computes them every
  time. A multi-process run computes them (the processes do not share one cache).

  Files: ``config.json``, ``metrics.jsonl``, ``checkpoint.npz`` (resumable),
  ``distilled.npz`` (images, preprocessing, config with the inner recipe),
  ``distilled.png``, ``filters.png``, ``curves.png``, ``evaluation.json``, ``report.md`` and,
  last, ``run.json`` (the request and summary). Asked again with the same settings, a
  finished run prints its saved report and recomputes nothing, unless ``rerun_evaluation``.

  Every argument is checked (:func:`check_run_args`) before any data is loaded.

  Returns:
    A summary dict (honest accuracy, joint accuracy, wall times, paths).
  """
  options = _with_lr_schedule(options, lr_schedule)
  seed_record = check_run_args(
      dataset=dataset, workdir=workdir, n_distill=n_distill, n_hidden=n_hidden, data_dir=data_dir, inner=inner,
      solver=solver, steps=steps, seed=seed, batch_size=batch_size, init=init, preprocessing=preprocessing,
      eval_every=eval_every, eval_seeds=eval_seeds, log_every=log_every, checkpoint_every=checkpoint_every,
      baselines=baselines, options=options,
  )
  transfers = [parse_transfer(t) for t in transfer]
  devices = run_devices(devices, eval_seeds)
  image_prior = load_prior(prior) if prior else None
  if (options or {}).get("prior_weight") and image_prior is None:
    raise ValueError("--opt prior_weight needs --prior (the path of a saved prior, from experiments/fit_prior.py).")
  names = [n.strip() for n in dataset.split(",") if n.strip()]
  solver = solver or DEFAULT_SOLVER
  request = dict(dataset=",".join(names), n_distill=n_distill, n_hidden=n_hidden, inner=inner, solver=solver,
                 steps=steps or default_steps(solver), seed=seed_record, batch_size=batch_size, init=init,
                 preprocessing=preprocessing, options=options, max_seconds=max_seconds, eval_every=eval_every,
                 log_every=log_every, checkpoint_every=checkpoint_every, eval_seeds=eval_seeds,
                 baselines=list(baselines), transfer=list(transfer))
  if image_prior is not None:
    request["prior"] = image_prior.record()
  workdir_path = pathlib.Path(workdir)
  saved, changed = finished_run(workdir_path, request)
  if saved is not None and not changed and not rerun_evaluation:
    print((workdir_path / "report.md").read_text() + f"\n{workdir_path} holds a finished run of this configuration: its "
          "saved report is above, nothing was recomputed (--rerun_evaluation evaluates it again).")
    return saved
  if changed:
    print(f"{workdir_path} holds a finished run; changed since: {'; '.join(changed)}. Resuming it.", flush=True)
  splits = _load_tasks(names, data_dir)
  (x_train, y_train), (x_test, y_test) = splits[0]
  t0 = time.perf_counter()
  inputs = (x_train, y_train) if len(splits) == 1 else ([train for train, _ in splits], None)
  result = distill(
      *inputs, n_distill=n_distill, n_hidden=n_hidden, inner=inner, solver=solver, steps=steps, seed=seed,
      workdir=workdir_path, batch_size=batch_size, init=init, preprocessing=preprocessing, eval_every=eval_every,
      eval_data=(x_train, y_train, x_test, y_test) if eval_every else None, progress=progress, log_every=log_every,
      checkpoint_every=checkpoint_every, max_seconds=max_seconds, devices=devices,
      prior=image_prior if (options or {}).get("prior_weight") else None, **(options or {}),
  )
  # A finished run asked again (more steps, another evaluation) adds this call's distillation to its own.
  distill_seconds = time.perf_counter() - t0 + (saved.get("distill_seconds") or 0.0 if saved is not None else 0.0)
  t1 = time.perf_counter()
  report = _evaluate_tasks(result, names, splits if eval_seeds else [], n_hidden=n_hidden, inner=inner,
                           n_seeds=eval_seeds, baselines=baselines, transfers=transfers, joint=solver in JOINT_SOLVERS,
                           devices=devices, progress=progress,
                           baseline_cache=(baseline_cache or None) if jax.process_count() == 1 else None)
  summary = dict(dataset=dataset, solver=solver, n_distill=n_distill, n_hidden=n_hidden, inner=inner,
                 honest_accuracy=None, honest_std=None, distill_seconds=distill_seconds,
                 eval_seconds=time.perf_counter() - t1, joint_accuracy=None)
  if report is not None:
    honest = report.rows[0]  # D, converged learner with the standard recipe: the headline
    summary.update(honest_accuracy=honest.mean, honest_std=honest.std,
                   joint_accuracy=next((r.mean for r in report.rows if r.name.startswith("jointly")), None))
  if image_prior is not None:
    summary["naturalness"] = naturalness(result.images.reshape(n_distill, -1), image_prior,
                                         np.asarray(x_test, np.float32).reshape(len(x_test), -1))
  if not is_primary():  # the other processes of a multi-process run write nothing
    return summary
  title = f"{dataset}: |D| = {n_distill}, K = {n_hidden}, {inner}, {solver}"
  table = reporting.write_run_files(workdir_path, result, report, summary, title=title,
                                    image_title=f"distilled set ({solver}, {dataset})")
  io.atomic_write_text(workdir_path / RUN_FILE, json.dumps(dict(request=_as_json(request), summary=summary), indent=1))
  print(f"# {title}\n\n{table}")
  honest_text = "no final evaluation" if report is None else f"honest accuracy {100 * honest.mean:.2f} +- {100 * honest.std:.2f}%"
  print(f"\n{honest_text} | distillation {distill_seconds:.0f} s | report: {workdir_path / 'report.md'}")
  if image_prior is not None:
    nat = summary["naturalness"]
    print(f"naturalness: mean log p(D) {nat['mean_log_p']:.1f} (real test images: quartiles {nat['real_log_p_q25']:.1f} / "
          f"{nat['real_log_p_q50']:.1f} / {nat['real_log_p_q75']:.1f}); nearest real image at {nat['nearest_real_distance']:.2f} "
          f"(real to real: {nat['real_nearest_distance']:.2f})")
  return summary


def compare_solvers(
    *, dataset: str, workdir: str, n_distill: int, n_hidden: int, budget_seconds: float,
    solvers: Sequence[str] = ("penalty", "value_function", "implicit", "unrolled", "pool"), data_dir: str | None = None,
    inner: str = "ae", eval_seeds: int = 3, seed: Any = 0, options: dict[str, dict[str, Any]] | None = None,
    devices: int | None = None,
) -> str:
  """Every solver on the same wall-time budget: one table and one figure.

  Each solver distils for ``budget_seconds`` (probing its honest accuracy along the way),
  then is evaluated with ``eval_seeds`` fresh learners. ``seed`` is an int or a PRNG key.
  Writes ``comparison.md``, ``comparison.png`` and ``comparison.json`` into ``workdir``
  (process 0 only, in a multi-process run); returns the table. ``devices`` as for :func:`run`.
  """
  check_run_args(dataset=dataset, workdir=workdir, n_distill=n_distill, n_hidden=n_hidden, data_dir=data_dir,
                 inner=inner, seed=seed, eval_seeds=eval_seeds)
  _validation.check_positive_float(budget_seconds, "budget_seconds")
  if not solvers:
    raise ValueError("solvers is empty; name at least one of " + ", ".join(sorted(SOLVERS)) + ".")
  for name in solvers:
    _validation.check_choice(name, "solver", SOLVERS)
    check_options(name, (options or {}).get(name, {}))
  if eval_seeds == 0:
    raise ValueError("eval_seeds must be a positive integer for a comparison; got 0.")
  devices = run_devices(devices, eval_seeds)

  (x_train, y_train), (x_test, y_test) = load_dataset(dataset, data_dir=data_dir)
  root = pathlib.Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  lines = list(reporting.COMPARISON_HEADER)
  curves, rows = {}, []
  for name in solvers:
    result = distill(
        x_train, y_train, n_distill=n_distill, n_hidden=n_hidden, inner=inner, solver=name, steps=10**9, seed=seed,
        workdir=root / name, max_seconds=budget_seconds, eval_every=0, eval_every_seconds=budget_seconds / 6,
        eval_data=(x_train, y_train, x_test, y_test), progress=False, devices=devices, **(options or {}).get(name, {}),
    )
    report = evaluate(
        result.images, (x_train, y_train), (x_test, y_test), n_hidden=n_hidden, inner=inner, recipe=result.recipe,
        n_seeds=eval_seeds, preprocessing=result.preprocessing, baselines=(), joint_params=result.params, devices=devices,
    )
    lines.append(reporting.comparison_line(name, result, report))
    curves[name] = [(h["wall_time"], h["honest_accuracy"]) for h in result.history if "honest_accuracy" in h]
    rows.append(dict(solver=name, history=result.history, evaluation=report.to_dict()))
  table = "\n".join(lines)
  if not is_primary():
    return table
  reporting.comparison_figure(curves, root / "comparison.png", title=f"{dataset}, |D| = {n_distill}, K = {n_hidden}, {inner}")
  (root / "comparison.md").write_text(table + "\n")
  (root / "comparison.json").write_text(json.dumps(rows))
  print(table)
  return table


def seed_table(
    *, dataset: str, workdir: str, n_distill: int, n_hidden: int, points: Sequence[int], data_dir: str | None = None,
    diversity: float = 0.1, options: dict[str, Any] | None = None,
) -> str:
  """The seed's table in form: penalty, penalty + diversity and OVR at a few points of training.

  Columns: the accuracy of the jointly learned w (the seed's figure), the honest accuracy
  (a fresh learner re-trained on D with the recipe) and ``||D - AE(D)||`` under the joint w.
  """
  check_run_args(dataset=dataset, workdir=workdir, n_distill=n_distill, n_hidden=n_hidden, data_dir=data_dir,
                 solver="penalty", options=options)
  if not points:
    raise ValueError("points is empty; give the steps at which to report, e.g. 1,100,200.")
  for step in points:
    _validation.check_positive_int(step, "points")
  _validation.check_positive_float(diversity, "diversity", allow_zero=True)
  check_options("value_function", options or {})
  (x_train, y_train), (x_test, y_test) = load_dataset(dataset, data_dir=data_dir)
  root = pathlib.Path(workdir)
  variants = [("quadratic penalty", "penalty", {}), ("penalty + diversity", "penalty", dict(diversity=diversity)),
              ("optimal value reformulation", "value_function", {})]
  lines = ["| method | step | joint w accuracy (%) | honest accuracy (%) | mean \\|\\|D - AE(D)\\|\\| |", "|---|---|---|---|---|"]
  chunk = math.gcd(*points)  # every reporting point is then the end of a chunk
  for label, solver, extra in variants:
    for target in sorted(points):
      result = distill(
          x_train, y_train, n_distill=n_distill, n_hidden=n_hidden, solver=solver, steps=target, workdir=root / label.replace(" ", "_"),
          log_every=chunk, checkpoint_every=chunk, eval_every=10**9,
          eval_data=(x_train, y_train, x_test, y_test), progress=False, **(options or {}) | extra,
      )
      last = result.history[-1]
      lines.append(f"| {label} | {last['step']} | {100 * last['current_w_accuracy']:.1f} | "
                   f"{100 * last['honest_accuracy']:.1f} | {last['d_minus_ae_d']:.3g} |")
  table = "\n".join(lines)
  (root / "seed_table.md").write_text(table + "\n")
  print(table)
  return table
