"""The registry of supervised distillation methods: name -> how a run calls it.

``DISTILLERS[name]`` is a :class:`Method`: the ``distill_*`` function and which of the
run's settings it takes (its network and width, the preprocessing record, a workdir for
files of its own). :func:`udd_jax.supervised.experiment.run` dispatches through it; a new
method is one entry here.

Examples:
  >>> sorted(DISTILLERS)
  ['dc', 'dd', 'dm', 'dsa', 'gtn', 'kip', 'mtt']
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np

from udd_jax.supervised import base, dc, dd, dm, experts, gtn, kip, mtt
from udd_jax.supervised.result import SupervisedResult


def distill_mtt_with_experts(
    x: np.ndarray, y: np.ndarray, *, seed: Any, workdir: pathlib.Path, network: str, width: int, **options: Any
) -> SupervisedResult:
  """MTT with its experts: trains the missing ones first (resumable: ``expert_dir`` may be shared by
  runs on the same data), then distils. Options ``expert_<name>`` go to ``train_experts`` (its
  ``<name>``, e.g. ``expert_n_experts``, ``expert_epochs``); the experts use the seed ``seed + 1``
  (``fold_in(key, 1)`` for a PRNG key)."""
  expert_dir = pathlib.Path(options.pop("expert_dir", workdir / "experts"))
  expert_options = {k[len("expert_"):]: options.pop(k) for k in list(options) if k.startswith("expert_")}
  expert_options.setdefault("n_experts", 3)
  expert_options.setdefault("epochs", 5)
  experts.train_experts(x, y, workdir=expert_dir, seed=base.derived_key(seed, 1), network=network, width=width,
                        **expert_options)
  return mtt.distill_mtt(x, y, expert_dir=expert_dir, seed=seed, **options)


@dataclasses.dataclass(frozen=True)
class Method:
  """A distillation method as :func:`udd_jax.supervised.experiment.run` calls it.

  Attributes:
    distill: ``distill(x, y, *, ipc, seed, max_seconds, callback, [iterations], **options)``.
    network: it takes the run's ``network`` and ``width``.
    preprocessing: it records the run's preprocessing (``preprocessing=``).
    workdir: it keeps files of its own in the run's workdir (``workdir=``).
    checkpoint: it saves its progress and resumes (``checkpoint=``, :class:`base.Checkpoint`).
  """

  distill: Callable[..., SupervisedResult]
  network: bool = False
  preprocessing: bool = False
  workdir: bool = False
  checkpoint: bool = False


DISTILLERS: dict[str, Method] = {
    "dd": Method(dd.distill_dd, network=True, checkpoint=True),
    "dc": Method(dc.distill_dc, network=True, preprocessing=True, checkpoint=True),
    "dsa": Method(functools.partial(dc.distill_dc, dsa=True), network=True, preprocessing=True, checkpoint=True),
    "dm": Method(dm.distill_dm, network=True, preprocessing=True, checkpoint=True),
    "mtt": Method(distill_mtt_with_experts, network=True, workdir=True, checkpoint=True),
    "kip": Method(kip.distill_kip, checkpoint=True),
    "gtn": Method(gtn.distill_gtn, checkpoint=True),
}
