"""The library side of ``experiments/distill.py``: distil, evaluate, write figures and report."""

from __future__ import annotations

import ast
import json
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from udd_jax import _validation, reporting
from udd_jax.data.loading import load_dataset
from udd_jax.distill import DEFAULT_SOLVER, distill
from udd_jax.evaluation.protocol import BASELINES, evaluate

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
    out[key] = int(value) if key == "n_hidden" else value
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
    batch_size: int = 256,
    init: str = "real",
    preprocessing: str = "none",
    eval_every: int = 100,
    eval_seeds: int = 5,
    baselines: Sequence[str] = BASELINES,
    transfer: Sequence[str] = (),
    options: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
  """Runs one distillation end to end and writes its artifacts into ``workdir``.

  Files: ``config.json``, ``metrics.jsonl``, ``checkpoint.npz`` (resumable),
  ``distilled.npz`` (images, preprocessing, config with the inner recipe),
  ``distilled.png``, ``filters.png``, ``curves.png``, ``evaluation.json`` and ``report.md``.

  Returns:
    A summary dict (honest accuracy, joint accuracy, wall times, paths).
  """
  for b in baselines:
    _validation.check_choice(b, "baseline", BASELINES)
  transfers = [parse_transfer(t) for t in transfer]
  (x_train, y_train), (x_test, y_test) = load_dataset(dataset, data_dir=data_dir)
  solver = solver or DEFAULT_SOLVER
  workdir_path = pathlib.Path(workdir)
  t0 = time.perf_counter()
  result = distill(
      x_train, y_train, n_distill=n_distill, n_hidden=n_hidden, inner=inner, solver=solver, steps=steps,
      seed=seed, workdir=workdir_path, batch_size=batch_size, init=init, preprocessing=preprocessing,
      eval_every=eval_every, eval_data=(x_train, y_train, x_test, y_test) if eval_every else None,
      progress=progress, **(options or {}),
  )
  distill_seconds = time.perf_counter() - t0
  t1 = time.perf_counter()
  report = evaluate(
      result.images, (x_train, y_train), (x_test, y_test), n_hidden=n_hidden, inner=inner, recipe=result.recipe,
      seeds=eval_seeds, preprocessing=result.preprocessing, baselines=baselines,
      joint_params=result.params if solver in JOINT_SOLVERS else None,
  )
  for t in transfers:
    other = evaluate(
        result.images, (x_train, y_train), (x_test, y_test), n_hidden=t.get("n_hidden", n_hidden),
        inner=t.get("inner", inner), recipe=result.recipe, seeds=eval_seeds, preprocessing=result.preprocessing,
        baselines=(), convergence_factor=10,
    )
    for row in other.rows:
      row.name = f"transfer to K={t.get('n_hidden', n_hidden)}, {t.get('inner', inner)}: {row.name}"
      report.rows.append(row)
  eval_seconds = time.perf_counter() - t1

  image_shape = result.images.shape[1:]
  reporting.image_grid(result.images, workdir_path / "distilled.png", title=f"distilled set ({solver}, {dataset})")
  if result.preprocessing.method == "none" and len(image_shape) == 2:
    reporting.filter_grid(np.asarray(result.params.W), image_shape, workdir_path / "filters.png")
  reporting.training_curves(result.history, workdir_path / "curves.png")
  table = report.to_markdown()
  honest = report.rows[0]
  summary = dict(
      dataset=dataset, solver=solver, n_distill=n_distill, n_hidden=n_hidden, inner=inner,
      honest_accuracy=honest.mean, honest_std=honest.std, distill_seconds=distill_seconds, eval_seconds=eval_seconds,
      joint_accuracy=next((r.mean for r in report.rows if r.name.startswith("jointly")), None),
  )
  (workdir_path / "evaluation.json").write_text(json.dumps(report.to_dict() | dict(summary=summary), indent=1))
  notes = [
      f"distillation took {distill_seconds:.0f} s ({result.config['steps']} outer steps), evaluation {eval_seconds:.0f} s.",
      "honest = a learner re-trained from fresh random inits on D alone with the recipe; the probe is a converged "
      "multinomial logistic regression on standardised features of all training images.",
  ]
  reporting.write_report(workdir_path / "report.md", title=f"{dataset}: |D| = {n_distill}, K = {n_hidden}, {inner}, {solver}",
                         config=result.config, table=table, notes=notes)
  print(table)
  print(f"\nhonest accuracy {100 * honest.mean:.2f} +- {100 * honest.std:.2f}% | distillation {distill_seconds:.0f} s | "
        f"report: {workdir_path / 'report.md'}")
  return summary
