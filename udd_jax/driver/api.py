"""``distill``: check the arguments, build the run, resume it, run its chunks, return the set."""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from udd_jax import io
from udd_jax.driver import loop
from udd_jax.driver.arguments import DEFAULT_SOLVER, check_arguments
from udd_jax.driver.build import build
from udd_jax.driver.probe import make_honest_probe
from udd_jax.driver.result import DistillResult
from udd_jax.inner.learners import InnerLearner
from udd_jax.training.recipes import Recipe


def distill(x: Any, y: Any = None, *, n_distill: int, n_hidden: int, inner: str | InnerLearner = "ae", solver: Any = DEFAULT_SOLVER,
            steps: int | None = None, seed: int | jax.Array = 0, workdir: str | os.PathLike | None = None,
            batch_size: int = 2048, init: str = "real", preprocessing: str = "none",
            recipe: Recipe | dict[str, Any] | None = None, log_every: int = 10, checkpoint_every: int = 50,
            eval_every: int = 0, eval_data: tuple[Any, Any, Any, Any] | None = None, progress: bool = True,
            callback: Callable[[int, dict[str, float]], None] | None = None, max_seconds: float | None = None,
            eval_every_seconds: float | None = None, **options: Any) -> DistillResult:
  """Distils real labelled data into ``n_distill`` unlabeled points for an unsupervised learner.

  Args:
    x: real inputs (n, ...) of order one (e.g. pixels in [0, 1]); or, with ``y=None``, a list of
      ``(x, y)`` pairs, one per dataset (tasks on datasets of one input shape). Raw 0-255
      pixels are refused unless ``preprocessing`` rescales them.
    y: integer labels (n,) with two classes or more, or a list of them (tasks on the same ``x``).
    n_distill: size of the distilled set.
    n_hidden: hidden units K of the GRBM / tied autoencoder.
    inner: ``"ae"``, ``"score_matching"`` or ``"denoising_score_matching"``, or an
      :class:`~udd_jax.inner.learners.InnerLearner` (the config records its ``name``).
    solver: a name in ``udd_jax.bilevel.SOLVERS`` (its class's defaults) or a solver instance.
    steps: outer steps (default: the solver's ``default_steps``).
    seed: PRNG seed or key of the run (evaluation uses other, fresh seeds).
    workdir: if given, the run writes ``config.json``, ``metrics.jsonl``, ``checkpoint.npz`` (atomically,
      at step 0 and every ``checkpoint_every`` steps; a rerun resumes from it) and ``distilled.npz``
      there; SIGINT / SIGTERM then stop the run after a checkpoint (docs/ERRORS.md).
    batch_size: real examples per task per step.
    init: initial D: ``"real"`` images, ``"kmeans"`` centroids or ``"random"`` noise.
    preprocessing: ``"none"``, ``"standardize"`` or ``"zca"`` (fitted on task 0's inputs).
    recipe: the inner recipe to ship with D for solvers that do not have one of their own.
    log_every: steps per jitted chunk and per metrics line.
    checkpoint_every: steps between checkpoints (rounded up to a multiple of ``log_every``).
    eval_every: log the honest accuracy on ``eval_data = (x_train, y_train, x_test, y_test)`` this often.
    progress: print one line per ``log_every`` steps with rate and ETA.
    callback: called as ``callback(step, metrics)`` after each logged chunk.
    max_seconds: stop (and save) once this much wall time has been spent in this call.
    eval_every_seconds: also probe (needs ``eval_data``) each time this much more wall time has passed.
    **options: ``head``, ``head_l2``, ``sigma2``, ``noise_std``, ``init_scale`` for the
      problem; ``image_lr`` / ``model_lr`` as shorthands for Adam with that step size, and
      ``lr_schedule`` (``"constant"`` or ``"cosine"`` to zero over ``steps``); ``clip_images=True``
      projects D onto the real inputs' value range after every step; anything else
      is an option of the solver (e.g. ``mu``, ``unroll_steps``).

  Returns:
    A :class:`DistillResult`.

  Raises:
    ValueError, TypeError: bad input, before anything is compiled (docs/ERRORS.md).
    FloatingPointError: a non-finite metric or state; with a workdir, the last good
      checkpoint stays and ``distilled.npz`` is written from it.
    KeyboardInterrupt, SystemExit: SIGINT, SIGTERM (code 143) with a workdir, after a checkpoint.

  Examples:
    >>> import udd_jax
    >>> (x, y), _ = udd_jax.load_dataset("digits")
    >>> result = udd_jax.distill(x, y, n_distill=10, n_hidden=8, steps=10, progress=False)
    >>> result.images.shape, result.config["solver"]
    ((10, 8, 8), 'pool')
  """
  settings = check_arguments(
      x, y, n_distill=n_distill, n_hidden=n_hidden, inner=inner, solver=solver, steps=steps, seed=seed,
      batch_size=batch_size, init=init, preprocessing=preprocessing, recipe=recipe, log_every=log_every,
      checkpoint_every=checkpoint_every, eval_every=eval_every, eval_data=eval_data, progress=progress,
      callback=callback, max_seconds=max_seconds, eval_every_seconds=eval_every_seconds, options=options)
  run = build(settings)
  workdir = loop.check_workdir(pathlib.Path(workdir)) if workdir is not None else None
  state, history = run.state, []
  if workdir is not None:
    state, history = loop.resume(workdir, run.config, state)
    io.atomic_write_text(workdir / "config.json", json.dumps(run.config, indent=1))
    if not (workdir / "checkpoint.npz").is_file():  # a run that diverges at once still leaves its last good state
      loop.save_checkpoint(workdir, state, history)
  probe = None
  if (settings.eval_every or settings.eval_every_seconds) and eval_data is not None:
    probe = make_honest_probe(eval_data, run.prep, run.problem, run.n_classes[0], settings.solver,
                              settings.init_scale, settings.recipe)
  # The chunk donates the state's buffers; solver states may alias one array twice (the
  # value function starts w' at w), so give every leaf its own buffer first.
  state, history = loop.run_loop(run, workdir, jax.tree.map(jnp.copy, state), history, probe)
  result = run.result(state, history)
  if workdir is not None:
    result.save(workdir / "distilled.npz")
  return result
