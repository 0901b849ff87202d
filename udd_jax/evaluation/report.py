"""The table an evaluation prints: one :class:`Row` per learner or baseline, in an :class:`EvaluationReport`."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from udd_jax.training.recipes import Recipe


@dataclasses.dataclass
class Row:
  """One line of an evaluation table.

  ``accuracies`` are the headline probe's (logistic head on the raw features),
  ``accuracies_standardized`` the same head on standardised features; ``recipe`` says
  which recipe trained the learner (``"standard"``, ``"D's recipe"``, or ``""`` when no
  learner was trained on a set).
  """

  name: str
  accuracies: list[float]
  inner_loss: float | None = None
  grad_norm: float | None = None
  note: str = ""
  accuracies_standardized: list[float] | None = None
  recipe: str = ""
  steps: float | None = None

  @property
  def mean(self) -> float:
    """Mean accuracy; NaN for a row whose learner diverged (no accuracies)."""
    return float(np.mean(self.accuracies)) if self.accuracies else float("nan")

  @property
  def std(self) -> float:
    return float(np.std(self.accuracies)) if len(self.accuracies) > 1 else 0.0


def _format_accuracy(accs: list[float] | None) -> str:
  if accs is None:
    return ""
  if not accs:
    return "diverged"
  return f"{100 * np.mean(accs):.2f} +- {100 * np.std(accs):.2f}" if len(accs) > 1 else f"{100 * np.mean(accs):.2f}"


@dataclasses.dataclass
class EvaluationReport:
  """Test accuracies of a distilled set and its baselines; prints as a markdown table."""

  rows: list[Row]
  settings: dict[str, Any]

  def __getitem__(self, name: str) -> Row:
    for row in self.rows:
      if row.name == name:
        return row
    raise KeyError(f"no row {name!r}; rows are {[r.name for r in self.rows]}")

  def to_markdown(self) -> str:
    lines = [
        "| features from | learner recipe | test accuracy, raw features (%) | standardised features (%) | seeds "
        "| inner steps | final inner loss | inner grad norm | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in self.rows:
      loss = "" if r.inner_loss is None else f"{r.inner_loss:.4g}"
      gnorm = "" if r.grad_norm is None else f"{r.grad_norm:.2g}"
      steps = "" if r.steps is None else f"{r.steps:.0f}"
      std_text = "diverged" if not r.accuracies and r.recipe else _format_accuracy(r.accuracies_standardized)
      lines.append(f"| {r.name} | {r.recipe} | {_format_accuracy(r.accuracies)} | {std_text} "
                   f"| {len(r.accuracies)} | {steps} | {loss} | {gnorm} | {r.note} |")
    return "\n".join(lines)

  def comparisons(self) -> list[dict[str, Any]]:
    """D's headline row against each baseline of its task: the difference and whether it exceeds the seeds' spread.

    The headline is a task's ``distilled D`` row with the standard recipe; its baselines are
    the task's rows that did not re-train a learner on D (raw pixels, random W, subsets,
    k-means, full data, supervised). A difference counts when it exceeds the spread
    ``sqrt(std_D^2 + std_baseline^2)`` of the two rows' seeds (population std over seeds; a
    one-seed row has none). A row without accuracies (diverged) is left out.
    """
    out = []
    for head in self.rows:
      prefix, found, _ = head.name.rpartition("distilled D")
      if not found or head.name != prefix + "distilled D" or head.recipe != "standard" or not head.accuracies:
        continue
      if prefix.startswith("transfer"):
        continue
      for other in self.rows:
        if not other.name.startswith(prefix) or "distilled D" in other.name or not other.accuracies:
          continue
        if other.name[len(prefix):].startswith(("jointly", "transfer")) or other.recipe == "D's recipe":
          continue
        difference = head.mean - other.mean
        spread = float(np.hypot(head.std, other.std))
        out.append(dict(task=prefix.rstrip(": "), baseline=other.name[len(prefix):], recipe=other.recipe,
                        difference=difference, spread=spread, exceeds=abs(difference) > spread,
                        distilled=head.mean, other=other.mean))
    return out

  def verdict_markdown(self) -> str:
    """One line per baseline: D above, below or level with it, in points, against the seeds' spread."""
    lines = []
    n_test = self.settings.get("n_test")
    if n_test:
      lines.append(f"Test set: {n_test} images (one image = {100 / n_test:.2g} points).")
    for c in self.comparisons():
      where = f" ({c['task']})" if c["task"] else ""
      recipe = f", {c['recipe']} recipe" if c["recipe"] else ""
      if c["exceeds"]:
        word = "above" if c["difference"] > 0 else "below"
        judgement = f"{word} it, by more than the seeds' spread ({100 * c['spread']:.2f})"
      else:
        judgement = f"level with it: within the seeds' spread ({100 * c['spread']:.2f})"
      lines.append(f"- D{where} against {c['baseline']}{recipe}: {100 * c['difference']:+.2f} points "
                   f"({100 * c['distilled']:.2f} vs {100 * c['other']:.2f}), {judgement}.")
    return "\n".join(lines)

  def recipes_markdown(self) -> str:
    """Which recipe is which: the settings of the standard recipe and of D's own."""
    return "\n".join(f"- {name}: {Recipe.from_config(cfg).describe()}" for name, cfg in self.settings["recipes"].items())

  def cache_markdown(self) -> str:
    """Which baseline rows were read from the baseline cache (empty when none were)."""
    cache = self.settings.get("baseline_cache") or {}
    if not cache.get("rows_from_cache"):
      return ""
    return (f"Baseline rows read from the cache in {cache['directory']} (stored by an earlier evaluation in the same "
            f"setting, the same numbers): {', '.join(cache['rows_from_cache'])}.")

  def __str__(self) -> str:
    parts = [self.to_markdown(), self.recipes_markdown(), self.verdict_markdown(), self.cache_markdown()]
    return "\n\n".join(p for p in parts if p)

  def to_dict(self) -> dict[str, Any]:
    return dict(settings=self.settings, rows=[dataclasses.asdict(r) | dict(mean=r.mean, std=r.std) for r in self.rows])
