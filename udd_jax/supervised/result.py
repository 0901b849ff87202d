"""What every supervised distillation method returns: a labelled distilled set."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class SupervisedResult:
  """A labelled distilled set and how it was made.

  Attributes:
    images: ``(n, H, W, C)`` float32, in the networks' input space (after the run's
      preprocessing, recorded in ``config["preprocessing"]``).
    labels: ``(n,)`` integer class labels, or ``(n, n_classes)`` float targets where the
      method learns labels (KIP).
    config: JSON-serialisable: ``method``, ``ipc``, ``network``, the method's options,
      the budget spent (``iterations``, ``seconds``), ``preprocessing``, ``seed``.
    history: one dict of floats per logged iteration (``iteration``, ``loss``, ``seconds``, ...).
    step_sizes: learned step sizes shipped with the images (DD: one per unrolled step;
      MTT: the student's learning rate), or None.
  """

  images: np.ndarray
  labels: np.ndarray
  config: dict[str, Any]
  history: list[dict[str, float]] = dataclasses.field(default_factory=list)
  step_sizes: np.ndarray | None = None
