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
from udd_jax.driver.arguments import DEFAULT_SOLVER, PROBLEM_OPTIONS, ProblemConfig, RunConfig, as_solver, check_arguments, group_options
from udd_jax.driver.build import build
from udd_jax.driver.probe import make_honest_probe
from udd_jax.driver.result import DistillResult
from udd_jax.sharding import make_layout
from udd_jax.training.recipes import Recipe


# The honest probe's stream of the run's key (the run itself splits the key three ways).
PROBE_STREAM = 0x9B0BE


def distill(x: Any, y: Any = None, *, n_distill: int, problem: ProblemConfig | dict[str, Any] | None = None,
            solver: Any = DEFAULT_SOLVER, run: RunConfig | dict[str, Any] | None = None,
            recipe: Recipe | dict[str, Any] | None = None, workdir: str | os.PathLike | None = None,
            eval_data: tuple[Any, Any, Any, Any] | None = None,
            callback: Callable[[int, dict[str, float]], None] | None = None, devices: Any = None,
            prior: Any = None, **options: Any) -> DistillResult:
  """Distils real labelled data into ``n_distill`` unlabeled points for an unsupervised learner.

  The settings come in three groups: the problem (:class:`ProblemConfig`: the learner and
  the heads), the solver (a name, an instance or its config dict, with its own options) and
  the run (:class:`RunConfig`: steps, seed, data handling, logging, budget). Give a group
  whole (``problem=ProblemConfig(n_hidden=128)``) or its fields as keyword arguments
  (``n_hidden=128``); any other keyword is an option of the solver (``mu=10``,
  ``image_lr=0.05``, ``pool_size=16``, ``image_basis="pca:64"``: D optimised in the
  coefficients of the real inputs' top 64 principal directions, docs/SOLVERS.md). ``distill(x, y, **distill_arguments(config))``
  replays a run from its ``config.json``.

  Args:
    x: real inputs (n, ...) of order one (e.g. pixels in [0, 1]); or, with ``y=None``, a list of
      ``(x, y)`` pairs, one per dataset (tasks on datasets of one input shape). Raw 0-255
      pixels are refused unless ``preprocessing`` rescales them.
    y: integer labels (n,) with two classes or more, or a list of label arrays (tasks on the same ``x``).
    n_distill: size of the distilled set.
    problem: a :class:`ProblemConfig` (or its fields as keywords: ``n_hidden`` is required,
      ``inner``, ``head``, ``head_l2``, ``sigma2``, ``noise_std``, ``init_scale``).
    solver: a name in ``udd_jax.bilevel.SOLVERS`` (its class's defaults), a solver instance,
      or a solver's config dict (``solver.to_config()``).
    run: a :class:`RunConfig` (or its fields as keywords: ``steps``, ``seed``, ``batch_size``,
      ``init``, ``preprocessing``, ``clip_images``, ``log_every``, ``checkpoint_every``,
      ``eval_every``, ``eval_every_seconds``, ``max_seconds``, ``progress``).
    recipe: the inner recipe to ship with D for solvers that do not have one of their own.
    workdir: if given, the run writes ``config.json``, ``metrics.jsonl``, ``checkpoint.npz`` (atomically,
      at step 0 and every ``checkpoint_every`` steps; a rerun resumes from it) and ``distilled.npz``
      there; SIGINT / SIGTERM then stop the run after a checkpoint (docs/ERRORS.md).
    eval_data: ``(x_train, y_train, x_test, y_test)`` for the honest probe of ``eval_every``.
    callback: called as ``callback(step, metrics)`` after each logged chunk.
    devices: where the run works: None (one device, the default), a device count, a list of
      jax devices or a one-axis ``jax.sharding.Mesh``. The pool solver splits its learners
      across them (``pool_size`` a multiple of their number), every other solver the real
      batch (``batch_size`` likewise); the results agree with one device's to float
      round-off, and a checkpoint resumes on any number of devices (docs/SCALING.md).
    prior: a learned image prior (an :class:`~udd_jax.inner.prior.ImagePrior` from
      :func:`udd_jax.fit_prior`, or the path of a saved one), with the solver option
      ``prior_weight=lam > 0``: every solver adds ``-lam * mean_i log p(d_i)`` to its outer
      objective (docs/METHOD.md section 2.6). It is data, not a setting: the config records its
      fingerprint, and a replay (:func:`distill_arguments`) must pass it again. Needs
      ``preprocessing="none"``.
    **options: fields of ``problem`` and ``run``, and the solver's options.

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
    >>> grouped = udd_jax.distill(x, y, n_distill=10, problem=udd_jax.ProblemConfig(n_hidden=8),
    ...                           run=udd_jax.RunConfig(steps=10, progress=False))
    >>> bool((grouped.images == result.images).all())
    True
  """
  problem, run_config, options = group_options(problem, run, options)
  solver = as_solver(solver)
  problem_options = {k: getattr(problem, k) for k in PROBLEM_OPTIONS}
  settings = check_arguments(
      x, y, n_distill=n_distill, n_hidden=problem.n_hidden, inner=problem.inner, solver=solver, steps=run_config.steps,
      seed=run_config.seed, batch_size=run_config.batch_size, init=run_config.init,
      preprocessing=run_config.preprocessing, recipe=recipe, log_every=run_config.log_every,
      checkpoint_every=run_config.checkpoint_every, eval_every=run_config.eval_every, eval_data=eval_data,
      progress=run_config.progress, callback=callback, max_seconds=run_config.max_seconds,
      eval_every_seconds=run_config.eval_every_seconds,
      options=options | problem_options | dict(clip_images=run_config.clip_images), prior=prior)
  layout = make_layout(devices)
  run = build(settings, layout)
  workdir = loop.check_workdir(pathlib.Path(workdir)) if workdir is not None else None
  state, history = run.state, []
  if workdir is not None:
    state, history = loop.resume(workdir, run.config, state)
    io.atomic_write_text(workdir / "config.json", json.dumps(run.config, indent=1))
    if not (workdir / "checkpoint.npz").is_file():  # a run that diverges at once still leaves its last good state
      loop.save_checkpoint(workdir, state, history)
  probe = None
  if (settings.eval_every or settings.eval_every_seconds) and eval_data is not None:
    honest = make_honest_probe(eval_data, run.prep, run.problem, run.n_classes[0], settings.solver,
                               settings.init_scale, settings.recipe, jax.random.fold_in(settings.key, PROBE_STREAM))
    probe = honest if layout is None else lambda st: honest(io.host_tree(st))
  # The chunk donates the state's buffers; solver states may alias one array twice (the
  # value function starts w' at w), so give every leaf its own buffer first.
  state, history = loop.run_loop(run, workdir, run.place(jax.tree.map(jnp.copy, state)), history, probe)
  result = run.result(state, history)
  if workdir is not None:
    result.save(workdir / "distilled.npz")
  return result
