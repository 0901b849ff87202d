"""``udd_jax.distill``: the distillation driver, its result, and saving / loading it."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import pathlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import numpy as np
import optax

from udd_jax import _validation
from udd_jax.bilevel import problem as problem_lib
from udd_jax.bilevel import solvers as solvers_lib
from udd_jax.data.preprocessing import PREPROCESSING_METHODS, Preprocessing, fit_preprocessing
from udd_jax.evaluation import logistic, protocol
from udd_jax.inner.grbm import GRBMParams, score

FORMAT_VERSION = 1
DEFAULT_SOLVER = "pool"
INITS = ("real", "kmeans", "random")
# Options of distill() itself; everything else in **options goes to the solver.
PROBLEM_OPTIONS = ("head", "head_l2", "sigma2", "noise_std", "init_scale")
# Per-solver defaults that differ from the solver classes' own (the best found, see docs/RESULTS.md).
SOLVER_DEFAULTS: dict[str, dict[str, Any]] = {
    # Plain gradient steps (as in the original dataset distillation): D steers the size of every
    # update, where Adam normalises it away (95.2% vs 94.8% at |D| = 100, docs/RESULTS.md).
    "unrolled": dict(unroll_steps=200, inner_optimizer="sgd", inner_lr=0.02),
    # mu grows from 0.01 (task losses dominate) to 100 (w is driven to a stationary point of L_in on D).
    "penalty": dict(mu=solvers_lib.mu_schedule("geometric", 0.01, final=100.0, steps=2000)),
    "value_function": dict(mu=solvers_lib.mu_schedule("geometric", 0.01, final=100.0, steps=2000)),
}
DEFAULT_HEADS = {"unrolled": "ridge", "pool": "ridge"}
DEFAULT_STEPS = {"unrolled": 300, "pool": 500}  # outer steps by solver; 600 for the others
DEFAULT_IMAGE_LR = 1e-2  # every solver's default Adam step size on D
LR_SCHEDULES = ("constant", "cosine")  # of the image_lr / model_lr shorthands


@dataclasses.dataclass
class DistillResult:
  """A distilled set with everything needed to use, re-train from and reproduce it.

  Attributes:
    images: the distilled set, (n_distill, *image_shape), in the value space of the input ``x``.
    params: the inner parameters at the end of distillation (the jointly learned w for
      penalty / value function; the last inner solution otherwise).
    history: one dict of metrics per logged step.
    config: every setting of the run, with the inner recipe under ``inner_optimizer``,
      ``inner_lr``, ``inner_steps``, ``init_scale``.
    preprocessing: the map from value space to the learner's inputs.
  """

  images: np.ndarray
  params: GRBMParams
  history: list[dict[str, float]]
  config: dict[str, Any]
  preprocessing: Preprocessing

  @property
  def recipe(self) -> protocol.Recipe:
    """The inner recipe that re-trains a learner on :attr:`images`."""
    return protocol.Recipe.from_config(self.config)

  def save(self, path: str | os.PathLike) -> pathlib.Path:
    """Writes one ``.npz`` (no pickle), atomically: write to a temporary file, then rename."""
    path = pathlib.Path(path)
    arrays = {
        "format_version": np.asarray(FORMAT_VERSION),
        "library_version": np.asarray(_library_version()),
        "images": np.asarray(self.images),
        "params_W": np.asarray(self.params.W),
        "params_b": np.asarray(self.params.b),
        "params_a": np.asarray(self.params.a),
        "config": np.asarray(json.dumps(self.config)),
        "history": np.asarray(json.dumps(self.history)),
    }
    arrays.update({f"preprocessing_{k}": v for k, v in self.preprocessing.to_dict().items()})
    _atomic_savez(path, arrays)
    return path


def _library_version() -> str:
  from udd_jax import __version__

  return __version__


def _atomic_write(path: pathlib.Path, write: Callable[[Any], None]) -> None:
  """Writes ``path`` so that it is always either the old or the complete new file.

  ``write(f)`` fills a temporary file beside ``path`` (``<name>.tmp``, same directory, so
  the rename stays on one file system); it is flushed and fsynced, then renamed over
  ``path``. A kill at any moment leaves at worst a stray ``.tmp`` file, which readers
  ignore and the next write replaces.
  """
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  try:
    with open(tmp, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  with contextlib.suppress(OSError):  # make the rename itself durable (not possible on every OS)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


def _atomic_savez(path: pathlib.Path, arrays: dict[str, Any]) -> None:
  _atomic_write(path, lambda f: np.savez(f, **arrays))


def _atomic_write_text(path: pathlib.Path, text: str) -> None:
  _atomic_write(path, lambda f: f.write(text.encode()))


def load_distilled(path: str | os.PathLike) -> DistillResult:
  """Restores a :class:`DistillResult` written by :meth:`DistillResult.save`.

  Raises:
    FileNotFoundError: no such file.
    ValueError: truncated or corrupted file, a missing field, or an unknown format version.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no distilled set at {str(path)!r}.")
  try:
    with np.load(path, allow_pickle=False) as f:
      data = {k: f[k] for k in f.files}
  except Exception as e:
    raise ValueError(f"{path} is not a readable distilled set (truncated or corrupted?): {e}") from None
  if "format_version" not in data:
    raise ValueError(f"{path} is not a udd_jax distilled set: it has no format_version.")
  version = int(data["format_version"])
  if version != FORMAT_VERSION:
    raise ValueError(f"{path} has format version {version}; this udd_jax reads version {FORMAT_VERSION}.")
  missing = [k for k in ("images", "params_W", "params_b", "params_a", "config", "history") if k not in data]
  if missing:
    raise ValueError(f"{path} lacks the field(s) {missing}.")
  prep = {k[len("preprocessing_"):]: v for k, v in data.items() if k.startswith("preprocessing_")}
  try:
    history, config = json.loads(str(data["history"])), json.loads(str(data["config"]))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} has a corrupted config or history field: {e}") from None
  return DistillResult(
      images=data["images"],
      params=GRBMParams(data["params_W"], data["params_b"], data["params_a"]),
      history=history,
      config=config,
      preprocessing=Preprocessing.from_dict(prep),
  )


def _tasks_from_inputs(x: Any, y: Any) -> list[tuple[np.ndarray, np.ndarray]]:
  """Normalises the three ways of giving tasks into a list of (x, y) pairs."""
  if y is None:
    if not isinstance(x, (list, tuple)) or not x:
      raise ValueError("y is None: x must then be a non-empty list of (x, y) pairs, one per dataset.")
    pairs = list(x)
  elif isinstance(y, (list, tuple)):
    if not y:
      raise ValueError("y is an empty list: give at least one label array.")
    pairs = [(x, yj) for yj in y]
  else:
    pairs = [(x, y)]
  tasks = []
  for j, pair in enumerate(pairs):
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
      raise ValueError(f"task {j} must be an (x, y) pair.")
    xj = _validation.check_array(pair[0], f"x (task {j})", min_ndim=2)
    yj = _validation.check_labels(pair[1], f"y (task {j})", n=xj.shape[0])
    if tasks and xj.shape[1:] != tasks[0][0].shape[1:]:
      raise ValueError(f"x (task {j}) has inputs of shape {xj.shape[1:]}, task 0 has {tasks[0][0].shape[1:]}: resize them first.")
    tasks.append((xj.astype(np.float32) if xj.dtype != np.float32 else xj, yj))
  return tasks


def _initial_images(init: str, key: jax.Array, z: np.ndarray, n: int) -> jnp.ndarray:
  if init == "real":
    return jnp.asarray(z[np.asarray(jax.random.choice(key, z.shape[0], (n,), replace=False))])
  if init == "kmeans":
    return protocol.kmeans(key, jnp.asarray(z[:20000]), n)
  return jax.random.uniform(key, (n, z.shape[1]), jnp.float32, z.min(), z.max())


def _solver_recipe(solver: Any, state: solvers_lib.SolverState, recipe: protocol.Recipe | None, init_scale: float) -> protocol.Recipe:
  """The recipe D ships: the unrolled solver's own unroll, else the given one, else the standard recipe.

  Every solver but the unrolled one targets the learner at convergence (argmin_w L_in(w; D)),
  which is what the standard recipe trains.
  """
  if isinstance(solver, solvers_lib.Unrolled):
    lrs = tuple(float(v) for v in np.exp(np.asarray(state.extra)))
    return protocol.Recipe(solver.inner_optimizer, lrs, solver.unroll_steps, init_scale)
  if isinstance(solver, solvers_lib.Pool):  # its learners' own recipe, trained until convergence
    return protocol.Recipe(solver.inner_optimizer, solver.inner_lr, solver.lifetime, init_scale, until_converged=True)
  if recipe is not None:
    return recipe
  return dataclasses.replace(protocol.STANDARD_RECIPE, init_scale=init_scale)


def _flatten_state(state: solvers_lib.SolverState) -> dict[str, np.ndarray]:
  leaves = jax.tree.leaves(state)
  out = {}
  for i, leaf in enumerate(leaves):
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    out[f"leaf_{i:04d}"] = np.asarray(leaf)
  return out


def _unflatten_state(template: solvers_lib.SolverState, arrays: dict[str, np.ndarray]) -> solvers_lib.SolverState:
  leaves, treedef = jax.tree.flatten(template)
  if len(arrays) != len(leaves):
    raise ValueError(f"checkpoint has {len(arrays)} arrays, the run's state has {len(leaves)}: a different configuration.")
  restored = []
  for i, leaf in enumerate(leaves):
    value = arrays[f"leaf_{i:04d}"]
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      restored.append(jax.random.wrap_key_data(jnp.asarray(value)))
    else:
      if value.shape != leaf.shape:
        raise ValueError(f"checkpoint array {i} has shape {value.shape}, expected {leaf.shape}: a different configuration.")
      restored.append(jnp.asarray(value, leaf.dtype))
  return jax.tree.unflatten(treedef, restored)


class _Progress:
  """One line per report with rate and ETA (to stderr), e.g. ``step 120/500 | 3.1 it/s | ETA 2m03s``."""

  def __init__(self, total: int, start: int, enabled: bool):
    self.total, self.start, self.enabled = total, start, enabled
    self.t0 = time.perf_counter()

  def report(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    elapsed = time.perf_counter() - self.t0
    rate = (step - self.start) / max(elapsed, 1e-9)
    eta = (self.total - step) / max(rate, 1e-9)
    shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k in ("outer_loss", "inner_grad_norm", "penalty", "honest_accuracy", "recipe_accuracy"))
    print(f"step {step}/{self.total} | {rate:.2f} it/s | ETA {int(eta // 60)}m{int(eta % 60):02d}s | {shown}", file=sys.stderr, flush=True)


def distill(
    x: Any,
    y: Any = None,
    *,
    n_distill: int,
    n_hidden: int,
    inner: str = "ae",
    solver: str = DEFAULT_SOLVER,
    steps: int | None = None,
    seed: int = 0,
    workdir: str | os.PathLike | None = None,
    batch_size: int = 2048,
    init: str = "real",
    preprocessing: str = "none",
    recipe: protocol.Recipe | dict[str, Any] | None = None,
    log_every: int = 10,
    checkpoint_every: int = 50,
    eval_every: int = 0,
    eval_data: tuple[Any, Any, Any, Any] | None = None,
    progress: bool = True,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    max_seconds: float | None = None,
    eval_every_seconds: float | None = None,
    **options: Any,
) -> DistillResult:
  """Distils real labelled data into ``n_distill`` unlabeled points for an unsupervised learner.

  Args:
    x: real inputs (n, ...) in the user's value space; or, with ``y=None``, a list of
      ``(x, y)`` pairs, one per dataset (tasks on datasets of one input shape).
    y: integer labels (n,), or a list of label arrays (several tasks on the same ``x``).
    n_distill: size of the distilled set.
    n_hidden: hidden units K of the GRBM / tied autoencoder.
    inner: ``"ae"``, ``"score_matching"`` or ``"denoising_score_matching"``.
    solver: ``"pool"`` (default), ``"unrolled"``, ``"implicit"``, ``"penalty"`` or ``"value_function"``.
    steps: outer steps (default 500 for pool, 300 for unrolled, 600 for the other solvers).
    seed: PRNG seed of the run (evaluation uses other, fresh seeds).
    workdir: if given, the run writes ``config.json``, ``metrics.jsonl``, ``checkpoint.npz``
      (at step 0 and every ``checkpoint_every`` steps, atomically; a restarted run resumes
      from it) and ``distilled.npz`` there. SIGINT / SIGTERM then stop the run at the end
      of the current chunk, after a checkpoint (see docs/ERRORS.md).
    batch_size: real examples per task per step.
    init: initial D: ``"real"`` images, ``"kmeans"`` centroids or ``"random"`` noise.
    preprocessing: ``"none"``, ``"standardize"`` or ``"zca"`` (fitted on task 0's inputs).
    recipe: the inner recipe to ship with D for solvers that do not learn one (the
      unrolled solver's recipe is its own unroll: optimiser, learned step sizes, T).
    log_every: steps per jitted chunk and per metrics line.
    checkpoint_every: steps between checkpoints (rounded up to a multiple of ``log_every``).
    eval_every: if > 0 and ``eval_data = (x_train, y_train, x_test, y_test)`` is given, the
      honest accuracy (one fresh learner, recipe, logistic probe) is logged this often.
    progress: print one line per ``log_every`` steps with rate and ETA.
    callback: called as ``callback(step, metrics)`` after each logged chunk.
    max_seconds: stop (and save) once this much wall time has been spent in this call,
      even before ``steps``; for comparisons on a fixed time budget.
    eval_every_seconds: probe the honest accuracy (needs ``eval_data``) each time this much
      more wall time has passed, in addition to ``eval_every``.
    **options: ``head``, ``head_l2``, ``sigma2``, ``noise_std``, ``init_scale`` for the
      problem; ``image_lr`` / ``model_lr`` as shorthands for ``image_optimizer`` /
      ``model_optimizer = optax.adam(lr)``, and ``lr_schedule`` (``"constant"`` or
      ``"cosine"``: decay those step sizes to zero over ``steps``); anything else is an option of the solver
      (e.g. ``mu``, ``unroll_steps``).

  Returns:
    A :class:`DistillResult`.

  Raises:
    ValueError, TypeError: bad input, before anything is compiled (docs/ERRORS.md).
    FloatingPointError: a non-finite metric or state; with a workdir, the last good
      checkpoint stays and ``distilled.npz`` is written from it.
    KeyboardInterrupt, SystemExit: SIGINT, SIGTERM (code 143) with a workdir, after a checkpoint.
  """
  tasks = _tasks_from_inputs(x, y)
  n_distill = _validation.check_positive_int(n_distill, "n_distill")
  n_hidden = _validation.check_positive_int(n_hidden, "n_hidden")
  if steps is not None:
    steps = _validation.check_positive_int(steps, "steps")
  batch_size = _validation.check_positive_int(batch_size, "batch_size")
  log_every = _validation.check_positive_int(log_every, "log_every")
  checkpoint_every = _validation.check_positive_int(checkpoint_every, "checkpoint_every")
  _validation.check_choice(init, "init", INITS)
  _validation.check_choice(preprocessing, "preprocessing", PREPROCESSING_METHODS)
  solver_name = solver if isinstance(solver, str) else solver.name
  if steps is None:
    steps = DEFAULT_STEPS.get(solver_name, 600)
  _validation.check_choice(solver_name, "solver", solvers_lib.SOLVERS)
  if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
    raise ValueError(f"seed must be a non-negative integer; got {seed!r}.")
  if n_distill > tasks[0][0].shape[0] and init != "random":
    raise ValueError(f"n_distill={n_distill} exceeds the {tasks[0][0].shape[0]} real inputs to initialise from.")
  eval_every = _validation.check_non_negative_int(eval_every, "eval_every")
  for name, value in (("max_seconds", max_seconds), ("eval_every_seconds", eval_every_seconds)):
    if value is not None:
      _validation.check_positive_float(value, name)
  if (eval_every or eval_every_seconds) and eval_data is None:
    raise ValueError("eval_every > 0 needs eval_data = (x_train, y_train, x_test, y_test).")
  if eval_data is not None:
    if not isinstance(eval_data, (tuple, list)) or len(eval_data) != 4:
      raise TypeError("eval_data must be a tuple (x_train, y_train, x_test, y_test).")
    for split, pair in (("eval_data train", eval_data[:2]), ("eval_data test", eval_data[2:])):
      xe, _ = _validation.check_labelled(tuple(pair), split)
      if xe.shape[1:] != tasks[0][0].shape[1:]:
        raise ValueError(f"{split} x has inputs of shape {xe.shape[1:]}, x has {tasks[0][0].shape[1:]}.")
  if recipe is not None and not isinstance(recipe, (protocol.Recipe, dict)):
    raise TypeError(f"recipe must be a Recipe or its config dict; got {type(recipe).__name__}.")
  if callback is not None and not callable(callback):
    raise TypeError(f"callback must be callable as callback(step, metrics); got {type(callback).__name__}.")
  if isinstance(recipe, dict):
    recipe = protocol.Recipe.from_config(recipe)

  given = dict(options)
  lr_schedule = _validation.check_choice(options.pop("lr_schedule", "constant"), "lr_schedule", LR_SCHEDULES)
  if lr_schedule != "constant" and "image_optimizer" not in options:
    options.setdefault("image_lr", DEFAULT_IMAGE_LR)
  for name in ("image_lr", "model_lr"):
    if name in options:  # shorthands for Adam with this learning rate (usable from the command line)
      lr = _validation.check_positive_float(options.pop(name), name)
      if lr_schedule == "cosine":
        lr = optax.cosine_decay_schedule(lr, decay_steps=steps)
      options[name.replace("_lr", "_optimizer")] = optax.adam(lr)
  problem_options = {k: options.pop(k) for k in PROBLEM_OPTIONS if k in options}
  problem_options.setdefault("head", DEFAULT_HEADS.get(solver_name, "softmax"))
  init_scale = problem_options.setdefault("init_scale", 0.01)
  solver_options = dict(SOLVER_DEFAULTS.get(solver_name, {})) | options
  solver_obj = solvers_lib.get_solver(solver, **solver_options) if isinstance(solver, str) else solvers_lib.get_solver(solver, **options)

  image_shape = tasks[0][0].shape[1:]
  prep = fit_preprocessing(tasks[0][0], method=preprocessing)
  z_tasks = [(prep.apply(xj), yj) for xj, yj in tasks]
  n_classes = [int(yj.max()) + 1 for _, yj in tasks]
  problem = problem_lib.make_problem(n_visible=prep.dim, n_hidden=n_hidden, n_classes=n_classes, inner=inner, **problem_options)

  config = dict(
      solver=solver_name, inner=inner, n_distill=n_distill, n_hidden=n_hidden, steps=steps, seed=seed,
      batch_size=batch_size, init=init, preprocessing=preprocessing, n_classes=n_classes, image_shape=list(image_shape),
      problem_options={k: v for k, v in problem_options.items()},
      solver_options={f.name: _jsonable(getattr(solver_obj, f.name)) for f in dataclasses.fields(solver_obj)},
      options_given={k: _jsonable(v) for k, v in given.items()},
  )

  key = jax.random.key(seed)
  k_init_images, k_state, k_batches = jax.random.split(key, 3)
  images0 = _initial_images(init, k_init_images, z_tasks[0][0], n_distill)
  state = solver_obj.init(problem, k_state, images0)
  device_tasks = tuple((jnp.asarray(zj), jnp.asarray(yj)) for zj, yj in z_tasks)

  def chunk(state, start):
    def body(s, i):
      batch = problem_lib.sample_batch(jax.random.fold_in(k_batches, i), device_tasks, batch_size)
      return solver_obj.step(problem, s, batch)

    state, per_step = jax.lax.scan(body, state, start + jnp.arange(log_every))
    metrics = jax.tree.map(jnp.mean, per_step)
    # The seed's "||X - AE(X)||" column: mean reconstruction residual of D under the current w.
    residual = score(solver_obj.current_params(state), state.images, sigma2=problem_options.get("sigma2", 1.0))
    metrics["d_minus_ae_d"] = jnp.mean(jnp.linalg.norm(residual, axis=1))
    # Per step and per part of the state, so that a divergence names its first step and quantity.
    finite = dict(
        steps={k: jnp.isfinite(v) for k, v in per_step.items()},
        state={f: _all_finite(getattr(state, f)) for f in ("images", "params", "heads", "extra", "opt_state")},
    )
    return state, metrics, finite

  run_chunk = jax.jit(chunk, donate_argnums=0)

  def checkpoint(state, history):
    _atomic_savez(workdir / "checkpoint.npz", _flatten_state(state) | {"history": np.asarray(json.dumps(history))})

  def result_of(state, history, config):
    config.update(_solver_recipe(solver_obj, state, recipe, init_scale).to_config())
    return DistillResult(
        images=prep.invert(np.asarray(state.images)),
        params=jax.tree.map(np.asarray, solver_obj.current_params(state)),
        history=history,
        config=config,
        preprocessing=prep,
    )

  workdir = pathlib.Path(workdir) if workdir is not None else None
  history: list[dict[str, float]] = []
  if workdir is not None:
    workdir.mkdir(parents=True, exist_ok=True)
    state, history = _resume(workdir, config, state)
    _atomic_write_text(workdir / "config.json", json.dumps(config, indent=1))
    if not (workdir / "checkpoint.npz").is_file():  # a run that diverges at once still leaves its last good state
      checkpoint(state, history)

  honest_eval = None
  if (eval_every or eval_every_seconds) and eval_data is not None:
    honest_eval = _make_honest_probe(eval_data, prep, problem, n_classes[0])

  # The chunk donates the state's buffers; solver states may alias one array twice (the
  # value function starts w' at w), so give every leaf its own buffer first.
  state = jax.tree.map(jnp.copy, state)
  start = int(state.step)
  bar = _Progress(steps, start, progress)
  metrics_file = open(workdir / "metrics.jsonl", "a") if workdir is not None else None
  t_start = time.perf_counter()
  next_eval_time = eval_every_seconds
  # With a workdir, SIGINT / SIGTERM stop the run at the end of the current chunk, after a checkpoint.
  stop = _StopOnSignal().install() if workdir is not None else None
  step = start
  try:
    while step < steps:
      step0 = step
      state, metrics, finite = run_chunk(state, jnp.asarray(step0))
      # One transfer per chunk: the step counter, the metrics and the finiteness flags together.
      host_step, metrics, finite = jax.device_get((state.step, metrics, finite))
      step = int(host_step)
      record = {k: float(v) for k, v in metrics.items()}
      diverged = _first_non_finite(finite, record, step0, step)
      if diverged is not None:
        _stop_diverged(*diverged, workdir, state, lambda s, h: result_of(s, h, dict(config)))
      record["step"] = step
      record["wall_time"] = time.perf_counter() - t_start
      out_of_time = max_seconds is not None and record["wall_time"] >= max_seconds
      due = (eval_every and step % eval_every < log_every) or step >= steps or out_of_time
      if next_eval_time is not None and record["wall_time"] >= next_eval_time:
        due, next_eval_time = True, record["wall_time"] + eval_every_seconds
      if honest_eval is not None and due:
        record.update(honest_eval(state, solver_obj, init_scale, recipe))
      history.append(record)
      checkpointed = False
      if metrics_file is not None:
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        if step % checkpoint_every < log_every or step >= steps:
          checkpoint(state, history)
          checkpointed = True
      bar.report(step, record)
      if callback is not None:
        callback(step, record)
      if stop is not None and stop.signum is not None:
        if not checkpointed:
          checkpoint(state, history)
        print(f"udd_jax.distill: stopped by {signal.Signals(stop.signum).name} at step {step}/{steps}; the checkpoint "
              f"is {workdir / 'checkpoint.npz'}. Re-run the same command (same workdir) to resume.", file=sys.stderr, flush=True)
        stop.exit()
      if out_of_time:
        break
  finally:
    if stop is not None:
      stop.restore()
    if metrics_file is not None:
      metrics_file.close()

  result = result_of(state, history, config)
  if workdir is not None:
    result.save(workdir / "distilled.npz")
  return result


def _jsonable(value: Any) -> Any:
  """Settings as JSON; an optax transformation cannot be introspected and is named only."""
  if isinstance(value, (int, float, str, bool)) or value is None:
    return value
  if isinstance(value, (list, tuple)) and not hasattr(value, "update"):
    return [_jsonable(v) for v in value]
  if dataclasses.is_dataclass(value):
    return dataclasses.asdict(value)
  if hasattr(value, "init") and hasattr(value, "update"):
    return "optax transformation (see options_given)"
  return getattr(value, "__name__", type(value).__name__)


def _all_finite(tree: Any) -> jax.Array:
  checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def _first_non_finite(finite: dict[str, Any], record: dict[str, float], step0: int, step: int) -> tuple[int, list[str]] | None:
  """The first step of a chunk with a non-finite metric or state, and what was non-finite; None if all is finite."""
  per_step = finite["steps"]
  for i in range(step - step0):
    bad = sorted(k for k, ok in per_step.items() if not ok[i])
    if bad:
      return step0 + i + 1, bad
  bad = [k for k, v in record.items() if not np.isfinite(v)]
  bad += [f"solver state ({f})" for f, ok in finite["state"].items() if not ok]
  return (step, bad) if bad else None


def _stop_diverged(step: int, quantities: list[str], workdir: pathlib.Path | None, template: solvers_lib.SolverState,
                   result_of: Callable[[solvers_lib.SolverState, list[dict[str, float]]], DistillResult]) -> NoReturn:
  """Raises FloatingPointError; with a workdir, first writes the last good checkpoint's distilled set."""
  named = ", ".join(f"{q} (the hypergradient's norm)" if q == "image_grad_norm" else q for q in quantities)
  message = f"distillation diverged at step {step}: non-finite {named}. The run stopped"
  if workdir is None:
    message += "; nothing was kept (give a workdir to keep the last good checkpoint)"
  else:
    ckpt = workdir / "checkpoint.npz"
    good_state, good_history = _load_checkpoint(ckpt, template)
    result = result_of(good_state, good_history)
    result.config["diverged_at_step"] = step
    path = result.save(workdir / "distilled.npz")
    message += f"; the last good checkpoint (step {int(good_state.step)}) is {ckpt} and its distilled set {path}"
  raise FloatingPointError(message + ". Try smaller step sizes (e.g. image_lr) in a new workdir.")


class _StopOnSignal:
  """While active, SIGINT and SIGTERM only set ``signum``; the run stops at the end of its chunk.

  Handlers are installed from the main thread only (Python allows no other), never over
  a signal that is ignored, and :meth:`restore` puts the previous ones back. A second
  signal stops at once.
  """

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}

  def install(self) -> _StopOnSignal:
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(sig)
        if previous in (signal.SIG_IGN, None):
          continue
        self._previous[sig] = previous
        signal.signal(sig, self._handle)
    return self

  def restore(self) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)

  def _handle(self, signum: int, frame: Any) -> None:
    again = self.signum is not None
    self.signum = signum
    if again:
      self.exit()

  def exit(self) -> NoReturn:
    """Raises what the signal asks for: KeyboardInterrupt for SIGINT, SystemExit(128 + signal number) otherwise."""
    if self.signum == signal.SIGINT:
      raise KeyboardInterrupt
    raise SystemExit(128 + self.signum)


def _load_checkpoint(ckpt: pathlib.Path, template: solvers_lib.SolverState) -> tuple[solvers_lib.SolverState, list[dict[str, float]]]:
  try:
    with np.load(ckpt, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files if k.startswith("leaf_")}
      history = json.loads(str(f["history"]))
  except Exception as e:
    raise ValueError(f"{ckpt} is not a readable checkpoint (truncated or corrupted?): {e}; delete it to start over.") from None
  return _unflatten_state(template, arrays), history


def _resume(workdir: pathlib.Path, config: dict[str, Any], state: solvers_lib.SolverState):
  ckpt = workdir / "checkpoint.npz"
  if not ckpt.is_file():  # a fresh run, or one killed before its first checkpoint: start over
    (workdir / "metrics.jsonl").unlink(missing_ok=True)
    return state, []
  saved_config = json.loads((workdir / "config.json").read_text()) if (workdir / "config.json").is_file() else None
  if saved_config is not None and {k: v for k, v in saved_config.items() if k != "steps"} != {
      k: v for k, v in config.items() if k != "steps"
  }:
    raise ValueError(f"{workdir} holds a run with another configuration; use a new workdir.")
  # Only checkpoint.npz is read: a stray checkpoint.npz.tmp from a write that was killed is ignored.
  state, history = _load_checkpoint(ckpt, state)
  # Lines logged after the checkpoint will be logged again: drop them from metrics.jsonl.
  _atomic_write_text(workdir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
  return state, history


def _make_honest_probe(eval_data, prep: Preprocessing, problem, n_classes: int, n_train: int | None = 10000,
                       n_test: int | None = 10000, head_steps: int = 500):
  """A cheap probe for training curves: one fresh learner, a head fitted on 10k real images, 10k test images.

  It follows the protocol (:func:`udd_jax.evaluate`): the fresh learner is trained on D
  with the standard recipe until convergence (``honest_accuracy``) and, when D ships a
  recipe of its own, with that one too (``recipe_accuracy``); the logistic head is fitted
  on the raw features. ``n_train=None, n_test=None`` make it the full protocol's head
  (all real images) with one fresh seed; ``benchmarks/time_to_accuracy.py`` uses that.

  ``current_w_accuracy`` probes the solver's own w (the jointly learned one for penalty and
  value function); only ``honest_accuracy`` says whether D alone trains a learner.
  """

  x_train, y_train, x_test, y_test = eval_data
  z_train = jnp.asarray(prep.apply(np.asarray(x_train)[:n_train]))
  z_test = jnp.asarray(prep.apply(np.asarray(x_test)[:n_test]))
  y_train = jnp.asarray(np.asarray(y_train)[:n_train])
  y_test = jnp.asarray(np.asarray(y_test)[:n_test])
  key = jax.random.key(123_456)

  @functools.partial(jax.jit, static_argnames="recipe")
  def probe_converged(images, recipe):
    params, _, _ = protocol.retrain(images, recipe, key, learner=problem.learner, n_hidden=problem.n_hidden)
    return accuracy_of(params)

  # Learned step sizes change at every probe: traced, so that one compilation serves them all.
  @functools.partial(jax.jit, static_argnames="adam")
  def probe_steps(images, step_sizes, init_scale, adam):
    params, _, _ = protocol.retrain_with_step_sizes(images, step_sizes, key, learner=problem.learner,
                                                    n_hidden=problem.n_hidden, init_scale=init_scale, adam=adam)
    return accuracy_of(params)

  def probe(images, recipe):
    if recipe.until_converged:
      return probe_converged(images, recipe)
    return probe_steps(images, jnp.asarray(recipe.step_sizes()), recipe.init_scale, adam=recipe.inner_optimizer == "adam")

  @jax.jit
  def accuracy_of(params):
    head = logistic.fit_logistic(problem.features(params, z_train), y_train, n_classes, l2=2e-5, standardize=False,
                                 max_steps=head_steps)
    return logistic.accuracy(head, problem.features(params, z_test), y_test)

  def run(state, solver_obj, init_scale, recipe):
    """Honest accuracy (fresh learners on D: standard recipe, and D's own) and that of the solver's current w."""
    standard = dataclasses.replace(protocol.STANDARD_RECIPE, init_scale=init_scale)
    own = _solver_recipe(solver_obj, state, recipe, init_scale)
    current = solver_obj.current_params(state)
    out = dict(honest_accuracy=float(probe(state.images, standard)), current_w_accuracy=float(accuracy_of(current)))
    if own != standard:
      out["recipe_accuracy"] = float(probe(state.images, own))
    return out

  return run
