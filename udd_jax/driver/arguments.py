"""``distill``'s arguments checked and normalised before anything is compiled."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from udd_jax import _validation
from udd_jax.bilevel import solvers as solvers_lib
from udd_jax.bilevel.basis import check_image_basis
from udd_jax.data.preprocessing import PREPROCESSING_METHODS
from udd_jax.inner import learners
from udd_jax.inner import prior as prior_lib
from udd_jax.training.optimizers import LR_SCHEDULES as LR_SCHEDULES
from udd_jax.training.recipes import Recipe

DEFAULT_SOLVER = "pool"
INITS = ("real", "kmeans", "random")


@dataclasses.dataclass(frozen=True)
class ProblemConfig:
  """What is distilled for: the learner trained on D and the heads that judge its features.

  Attributes:
    n_hidden: hidden units K of the learner.
    inner: its scoring rule (``"ae"``, ``"score_matching"``, ``"denoising_score_matching"``)
      or a learner of the user's (an ``InnerLearner``).
    head: the task head during distillation (``"softmax"``, ``"ridge"``, ``"standardized_ridge"``, ``"ridge_ce"``,
      ``"logistic"``; None: the solver's ``default_head``).
    head_l2: the heads' L2 strength (None: the head's default).
    sigma2: the GRBM's visible variance.
    noise_std: the corruption of denoising score matching.
    init_scale: the scale of fresh learner weights.
  """

  n_hidden: int
  inner: str | learners.InnerLearner = "ae"
  head: str | None = None
  head_l2: float | None = None
  sigma2: float = 1.0
  noise_std: float = 0.1
  init_scale: float = 0.01


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """How a distillation runs: its length, randomness, data handling, logging and budget.

  Attributes:
    steps: outer steps (None: the solver's ``default_steps``).
    seed: PRNG seed or key of the run (evaluation uses other, fresh seeds).
    batch_size: real examples per task per step.
    init: initial D: ``"real"`` images, ``"kmeans"`` centroids or ``"random"`` noise in the data's range.
    preprocessing: ``"none"``, ``"standardize"`` or ``"zca"`` (fitted on task 0's inputs).
    clip_images: project D onto the real inputs' value range after every step.
    log_every: steps per jitted chunk and per metrics line (``steps`` must be a multiple).
    checkpoint_every: steps between checkpoints (rounded up to a multiple of ``log_every``).
    eval_every: log the honest accuracy on ``eval_data`` this often (0: never).
    eval_every_seconds: also probe each time this much more wall time has passed.
    max_seconds: stop (and save) once this much wall time has been spent in this call.
    progress: print one line per ``log_every`` steps with rate and ETA.
  """

  steps: int | None = None
  seed: Any = 0
  batch_size: int = 2048
  init: str = "real"
  preprocessing: str = "none"
  clip_images: bool = False
  log_every: int = 10
  checkpoint_every: int = 50
  eval_every: int = 0
  eval_every_seconds: float | None = None
  max_seconds: float | None = None
  progress: bool = True


def _field_names(cls: type) -> tuple[str, ...]:
  return tuple(f.name for f in dataclasses.fields(cls))


# The problem's options a solver does not see (n_hidden and inner are distill's own), and the run's
# options that go through **options: everything else in **options goes to the solver.
PROBLEM_OPTIONS = tuple(n for n in _field_names(ProblemConfig) if n not in ("n_hidden", "inner"))
DRIVER_OPTIONS = ("clip_images",)


def _as_config(cls: type, value: Any, name: str) -> Any:
  if isinstance(value, cls):
    return value
  if not isinstance(value, dict):
    raise TypeError(f"{name} must be a {cls.__name__} or a dict of its fields; got {type(value).__name__}.")
  unknown = sorted(set(value) - set(_field_names(cls)))
  if unknown:
    raise TypeError(f"unknown {name} field(s) {unknown}; {cls.__name__} has {list(_field_names(cls))}.")
  if cls is ProblemConfig and "n_hidden" not in value:
    raise TypeError("problem needs n_hidden, the learner's hidden units.")
  return cls(**value)


def as_solver(value: Any) -> Any:
  """A solver from a name, an instance, or its config dict (``solver.to_config()``, with its ``name``)."""
  if isinstance(value, dict):
    if "name" not in value:
      raise TypeError(f"a solver config dict needs the solver's 'name' (one of {sorted(solvers_lib.SOLVERS)}); "
                      f"got the keys {sorted(value)}.")
    return solvers_lib.get_solver(**value)
  return value


def group_options(problem: Any, run: Any, options: dict[str, Any]) -> tuple[ProblemConfig, RunConfig, dict[str, Any]]:
  """``distill``'s options as (problem, run, the solver's options).

  Each group comes whole (``problem=ProblemConfig(...)`` or a dict) or field by field as
  keyword arguments (``n_hidden=128, steps=500``), not both; what is neither a problem nor
  a run field is the solver's.

  Raises:
    TypeError: a group given both ways, an unknown field, or no ``n_hidden``.

  Examples:
    >>> problem, run, rest = group_options(None, None, dict(n_hidden=8, steps=20, mu=1.0))
    >>> problem.n_hidden, run.steps, rest
    (8, 20, {'mu': 1.0})
  """
  options = dict(options)
  groups = []
  for cls, value, name in ((ProblemConfig, problem, "problem"), (RunConfig, run, "run")):
    given = {k: options.pop(k) for k in _field_names(cls) if k in options}
    if value is not None:
      if given:
        raise TypeError(f"{sorted(given)} given both in {name}= and as keyword arguments; give each once.")
      groups.append(_as_config(cls, value, name))
    elif cls is ProblemConfig and "n_hidden" not in given:
      raise TypeError("distill needs n_hidden, the learner's hidden units (or problem=ProblemConfig(n_hidden=...)).")
    else:
      groups.append(cls(**given))
  return groups[0], groups[1], options
# Non-negative inputs above this are taken for raw pixel values (0-255) that the learner,
# which expects inputs of order one, cannot train on.
RAW_PIXEL_MAX = 2.0


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything ``distill`` was asked to do, checked: what building and running the run need."""

  tasks: list[tuple[np.ndarray, np.ndarray]]
  n_distill: int
  n_hidden: int
  inner: str | learners.InnerLearner  # a registered name, or a learner of the user's
  solver: Any
  steps: int
  key: Any
  seed: Any  # the key's JSON record: the int seed, or the key's data
  batch_size: int
  init: str
  preprocessing: str
  recipe: Recipe | None
  log_every: int
  checkpoint_every: int
  eval_every: int
  eval_data: tuple[Any, Any, Any, Any] | None
  progress: bool
  callback: Callable[[int, dict[str, float]], None] | None
  max_seconds: float | None
  eval_every_seconds: float | None
  problem_options: dict[str, Any]
  clip_images: bool = False
  prior: Any = None  # a checked ImagePrior when the solver's prior_weight > 0

  @property
  def init_scale(self) -> float:
    return self.problem_options["init_scale"]


def tasks_from_inputs(x: Any, y: Any, preprocessing: str = "none") -> list[tuple[np.ndarray, np.ndarray]]:
  """Normalises the three ways of giving tasks into a list of checked float32 (x, y) pairs.

  ``y`` is one label array (a Python list or tuple of scalar labels, one per example,
  counts as one), a list of label arrays (one task each, on the same ``x``), or None with
  ``x`` a list of ``(x, y)`` pairs (one task per dataset).

  Examples:
    >>> import numpy as np
    >>> x = np.zeros((4, 3), np.float32)
    >>> len(tasks_from_inputs(x, [0, 1, 0, 1]))  # a list of ints: one task
    1
    >>> len(tasks_from_inputs(x, [np.array([0, 1, 0, 1]), np.array([1, 1, 0, 0])]))  # a list of arrays: two
    2
  """
  if y is None:
    if not isinstance(x, (list, tuple)) or not x:
      raise ValueError("y is None: x must then be a non-empty list of (x, y) pairs, one per dataset.")
    pairs = list(x)
  elif isinstance(y, (list, tuple)):
    if not y:
      raise ValueError("y is an empty list: give at least one label array.")
    # A list of scalar labels (Python or numpy ints) is one label array, not one task per label.
    pairs = [(x, y)] if all(np.ndim(yj) == 0 for yj in y) else [(x, yj) for yj in y]
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
    classes = np.unique(yj)
    if classes.size < 2:
      raise ValueError(f"y (task {j}) holds one class only (label {int(classes[0])}): a task needs at least two classes.")
    if preprocessing == "none" and xj.size and xj.min() >= 0 and xj.max() > RAW_PIXEL_MAX:
      raise ValueError(
          f"x (task {j}) holds values in [{xj.min():g}, {xj.max():g}] (raw {xj.dtype} pixels?); the learner expects inputs "
          "of order one and would train on nothing. Divide by 255 (load_dataset returns [0, 1]) or pass "
          "preprocessing='standardize'.")
    tasks.append((xj.astype(np.float32) if xj.dtype != np.float32 else xj, yj))
  return tasks


def _check_eval_data(eval_data: Any, image_shape: tuple[int, ...]) -> None:
  if not isinstance(eval_data, (tuple, list)) or len(eval_data) != 4:
    raise TypeError("eval_data must be a tuple (x_train, y_train, x_test, y_test).")
  for split, pair in (("eval_data train", eval_data[:2]), ("eval_data test", eval_data[2:])):
    xe, _ = _validation.check_labelled(tuple(pair), split)
    if xe.shape[1:] != image_shape:
      raise ValueError(f"{split} x has inputs of shape {xe.shape[1:]}, x has {image_shape}.")


def _check_run(tasks, n_distill, init, eval_every, eval_every_seconds, max_seconds, eval_data, recipe, callback) -> None:
  if n_distill > tasks[0][0].shape[0] and init != "random":
    raise ValueError(f"n_distill={n_distill} exceeds the {tasks[0][0].shape[0]} real inputs to initialise from.")
  for name, value in (("max_seconds", max_seconds), ("eval_every_seconds", eval_every_seconds)):
    if value is not None:
      _validation.check_positive_float(value, name)
  if (eval_every or eval_every_seconds) and eval_data is None:
    raise ValueError("eval_every > 0 needs eval_data = (x_train, y_train, x_test, y_test).")
  if eval_data is not None:
    _check_eval_data(eval_data, tasks[0][0].shape[1:])
  if recipe is not None and not isinstance(recipe, (Recipe, dict)):
    raise TypeError(f"recipe must be a Recipe or its config dict; got {type(recipe).__name__}.")
  if callback is not None and not callable(callback):
    raise TypeError(f"callback must be callable as callback(step, metrics); got {type(callback).__name__}.")


def solver_and_options(solver: Any, steps: int, options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
  """Splits ``distill``'s ``**options`` into the solver (built) and the problem options.

  A cosine ``lr_schedule`` decays over the run's ``steps`` unless ``decay_steps`` is given.

  Raises:
    TypeError: an option that is neither the solver's nor a problem option; the message
      lists both kinds.
  """
  options = dict(options)
  cls = type(solver) if not isinstance(solver, str) else solvers_lib.SOLVERS[solver]
  valid_solver = sorted(f.name for f in dataclasses.fields(cls))
  unknown = sorted(set(options) - set(valid_solver) - set(PROBLEM_OPTIONS) - set(DRIVER_OPTIONS))
  if unknown:
    raise TypeError(f"unknown option(s) {unknown} for solver {cls.name!r}; its options are {valid_solver}, the "
                     f"problem options are {sorted(PROBLEM_OPTIONS + DRIVER_OPTIONS)}, and the run options are "
                     f"{sorted(_field_names(RunConfig))}.")
  for name in DRIVER_OPTIONS:
    options.pop(name, None)  # the driver's own (check_arguments)
  problem_options = {k: options.pop(k) for k in PROBLEM_OPTIONS if k in options and options[k] is not None}
  for k in PROBLEM_OPTIONS:
    options.pop(k, None)
  problem_options.setdefault("head", cls.default_head)
  problem_options.setdefault("init_scale", 0.01)
  built = solvers_lib.get_solver(solver, **options)
  if built.lr_schedule != "constant" and built.decay_steps is None:
    built = dataclasses.replace(built, decay_steps=steps)
  return built, problem_options


def check_arguments(x: Any, y: Any, *, n_distill: int, n_hidden: int, inner: str | learners.InnerLearner, solver: Any,
                    steps: int | None, seed: Any, batch_size: int, init: str, preprocessing: str, recipe: Any, log_every: int,
                    checkpoint_every: int, eval_every: int, eval_data: Any, progress: bool, callback: Any,
                    max_seconds: float | None, eval_every_seconds: float | None, options: dict[str, Any],
                    prior: Any = None) -> Settings:
  """Checks every argument of ``distill`` (same names); raises ValueError / TypeError naming the problem."""
  _validation.check_choice(preprocessing, "preprocessing", PREPROCESSING_METHODS)
  tasks = tasks_from_inputs(x, y, preprocessing)
  n_distill = _validation.check_positive_int(n_distill, "n_distill")
  n_hidden = _validation.check_positive_int(n_hidden, "n_hidden")
  if steps is not None:
    steps = _validation.check_positive_int(steps, "steps")
  batch_size = _validation.check_positive_int(batch_size, "batch_size")
  checkpoint_every = _validation.check_positive_int(checkpoint_every, "checkpoint_every")
  _validation.check_choice(init, "init", INITS)
  if not isinstance(inner, learners.InnerLearner):
    _validation.check_choice(inner, "inner loss", learners.LEARNERS)
  solver_name = _validation.check_choice(solver if isinstance(solver, str) else solver.name, "solver", solvers_lib.SOLVERS)
  steps = steps if steps is not None else solvers_lib.SOLVERS[solver_name].default_steps
  # A chunk is log_every steps: a run of fewer steps is one shorter chunk, and no run overshoots its steps.
  log_every = min(_validation.check_positive_int(log_every, "log_every"), steps)
  if steps % log_every:
    raise ValueError(f"steps ({steps}) must be a multiple of log_every ({log_every}): the run goes in chunks of "
                     "log_every steps.")
  key, seed_record = _validation.as_key(seed, "seed")
  eval_every = _validation.check_non_negative_int(eval_every, "eval_every")
  _check_run(tasks, n_distill, init, eval_every, eval_every_seconds, max_seconds, eval_data, recipe, callback)
  clip_images = _validation.check_bool(options.get("clip_images", False), "clip_images")
  solver_obj, problem_options = solver_and_options(solver, steps, options)
  dim = int(np.prod(tasks[0][0].shape[1:]))
  check_image_basis(solver_obj.image_basis, dim)
  if prior is not None or solver_obj.prior_weight:
    if prior is None:
      raise ValueError(f"prior_weight is {solver_obj.prior_weight}, but no prior was given: pass prior= (an ImagePrior "
                       "from udd_jax.fit_prior, or the path of a saved one).")
    if not solver_obj.prior_weight:
      raise ValueError("a prior was given, but prior_weight is 0: set prior_weight > 0 to use it.")
    if preprocessing != "none":
      raise ValueError(f"a prior needs preprocessing='none' (D is optimised in the inputs' own space, where the prior "
                       f"was fitted); got preprocessing={preprocessing!r}.")
    prior = prior_lib.check_prior(prior, dim)
  return Settings(
      tasks=tasks, n_distill=n_distill, n_hidden=n_hidden, inner=inner, solver=solver_obj, steps=steps, key=key,
      seed=seed_record, batch_size=batch_size, init=init, preprocessing=preprocessing,
      recipe=Recipe.from_config(recipe) if isinstance(recipe, dict) else recipe, log_every=log_every,
      checkpoint_every=checkpoint_every, eval_every=eval_every, eval_data=eval_data, progress=progress,
      callback=callback, max_seconds=max_seconds, eval_every_seconds=eval_every_seconds,
      problem_options=problem_options, clip_images=clip_images, prior=prior)


# What distill_arguments takes from a run's config as it is (the arguments that decide D).
_REPLAYED = ("n_distill", "n_hidden", "inner", "steps", "batch_size", "init", "preprocessing")


def distill_arguments(config: dict[str, Any]) -> dict[str, Any]:
  """The keyword arguments of ``distill`` that replay the run recorded in ``config``.

  ``config`` is a run's ``config.json`` (or ``DistillResult.config``): every setting that
  decides the distilled set is a plain value there, the solver's options included, so
  ``distill(x, y, **distill_arguments(config))`` on the same data gives the same set, bit
  for bit. Settings that do not change D (workdir, logging, progress, probes) are left to
  the caller.

  Examples:
    >>> import udd_jax
    >>> (x, y), _ = udd_jax.load_dataset("digits")
    >>> first = udd_jax.distill(x, y, n_distill=5, n_hidden=4, steps=3, progress=False, image_lr=0.05)
    >>> again = udd_jax.distill(x, y, progress=False, **distill_arguments(first.config))
    >>> bool((first.images == again.images).all())
    True
  """
  if not isinstance(config, dict) or "solver_options" not in config:
    raise ValueError("config must be a run's config (config.json or DistillResult.config) with its solver_options.")
  missing = [k for k in _REPLAYED + ("seed", "problem_options") if k not in config]
  if missing:
    raise ValueError(f"config lacks {missing}: it is not a complete run config.")
  seed = config["seed"]
  if isinstance(seed, list):  # a key's data
    seed = jax.random.wrap_key_data(np.asarray(seed, np.uint32))
  arguments = {k: config[k] for k in _REPLAYED} | dict(config["problem_options"])
  arguments["solver"] = as_solver(config["solver_options"])
  arguments["seed"] = seed
  if config.get("given_recipe") is not None:
    arguments["recipe"] = Recipe.from_config(config["given_recipe"])
  return arguments
