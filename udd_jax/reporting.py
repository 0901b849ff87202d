"""Figures and the markdown report of a distillation run (matplotlib, no display needed)."""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def image_grid(images: np.ndarray, path: str | pathlib.Path, *, title: str = "",
               clip: tuple[float, float] | None = (0.0, 1.0), colorbar: bool = False) -> None:
  """Saves a grid of grey images (N, H, W) on one grey scale.

  ``clip`` fixes the scale (values outside are clipped for display); None uses the images'
  own range, so nothing is clipped. ``colorbar`` adds the scale's bar.
  """
  images = np.asarray(images)
  if images.ndim == 2:
    side = int(math.isqrt(images.shape[1]))
    images = images.reshape(-1, side, side)
  n = images.shape[0]
  cols = int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.8 + (0.8 if colorbar else 0), rows * 0.8 + (0.4 if title else 0)),
                           squeeze=False)
  vmin, vmax = clip if clip is not None else (float(images.min()), float(images.max()))
  shown = None
  for i, ax in enumerate(axes.flat):
    ax.axis("off")
    if i < n:
      shown = ax.imshow(np.clip(images[i], vmin, vmax), cmap="gray", vmin=vmin, vmax=vmax)
  if colorbar and shown is not None:
    fig.colorbar(shown, ax=axes.ravel().tolist(), shrink=0.8)
  if title:
    fig.suptitle(title)
  fig.savefig(path, dpi=80, bbox_inches="tight")
  plt.close(fig)


def filter_grid(filters: np.ndarray, image_shape: Sequence[int], path: str | pathlib.Path, *, max_filters: int = 64) -> None:
  """Saves the first ``max_filters`` rows of ``filters`` (K, d) as images, each scaled to its own range."""
  w = np.asarray(filters)[:max_filters].reshape(-1, *image_shape)
  lo = w.min(axis=tuple(range(1, w.ndim)), keepdims=True)
  hi = w.max(axis=tuple(range(1, w.ndim)), keepdims=True)
  image_grid((w - lo) / np.maximum(hi - lo, 1e-12), path, title="filters w_k (each scaled to [0, 1])")


def training_curves(history: list[dict[str, float]], path: str | pathlib.Path) -> None:
  """Outer loss, inner gradient norm (or penalty) and honest accuracy against the outer step."""
  steps = [h["step"] for h in history]
  panels = [("outer_loss", "outer (task) loss"), ("inner_grad_norm", "inner gradient norm"), ("honest_accuracy", "honest accuracy (probe)")]
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
  for ax, (key, label) in zip(axes, panels):
    points = [(s, h[key]) for s, h in zip(steps, history) if key in h]
    if points:
      xs, ys = zip(*points)
      ax.plot(xs, ys, marker="." if len(points) < 30 else None,
              label="fresh learner on D, standard recipe (converged)" if key == "honest_accuracy" else None)
    if key == "honest_accuracy":
      own = [(s, h["recipe_accuracy"]) for s, h in zip(steps, history) if "recipe_accuracy" in h]
      if own:
        ax.plot(*zip(*own), marker=".", linestyle=":", label="fresh learner on D, D's recipe")
      joint = [(s, h["current_w_accuracy"]) for s, h in zip(steps, history) if "current_w_accuracy" in h]
      if joint:
        ax.plot(*zip(*joint), marker=".", linestyle="--", label="solver's current w")
        ax.legend(fontsize=7)
    if key == "inner_grad_norm" and points and min(ys) > 0:
      ax.set_yscale("log")
    ax.set_xlabel("outer step")
    ax.set_title(label)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def comparison_figure(curves: dict[str, list[tuple[float, float]]], path: str | pathlib.Path, *, title: str) -> None:
  """Honest accuracy (probe) against wall time, one line per solver."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, points in curves.items():
    if points:
      ax.plot(*zip(*points), marker="o", label=name)
  ax.set_xlabel("wall time (s)")
  ax.set_ylabel("converged learner on D (probe: 1 learner, 10k/10k)")
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


COMPARISON_HEADER = (
    "| solver | outer steps | distillation (s) | converged learner, standard recipe (%) | D's recipe (%) | "
    "solver's own w (%) | D's recipe |",
    "|---|---|---|---|---|---|---|",
)


def comparison_line(name: str, result: Any, report: Any) -> str:
  """One solver's row of :data:`COMPARISON_HEADER`'s table, from its ``DistillResult`` and ``EvaluationReport``."""
  by_recipe = {r.recipe: r for r in report.rows if r.name == "distilled D"}
  standard, own = by_recipe["standard"], by_recipe.get("D's recipe", by_recipe["standard"])
  joint = next(r for r in report.rows if r.name.startswith("jointly"))
  return (f"| {name} | {result.history[-1]['step']} | {result.history[-1]['wall_time']:.0f} | "
          f"{100 * standard.mean:.2f} +- {100 * standard.std:.2f} | {100 * own.mean:.2f} +- {100 * own.std:.2f} | "
          f"{100 * joint.mean:.2f} | {result.recipe.describe()} |")


def write_run_files(workdir: pathlib.Path, result: Any, report: Any, summary: dict[str, Any], *, title: str,
                    image_title: str) -> str:
  """Writes a run's figures, ``evaluation.json`` (when ``report`` is not None) and ``report.md``; returns the table.

  ``result`` is the run's ``DistillResult``, ``report`` its ``EvaluationReport`` or None (no final evaluation).
  """
  images = np.asarray(result.images)
  image_grid(images, workdir / "distilled.png", clip=None, colorbar=True,
             title=f"{image_title}\nin its own range [{images.min():.2g}, {images.max():.2g}] (nothing clipped)")
  image_shape = result.images.shape[1:]
  filters = result.learner.filters(result.params)
  if result.preprocessing.method == "none" and len(image_shape) == 2 and filters is not None:
    filter_grid(filters, image_shape, workdir / "filters.png")
  training_curves(result.history, workdir / "curves.png")
  if report is None:
    table = "No final evaluation (eval_seeds=0)."
  else:
    table = str(report)
    (workdir / "evaluation.json").write_text(json.dumps(report.to_dict() | dict(summary=summary), indent=1))
  notes = [
      f"distillation took {summary['distill_seconds']:.0f} s ({result.config['steps']} outer steps), evaluation "
      f"{summary['eval_seconds']:.0f} s.",
      "honest = learners re-trained from fresh random inits on D alone, with the standard recipe (to convergence) and "
      "with D's own recipe; the probe is a converged multinomial logistic regression on the features of all training "
      "images, raw (the headline) and standardised.",
  ]
  write_report(workdir / "report.md", title=title, config=result.config, table=table, notes=notes)
  return table


def write_report(path: str | pathlib.Path, *, title: str, config: dict[str, Any], table: str, notes: Sequence[str] = ()) -> None:
  """Writes the markdown report of a run: settings, the evaluation table, figures, notes."""
  recipe = dict(config.get("recipe", {}))
  lr = recipe.pop("inner_lr", None)
  recipe["inner_lr"] = f"{len(lr)} learned rates, mean {np.mean(lr):.4g}" if isinstance(lr, list) else lr
  lines = [
      f"# {title}",
      "",
      "## Settings",
      "",
      "```json",
      json.dumps({k: v for k, v in config.items() if k != "recipe"}, indent=1),
      "```",
      "",
      f"Inner recipe shipped with D: {recipe}",
      "",
      "## Evaluation",
      "",
      table,
      "",
      "## Figures",
      "",
      "![distilled set](distilled.png) ![filters](filters.png)",
      "",
      "![training curves](curves.png)",
      "",
  ]
  if notes:
    lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
  pathlib.Path(path).write_text("\n".join(lines))
