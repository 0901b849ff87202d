"""The library side of ``experiments/distill.py``: distil, evaluate, write figures and report."""

from __future__ import annotations

import ast
import json
import math
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from udd_jax import _validation, reporting
from udd_jax.bilevel.solvers import SOLVERS
from udd_jax.data.loading import load_dataset, resolve_data_dir
from udd_jax.data.preprocessing import PREPROCESSING_METHODS
from udd_jax.distill import DEFAULT_SOLVER, INITS, distill
from udd_jax.evaluation.protocol import BASELINES, evaluate
from udd_jax.inner import INNER_LOSSES

JOINT_SOLVERS = ("penalty", "value_function")


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
      out[key] = _validation.check_choice(value, "transfer inner loss", INNER_LOSSES)
  return out


def check_run_args(
    *, dataset: Any, workdir: Any, n_distill: Any, n_hidden: Any, data_dir: Any = None, inner: Any = "ae",
    solver: Any = None, steps: Any = None, seed: Any = 0, batch_size: Any = 2048, init: Any = "real",
    preprocessing: Any = "none", eval_every: Any = 0, eval_seeds: Any = 1, log_every: Any = 10,
    checkpoint_every: Any = 50, baselines: Sequence[str] = (),
) -> None:
  """Checks :func:`run`'s arguments (the flags of ``experiments/distill.py``) before any data is loaded.

  Raises:
    ValueError / TypeError: naming the argument and the problem.
    FileNotFoundError: ``data_dir`` given but not an existing directory.
  """
  if not isinstance(dataset, str) or not dataset.strip(","):
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
  for name, value in (("seed", seed), ("eval_every", eval_every), ("eval_seeds", eval_seeds)):
    _validation.check_non_negative_int(value, name)
  _validation.check_choice(solver or DEFAULT_SOLVER, "solver", SOLVERS)
  _validation.check_choice(inner, "inner loss", INNER_LOSSES)
  _validation.check_choice(init, "init", INITS)
  _validation.check_choice(preprocessing, "preprocessing", PREPROCESSING_METHODS)
  for b in baselines:
    _validation.check_choice(b, "baseline", BASELINES)
  if data_dir is not None:
    resolve_data_dir(data_dir)


def _load_tasks(names: Sequence[str], data_dir: str | None):
  """Loads each dataset; later ones are resized to the first one's image shape (USPS to 28x28)."""
  from udd_jax.data.preprocessing import resize_images

  splits = [load_dataset(n, data_dir=data_dir) for n in names]
  shape = splits[0][0][0].shape[1:3]
  out = []
  for (xtr, ytr), (xte, yte) in splits:
    if xtr.shape[1:3] != shape:
      xtr, xte = resize_images(xtr, shape), resize_images(xte, shape)
    out.append(((xtr, ytr), (xte, yte)))
  return out


def run(
    *,
    dataset: str,
    workdir: str,
    n_distill: int,
    n_hidden: int,
    data_dir: str | None = None,
    inner: str = "ae",
    solver: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 2048,
    init: str = "real",
    preprocessing: str = "none",
    eval_every: int = 100,
    eval_seeds: int = 5,
    baselines: Sequence[str] = BASELINES,
    transfer: Sequence[str] = (),
    options: dict[str, Any] | None = None,
    progress: bool = True,
    log_every: int = 10,
    checkpoint_every: int = 50,
) -> dict[str, Any]:
  """Runs one distillation end to end and writes its artifacts into ``workdir``.

  ``dataset`` may name several datasets separated by commas: they become tasks sharing
  one D (resized to the first one's image size), and D is evaluated on each.
  ``eval_seeds=0`` skips the final evaluation (no ``evaluation.json``; the report has no table).

  Files: ``config.json``, ``metrics.jsonl``, ``checkpoint.npz`` (resumable),
  ``distilled.npz`` (images, preprocessing, config with the inner recipe),
  ``distilled.png``, ``filters.png``, ``curves.png``, ``evaluation.json`` and ``report.md``.

  Every argument is checked (:func:`check_run_args`) before any data is loaded.

  Returns:
    A summary dict (honest accuracy, joint accuracy, wall times, paths).
  """
  check_run_args(
      dataset=dataset, workdir=workdir, n_distill=n_distill, n_hidden=n_hidden, data_dir=data_dir, inner=inner,
      solver=solver, steps=steps, seed=seed, batch_size=batch_size, init=init, preprocessing=preprocessing,
      eval_every=eval_every, eval_seeds=eval_seeds, log_every=log_every, checkpoint_every=checkpoint_every,
      baselines=baselines,
  )
  transfers = [parse_transfer(t) for t in transfer]
  names = [n.strip() for n in dataset.split(",") if n.strip()]
  if not names:
    raise ValueError("dataset is empty: give a name, or several separated by commas.")
  splits = _load_tasks(names, data_dir)
  solver = solver or DEFAULT_SOLVER
  workdir_path = pathlib.Path(workdir)
  (x_train, y_train), (x_test, y_test) = splits[0]
  t0 = time.perf_counter()
  inputs = (x_train, y_train) if len(splits) == 1 else ([train for train, _ in splits], None)
  result = distill(
      *inputs, n_distill=n_distill, n_hidden=n_hidden, inner=inner, solver=solver, steps=steps,
      seed=seed, workdir=workdir_path, batch_size=batch_size, init=init, preprocessing=preprocessing,
      eval_every=eval_every, eval_data=(x_train, y_train, x_test, y_test) if eval_every else None,
      progress=progress, log_every=log_every, checkpoint_every=checkpoint_every, **(options or {}),
  )
  distill_seconds = time.perf_counter() - t0
  t1 = time.perf_counter()
  report = None
  for j, (name, (train, test)) in enumerate(zip(names, splits) if eval_seeds else ()):
    part = evaluate(
        result.images, train, test, n_hidden=n_hidden, inner=inner, recipe=result.recipe,
        seeds=eval_seeds, preprocessing=result.preprocessing,
        baselines=baselines if j == 0 else tuple(b for b in baselines if b in ("raw_pixels", "random_w")),
        joint_params=result.params if solver in JOINT_SOLVERS else None,
    )
    for t in transfers:
      other = evaluate(
          result.images, train, test, n_hidden=t.get("n_hidden", n_hidden), inner=t.get("inner", inner),
          recipe=result.recipe, recipe_n_hidden=n_hidden, seeds=eval_seeds, preprocessing=result.preprocessing, baselines=(),
      )
      for row in other.rows:
        row.name = f"transfer to K={t.get('n_hidden', n_hidden)}, {t.get('inner', inner)}: {row.name}"
        part.rows.append(row)
    if len(names) > 1:
      for row in part.rows:
        row.name = f"{name}: {row.name}"
    if report is None:
      report = part
    else:
      report.rows.extend(part.rows)
  eval_seconds = time.perf_counter() - t1

  image_shape = result.images.shape[1:]
  reporting.image_grid(result.images, workdir_path / "distilled.png", title=f"distilled set ({solver}, {dataset})")
  if result.preprocessing.method == "none" and len(image_shape) == 2:
    reporting.filter_grid(np.asarray(result.params.W), image_shape, workdir_path / "filters.png")
  reporting.training_curves(result.history, workdir_path / "curves.png")
  summary = dict(
      dataset=dataset, solver=solver, n_distill=n_distill, n_hidden=n_hidden, inner=inner,
      honest_accuracy=None, honest_std=None, distill_seconds=distill_seconds, eval_seconds=eval_seconds, joint_accuracy=None,
  )
  if report is None:
    table = "No final evaluation (eval_seeds=0)."
  else:
    table = str(report)
    honest = report.rows[0]  # D, converged learner with the standard recipe: the headline
    summary.update(honest_accuracy=honest.mean, honest_std=honest.std,
                   joint_accuracy=next((r.mean for r in report.rows if r.name.startswith("jointly")), None))
    (workdir_path / "evaluation.json").write_text(json.dumps(report.to_dict() | dict(summary=summary), indent=1))
  notes = [
      f"distillation took {distill_seconds:.0f} s ({result.config['steps']} outer steps), evaluation {eval_seconds:.0f} s.",
      "honest = learners re-trained from fresh random inits on D alone, with the standard recipe (to convergence) and "
      "with D's own recipe; the probe is a converged multinomial logistic regression on the features of all training "
      "images, raw (the headline) and standardised.",
  ]
  reporting.write_report(workdir_path / "report.md", title=f"{dataset}: |D| = {n_distill}, K = {n_hidden}, {inner}, {solver}",
                         config=result.config, table=table, notes=notes)
  print(table)
  honest_text = "no final evaluation" if report is None else f"honest accuracy {100 * honest.mean:.2f} +- {100 * honest.std:.2f}%"
  print(f"\n{honest_text} | distillation {distill_seconds:.0f} s | report: {workdir_path / 'report.md'}")
  return summary


def compare_solvers(
    *,
    dataset: str,
    workdir: str,
    n_distill: int,
    n_hidden: int,
    budget_seconds: float,
    solvers: Sequence[str] = ("penalty", "value_function", "implicit", "unrolled", "pool"),
    data_dir: str | None = None,
    inner: str = "ae",
    eval_seeds: int = 3,
    seed: int = 0,
    options: dict[str, dict[str, Any]] | None = None,
) -> str:
  """Every solver on the same wall-time budget: one table and one figure.

  Each solver distils for ``budget_seconds`` (probing its honest accuracy along the way),
  then is evaluated with ``eval_seeds`` fresh learners. Writes ``comparison.md``,
  ``comparison.png`` and ``comparison.json`` into ``workdir``; returns the table.
  """
  import matplotlib.pyplot as plt

  check_run_args(dataset=dataset, workdir=workdir, n_distill=n_distill, n_hidden=n_hidden, data_dir=data_dir,
                 inner=inner, seed=seed, eval_seeds=eval_seeds)
  _validation.check_positive_float(budget_seconds, "budget_seconds")
  if not solvers:
    raise ValueError("solvers is empty; name at least one of " + ", ".join(sorted(SOLVERS)) + ".")
  for name in solvers:
    _validation.check_choice(name, "solver", SOLVERS)
  if eval_seeds == 0:
    raise ValueError("eval_seeds must be a positive integer for a comparison; got 0.")

  (x_train, y_train), (x_test, y_test) = load_dataset(dataset, data_dir=data_dir)
  root = pathlib.Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  lines = [
      "| solver | outer steps | distillation (s) | converged learner, standard recipe (%) | D's recipe (%) | "
      "solver's own w (%) | D's recipe |",
      "|---|---|---|---|---|---|---|",
  ]
  curves, rows = {}, []
  for name in solvers:
    result = distill(
        x_train, y_train, n_distill=n_distill, n_hidden=n_hidden, inner=inner, solver=name, steps=10**9, seed=seed,
        workdir=root / name, max_seconds=budget_seconds, eval_every=0, eval_every_seconds=budget_seconds / 6,
        eval_data=(x_train, y_train, x_test, y_test), progress=False, **(options or {}).get(name, {}),
    )
    report = evaluate(
        result.images, (x_train, y_train), (x_test, y_test), n_hidden=n_hidden, inner=inner, recipe=result.recipe,
        seeds=eval_seeds, preprocessing=result.preprocessing, baselines=(), joint_params=result.params,
    )
    by_recipe = {r.recipe: r for r in report.rows if r.name == "distilled D"}
    standard, own = by_recipe["standard"], by_recipe.get("D's recipe", by_recipe["standard"])
    joint = next(r for r in report.rows if r.name.startswith("jointly"))
    lines.append(
        f"| {name} | {result.history[-1]['step']} | {result.history[-1]['wall_time']:.0f} | "
        f"{100 * standard.mean:.2f} +- {100 * standard.std:.2f} | {100 * own.mean:.2f} +- {100 * own.std:.2f} | "
        f"{100 * joint.mean:.2f} | {result.recipe.describe()} |"
    )
    curves[name] = [(h["wall_time"], h["honest_accuracy"]) for h in result.history if "honest_accuracy" in h]
    rows.append(dict(solver=name, history=result.history, evaluation=report.to_dict()))
  table = "\n".join(lines)
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, points in curves.items():
    if points:
      ax.plot(*zip(*points), marker="o", label=name)
  ax.set_xlabel("wall time (s)")
  ax.set_ylabel("converged learner on D (probe: 1 learner, 10k/10k)")
  ax.set_title(f"{dataset}, |D| = {n_distill}, K = {n_hidden}, {inner}")
  ax.legend()
  fig.tight_layout()
  fig.savefig(root / "comparison.png", dpi=90)
  plt.close(fig)
  (root / "comparison.md").write_text(table + "\n")
  (root / "comparison.json").write_text(json.dumps(rows))
  print(table)
  return table


def seed_table(
    *,
    dataset: str,
    workdir: str,
    n_distill: int,
    n_hidden: int,
    points: Sequence[int],
    data_dir: str | None = None,
    diversity: float = 0.1,
    options: dict[str, Any] | None = None,
) -> str:
  """The seed's table in form: penalty, penalty + diversity and OVR at a few points of training.

  Columns: the accuracy of the jointly learned w (the seed's figure), the honest accuracy
  (a fresh learner re-trained on D with the recipe) and ``||D - AE(D)||`` under the joint w.
  """
  check_run_args(dataset=dataset, workdir=workdir, n_distill=n_distill, n_hidden=n_hidden, data_dir=data_dir)
  if not points:
    raise ValueError("points is empty; give the steps at which to report, e.g. 1,100,200.")
  for step in points:
    _validation.check_positive_int(step, "points")
  _validation.check_positive_float(diversity, "diversity", allow_zero=True)
  (x_train, y_train), (x_test, y_test) = load_dataset(dataset, data_dir=data_dir)
  root = pathlib.Path(workdir)
  variants = [("quadratic penalty", "penalty", {}), ("penalty + diversity", "penalty", dict(diversity=diversity)),
              ("optimal value reformulation", "value_function", {})]
  lines = ["| method | step | joint w accuracy (%) | honest accuracy (%) | mean \\|\\|D - AE(D)\\|\\| |", "|---|---|---|---|---|"]
  chunk = math.gcd(*points)  # every reporting point is then the end of a chunk
  for label, solver, extra in variants:
    history = []
    for target in sorted(points):
      result = distill(
          x_train, y_train, n_distill=n_distill, n_hidden=n_hidden, solver=solver, steps=target, workdir=root / label.replace(" ", "_"),
          log_every=chunk, checkpoint_every=chunk, eval_every=10**9,
          eval_data=(x_train, y_train, x_test, y_test), progress=False, **(options or {}) | extra,
      )
      history = result.history
      last = history[-1]
      lines.append(f"| {label} | {last['step']} | {100 * last['current_w_accuracy']:.1f} | "
                   f"{100 * last['honest_accuracy']:.1f} | {last['d_minus_ae_d']:.3g} |")
  table = "\n".join(lines)
  (root / "seed_table.md").write_text(table + "\n")
  print(table)
  return table
