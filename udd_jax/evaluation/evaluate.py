"""The honest evaluation protocol of docs/METHOD.md section 5.

1. Re-train the inner learner from fresh random inits on D alone, with the standard
   recipe (to convergence; the headline) and, beside it, with the recipe stored with D
   (and, as a robustness figure, with a multiple of its steps).
2. Features of the whole real training set; a converged multinomial logistic head on the
   raw features and on standardised ones.
3. Test accuracy, mean +- std over seeds, beside the baselines.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

from udd_jax import _validation
from udd_jax.data.preprocessing import Preprocessing, fit_preprocessing
from udd_jax.evaluation.baselines import BASELINES, LearnerRows, Probe, baseline_key, baseline_rows
from udd_jax.evaluation.cache import BaselineCache
from udd_jax.evaluation.logistic import METHODS, NEWTON_MAX_WEIGHTS
from udd_jax.evaluation.report import EvaluationReport, Row
from udd_jax.inner import learners
from udd_jax.sharding import Layout, make_layout
from udd_jax.training.recipes import STANDARD_RECIPE, Recipe, retrain_many


@_validation.renamed(seeds="n_seeds")
def evaluate(
    images: Any,
    train: tuple[Any, Any],
    test: tuple[Any, Any],
    *,
    n_hidden: int,
    inner: str | learners.InnerLearner = "ae",
    recipe: Recipe | dict[str, Any] | None = None,
    recipe_n_hidden: int | None = None,
    standard_recipe: Recipe = STANDARD_RECIPE,
    n_seeds: int = 5,
    preprocessing: Preprocessing | None = None,
    joint_params: Any = None,
    baselines: Sequence[str] = BASELINES,
    convergence_factor: int = 0,
    head_l2: float = 2e-5,
    head_steps: int = 1000,
    seed: int | jax.Array = 10_000,
    sigma2: float = 1.0,
    noise_std: float = 0.1,
    devices: Any = None,
    head_method: str = "auto",
    progress: bool = True,
    baseline_cache: str | os.PathLike | None = None,
) -> EvaluationReport:
  """Honest evaluation of a distilled set D (docs/METHOD.md section 5).

  Every learner row re-trains ``n_seeds`` fresh learners (seeds never used in distillation) on a set
  alone, with two recipes side by side: ``standard_recipe``, which does not come from D
  (Adam 3e-3, full batch, at least 4000 steps and until the gradient norm stops falling,
  init 0.01), and D's own ``recipe`` (omitted when it is the standard one). Each is
  probed by a converged multinomial logistic head (mean cross-entropy + ``head_l2/2
  ||V||^2``, solved by Newton's method or, above 2560 weights as on raw pixels, Hessian-free
  Newton (raw features) and L-BFGS (standardised ones):
  :func:`udd_jax.evaluation.fit_logistic`) fitted on
  the features of every real training image, on the raw features (the headline,
  ``Row.accuracies``) and on standardised ones.

  With ``progress``, each row prints one line to stderr when it is done: its number and
  name, the recipe, the mean accuracy, the time so far and an ETA from the rows done
  (the seeds of a row run together, vmapped, so a row is the unit of progress).

  Args:
    images: the distilled set, (N, ...) in the same value space and shape as ``train``'s inputs.
    train: ``(x_train, y_train)`` real labelled training data.
    test: ``(x_test, y_test)`` real labelled test data.
    n_hidden: number of hidden units K of the learner re-trained on D (another K than
      distillation used gives the cross-learner transfer figure).
    inner: inner loss of the re-trained learner (``"ae"``, ``"score_matching"``, ...).
    recipe: the inner recipe stored with D (a :class:`Recipe` or its config dict); None
      means D ships the standard recipe.
    recipe_n_hidden: the K that ``recipe`` was made for; for another ``n_hidden``, plain
      gradient step sizes are rescaled (:meth:`Recipe.for_learner`). A recipe under which
      a learner still diverges gets a row marked "diverged" instead of accuracies.
    standard_recipe: the recipe that does not come from D.
    n_seeds: number of fresh learner inits (never used during distillation), drawn from ``seed``.
    preprocessing: the map from value space to learner inputs stored with D (flatten only if None).
    joint_params: the jointly learned w of a penalty/OVR run, reported beside.
    baselines: which of ``raw_pixels``, ``random_w``, ``random_subset``, ``kmeans``,
      ``full_data``, ``supervised`` to add.
    convergence_factor: if > 0, a robustness row re-trains with D's recipe for this many
      times its steps.
    head_l2: L2 of the logistic head, ``head_l2/2 ||V||^2`` (2e-5: ``1e-5 ||V||^2``, docs/METHOD.md section 5).
    head_steps: iteration budget of each head (Newton steps, or L-BFGS iterations).
    seed: base of the evaluation PRNG stream: an int seed or a PRNG key.
    sigma2, noise_std: inner-loss hyperparameters.
    devices: where the rows' fresh seeds run: None (one device, the default), a device
      count, a list of jax devices or a one-axis ``jax.sharding.Mesh``; ``n_seeds`` must be a
      multiple of their number. The seeds are split across the devices, the real data
      replicated; accuracies agree with one device's to float round-off (docs/SCALING.md).
    head_method: the heads' solver, :func:`udd_jax.evaluation.fit_logistic`'s ``method``:
      ``"auto"`` (Newton on up to 2560 weights and biases, e.g. K = 128 features and 10
      classes; on more, e.g. raw pixels, Hessian-free Newton for the raw-feature head and
      L-BFGS for the standardised one), ``"newton"``, ``"newton_cg"`` or ``"lbfgs"`` (the
      solver before; the same optimum to its tolerance, docs/BENCHMARKS.md sections (j), (k)).
    progress: print a line per finished row to stderr.
    baseline_cache: a directory where each baseline's rows are kept
      (:class:`udd_jax.evaluation.cache.BaselineCache`): rows stored there by an earlier
      evaluation in the same setting (data, seeds, learner, K, size of D, recipes, heads,
      devices, versions) are read instead of computed, and rows computed here are stored.
      The rows are those the evaluation computes, bit for bit; only D's rows are then
      computed. None (the default) computes every row and stores nothing; the apps use
      :func:`udd_jax.evaluation.cache.default_cache_dir`. Not for multi-process runs.

  Returns:
    An :class:`EvaluationReport`; ``print(report)`` shows the markdown table and the recipes.

  Examples:
    >>> import udd_jax
    >>> (x, y), (xt, yt) = udd_jax.load_dataset("digits")
    >>> short = udd_jax.Recipe("adam", 0.01, 20, 0.01)  # 20 Adam steps: the standard recipe takes >= 4000
    >>> report = udd_jax.evaluate(x[:20], (x, y), (xt, yt), n_hidden=8, n_seeds=2, standard_recipe=short,
    ...                           baselines=(), head_steps=50, progress=False)
    >>> [(r.name, r.recipe, len(r.accuracies)) for r in report.rows]
    [('distilled D', 'standard', 2)]
  """
  n_seeds, n_hidden, convergence_factor, head_l2, head_steps = _check_options(
      n_seeds, n_hidden, convergence_factor, seed, head_l2, head_steps)
  _validation.check_choice(head_method, "head_method", METHODS)
  train, test, images = _check_data(images, train, test, baselines)
  recipe, recipes = _resolve_recipes(recipe, standard_recipe, n_hidden, recipe_n_hidden)
  layout = make_layout(devices)
  if layout is not None:
    layout.check_divides(n_seeds, "n_seeds")
  probe, d_images = _prepare(images, train, test, inner, preprocessing, joint_params, head_l2=head_l2,
                             head_steps=head_steps, sigma2=sigma2, noise_std=noise_std)
  probe = dataclasses.replace(probe, head_method=head_method)
  n_variants = len(recipes) + bool(convergence_factor)
  rows_of = lambda b: n_variants if b in ("random_subset", "kmeans") else 1  # a learner row per recipe variant
  n_rows = n_variants + (joint_params is not None) + sum(rows_of(b) for b in baselines)
  keys = jax.random.split(_validation.as_key(seed, "seed")[0], n_seeds)
  cache = _baseline_cache(baseline_cache, probe, keys, baselines, recipes, recipe, n_distill=d_images.shape[0],
                          n_hidden=n_hidden, init_scale=standard_recipe.init_scale,
                          convergence_factor=convergence_factor, layout=layout)
  n_cached = 0 if cache is None else sum(rows_of(b) for b in baselines if cache.stored(b, baseline_key(b)))
  on_row = _RowProgress(n_rows, n_cached) if progress else (lambda row, cached=False: None)
  if layout is not None:  # the real data and D on every device, the seeds split across them
    probe = dataclasses.replace(probe, **layout.put({f: getattr(probe, f) for f in ("z_train", "y_train", "z_test", "y_test")}))
    d_images, keys = layout.put(d_images), layout.put(keys, layout.split())
  learner_rows = _learner_rows(probe, keys, recipes, recipe, n_hidden=n_hidden, convergence_factor=convergence_factor,
                               layout=layout, on_row=on_row)
  rows = _rows(probe, learner_rows, d_images, joint_params, baselines, keys, n_hidden=n_hidden,
               init_scale=standard_recipe.init_scale, on_row=on_row, cache=cache)
  settings = _settings(probe, recipes, n_distill=d_images.shape[0], n_seeds=n_seeds, n_hidden=n_hidden)
  if cache is not None:
    settings["baseline_cache"] = dict(directory=str(cache.directory), rows_from_cache=cache.hits)
  return EvaluationReport(rows, settings)


def _baseline_cache(directory, probe: Probe, keys: PRNGKeyArray, baselines: Sequence[str],
                    recipes: list[tuple[str, Recipe]], recipe: Recipe, *, n_distill: int, n_hidden: int,
                    init_scale: float, convergence_factor: int, layout: Layout | None) -> BaselineCache | None:
  """The cache of the baseline rows of this evaluation, or None (none asked for, or no baselines)."""
  if directory is None or not baselines:
    return None
  if jax.process_count() > 1:
    raise ValueError("baseline_cache is for single-process runs: the processes of a multi-process run would each "
                     "read their own disk; pass baseline_cache=None.")
  if not isinstance(directory, (str, os.PathLike)):
    raise TypeError(f"baseline_cache must be a directory path or None; got {type(directory).__name__}.")
  learner = probe.learner
  settings = dict(
      learner=f"{type(learner).__module__}.{type(learner).__qualname__}: {learner!r}", n_hidden=n_hidden, n=n_distill,
      init_scale=init_scale, recipes={label: r.to_config() for label, r in recipes},
      convergence=dict(factor=convergence_factor, steps=recipe.steps if convergence_factor else None),
      head_l2=probe.head_l2, head_steps=probe.head_steps, head_method=probe.head_method,
      devices=1 if layout is None else layout.size,
  )
  arrays = dict(z_train=probe.z_train, y_train=probe.y_train, z_test=probe.z_test, y_test=probe.y_test, keys=keys)
  return BaselineCache(directory, arrays, settings)


class _RowProgress:
  """Reports each finished row of an evaluation on stderr: ``evaluate: row 3/9 ... | 1m02s | ETA 2m10s``."""

  def __init__(self, total: int, n_cached: int = 0):
    self.total, self.n_cached, self.done, self.done_cached = total, n_cached, 0, 0
    self.t0 = time.perf_counter()

  def __call__(self, row: Row, cached: bool = False) -> None:
    """Prints the line of ``row``; the ETA counts the rows still to compute, at the mean time of those computed."""
    self.done += 1
    self.done_cached += cached
    elapsed = time.perf_counter() - self.t0
    computed, to_compute = self.done - self.done_cached, self.total - self.n_cached
    eta = elapsed / max(computed, 1) * max(to_compute - computed, 0)
    recipe = f" [{row.recipe} recipe]" if row.recipe else ""
    accuracy = f"accuracy {row.mean:.4f} ({len(row.accuracies)} seeds)" if row.accuracies else "no accuracy"
    source = " (from the baseline cache)" if cached else ""
    print(f"evaluate: row {self.done}/{self.total} {row.name}{recipe}: {accuracy}{source} | {_clock(elapsed)} | "
          f"ETA {_clock(eta)}", file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
  return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def _rows(probe: Probe, learner_rows: LearnerRows, d_images: Array, joint_params: Any, baselines: Sequence[str],
          keys: PRNGKeyArray, *, n_hidden: int, init_scale: float, on_row: Callable[..., None],
          cache: BaselineCache | None) -> list[Row]:
  """Every row of the table: learners re-trained on D, the jointly learned w if any, then the baselines."""
  rows = learner_rows("distilled D", jnp.broadcast_to(d_images, (keys.shape[0], *d_images.shape)))
  if joint_params is not None:
    raw_accs, std_accs = probe(jax.tree.map(lambda a: jnp.asarray(a)[None], joint_params))
    rows.append(Row("jointly learned w (not a re-trained learner)", raw_accs, accuracies_standardized=std_accs))
    on_row(rows[-1])
  n = d_images.shape[0]
  return rows + baseline_rows(baselines, probe, learner_rows, keys, n=n, n_hidden=n_hidden, init_scale=init_scale,
                              on_row=on_row, cache=cache)


def _settings(probe: Probe, recipes: list[tuple[str, Recipe]], *, n_distill: int, n_seeds: int, n_hidden: int) -> dict[str, Any]:
  """The settings an :class:`EvaluationReport` records."""
  return dict(
      n_distill=int(n_distill), n_hidden=n_hidden, inner=probe.learner.name, n_seeds=n_seeds,
      recipes={label: r.to_config() for label, r in recipes},
      head=f"multinomial logistic ({probe.head_method}: newton up to {NEWTON_MAX_WEIGHTS} weights, else newton_cg "
           "on raw features and lbfgs on standardised ones), "
           "mean CE + head_l2/2 ||V||^2; raw features (headline) and standardised" if probe.head_method == "auto" else
           f"multinomial logistic ({probe.head_method}), mean CE + head_l2/2 ||V||^2; raw features (headline) and standardised",
      head_l2=probe.head_l2, head_steps=probe.head_steps, n_train=int(probe.z_train.shape[0]),
      n_test=int(probe.z_test.shape[0]),
  )


def _prepare(images: Any, train: tuple[Any, Any], test: tuple[Any, Any], inner: str | learners.InnerLearner,
             preprocessing: Preprocessing | None, joint_params: Any, *, head_l2: float, head_steps: int, sigma2: float,
             noise_std: float) -> tuple[Probe, Array]:
  """The probe on the real data and D, both in the learner's input space (``preprocessing`` applied)."""
  if preprocessing is not None and not isinstance(preprocessing, Preprocessing):
    raise TypeError(f"preprocessing must be the Preprocessing stored with D; got {type(preprocessing).__name__}.")
  learner = learners.get_inner_learner(inner, sigma2=sigma2, noise_std=noise_std)
  (x_train, y_train), (x_test, y_test) = train, test
  prep = preprocessing if preprocessing is not None else fit_preprocessing(x_train[:1], method="none")
  n_classes = int(max(y_train.max(), y_test.max())) + 1
  probe = Probe(learner, jnp.asarray(prep.apply(x_train)), jnp.asarray(y_train), jnp.asarray(prep.apply(x_test)),
                jnp.asarray(y_test), n_classes, head_l2, head_steps)
  d_images = jnp.asarray(prep.apply(images))
  if joint_params is not None:
    try:
      learner.check_params(jax.tree.map(jnp.asarray, joint_params), d_images, "images")
    except (TypeError, ValueError) as e:
      raise type(e)(f"joint_params do not fit the images: {e}") from None
  return probe, d_images


def _check_options(n_seeds, n_hidden, convergence_factor, seed, head_l2, head_steps) -> tuple[int, int, int, float, int]:
  """The checked counts and head settings of :func:`evaluate`."""
  n_seeds = _validation.check_positive_int(n_seeds, "n_seeds")
  n_hidden = _validation.check_positive_int(n_hidden, "n_hidden")
  convergence_factor = _validation.check_non_negative_int(convergence_factor, "convergence_factor")
  _validation.as_key(seed, "seed")
  head_l2 = _validation.check_positive_float(head_l2, "head_l2", allow_zero=True)
  head_steps = _validation.check_positive_int(head_steps, "head_steps")
  return n_seeds, n_hidden, convergence_factor, head_l2, head_steps


def _check_data(images: Any, train: tuple[Any, Any], test: tuple[Any, Any], baselines: Sequence[str]):
  """Checks D, the labelled real data and the baselines against each other; returns ``(train, test, images)``."""
  x_train, y_train = _validation.check_labelled(train, "train")
  x_test, y_test = _validation.check_labelled(test, "test")
  images = _validation.check_array(images, "images", min_ndim=2)
  if images.shape[1:] != x_train.shape[1:] or x_test.shape[1:] != x_train.shape[1:]:
    raise ValueError(
        f"images {images.shape[1:]}, train x {x_train.shape[1:]} and test x {x_test.shape[1:]} must share one trailing shape."
    )
  for b in baselines:
    _validation.check_choice(b, "baseline", BASELINES)
  if images.shape[0] > x_train.shape[0] and {"random_subset", "kmeans"} & set(baselines):
    raise ValueError(f"images has {images.shape[0]} rows, more than the {x_train.shape[0]} training inputs the "
                     "random_subset and kmeans baselines draw that many from.")
  return (x_train, y_train), (x_test, y_test), images


def _resolve_recipes(recipe: Recipe | dict[str, Any] | None, standard_recipe: Recipe, n_hidden: int,
                     recipe_n_hidden: int | None) -> tuple[Recipe, list[tuple[str, Recipe]]]:
  """D's recipe as a :class:`Recipe` for a learner of ``n_hidden`` units (the standard one when None).

  Returns:
    D's recipe, and the labelled recipes of the learner rows: the standard one, then D's
    when it differs.
  """
  if recipe is None:
    recipe = standard_recipe
  elif isinstance(recipe, dict):
    recipe = Recipe.from_config(recipe)
  elif not isinstance(recipe, Recipe):
    raise TypeError(f"recipe must be a Recipe or its config dict; got {type(recipe).__name__}.")
  if recipe_n_hidden is not None:
    recipe = recipe.for_learner(n_hidden, _validation.check_positive_int(recipe_n_hidden, "recipe_n_hidden"))
  if not isinstance(standard_recipe, Recipe):
    raise TypeError(f"standard_recipe must be a Recipe; got {type(standard_recipe).__name__}.")
  return recipe, [("standard", standard_recipe)] + ([("D's recipe", recipe)] if recipe != standard_recipe else [])


def _learner_rows(probe: Probe, keys: PRNGKeyArray, recipes: list[tuple[str, Recipe]], recipe: Recipe, *,
                  n_hidden: int, convergence_factor: int, layout: Layout | None,
                  on_row: Callable[..., None]) -> LearnerRows:
  """``learner_rows(name, sets)``: re-trains on each of ``sets`` (S, N, d) with each recipe and probes the features."""

  def learner_rows(name: str, sets: Array, note: str = "") -> list[Row]:
    if layout is not None:
      sets = layout.put(sets, layout.split())
    variants = [(name, label, r, None) for label, r in recipes]
    if convergence_factor:
      steps = convergence_factor * recipe.steps
      variants.append((f"{name}, {convergence_factor}x steps", "D's recipe", recipe, steps))
    rows = []
    for row_name, label, r, steps in variants:
      params, losses, gnorms, taken = retrain_many(sets, keys, r, learner=probe.learner, n_hidden=n_hidden, steps=steps)
      if not bool(jnp.all(jnp.isfinite(losses))):
        rows.append(Row(row_name, [], note=f"diverged: this recipe does not train a K = {n_hidden} {probe.learner.name} "
                        "learner (non-finite inner loss); not probed", recipe=label))
        on_row(rows[-1])
        continue
      raw_accs, std_accs = probe(params)
      rows.append(Row(row_name, raw_accs, float(jnp.mean(losses)), float(jnp.mean(gnorms)), note, std_accs, label,
                      float(jnp.mean(taken))))
      on_row(rows[-1])
    return rows

  return learner_rows
