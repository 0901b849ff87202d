"""The cheap training-time probe of the honest protocol, for training curves."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from udd_jax.data.preprocessing import Preprocessing
from udd_jax.evaluation import logistic
from udd_jax.training import recipes


def make_honest_probe(eval_data, prep: Preprocessing, problem, n_classes: int, solver: Any, init_scale: float,
                      recipe: recipes.Recipe | None, key: jax.Array, *, n_train: int | None = 10000,
                      n_test: int | None = 10000, head_steps: int = 500) -> Callable[[Any], dict[str, float]]:
  """A cheap probe for training curves: one fresh learner, a head fitted on 10k real images, 10k test images.

  It follows the protocol (:func:`udd_jax.evaluate`): the fresh learner is trained on D
  with the standard recipe until convergence (``honest_accuracy``) and, when D ships a
  recipe of its own, with that one too (``recipe_accuracy``); the logistic head is fitted
  on the raw features. ``n_train=None, n_test=None`` make it the full protocol's head
  (all real images) with one fresh seed; ``benchmarks/time_to_accuracy.py`` uses that.

  ``key`` draws the fresh learner (``distill`` folds its run key into a stream of its own,
  so the probe's learner is never one of distillation's).

  ``current_w_accuracy`` probes the solver's own w (the jointly learned one for penalty and
  value function); only ``honest_accuracy`` says whether D alone trains a learner.

  Returns:
    ``probe(state) -> dict`` of those accuracies.
  """
  x_train, y_train, x_test, y_test = eval_data
  z_train = jnp.asarray(prep.apply(np.asarray(x_train)[:n_train]))
  z_test = jnp.asarray(prep.apply(np.asarray(x_test)[:n_test]))
  y_train = jnp.asarray(np.asarray(y_train)[:n_train])
  y_test = jnp.asarray(np.asarray(y_test)[:n_test])

  @jax.jit
  def accuracy_of(params):
    head = logistic.fit_logistic(problem.features(params, z_train), y_train, n_classes, l2=2e-5, standardize=False,
                                 max_steps=head_steps)
    return logistic.accuracy(head, problem.features(params, z_test), y_test)

  @functools.partial(jax.jit, static_argnames="recipe")
  def probe_converged(images, recipe):
    params, _, _ = recipes.retrain(images, recipe, key, learner=problem.learner, n_hidden=problem.n_hidden)
    return accuracy_of(params)

  # Learned step sizes change at every probe: traced, so that one compilation serves them all.
  @functools.partial(jax.jit, static_argnames="adam")
  def probe_steps(images, step_sizes, init_scale, adam):
    params, _, _ = recipes.retrain_with_step_sizes(images, step_sizes, key, learner=problem.learner,
                                                   n_hidden=problem.n_hidden, init_scale=init_scale, adam=adam)
    return accuracy_of(params)

  def probe(images, recipe):
    if recipe.until_converged:
      return probe_converged(images, recipe)
    return probe_steps(images, jnp.asarray(recipe.step_sizes()), recipe.init_scale, adam=recipe.inner_optimizer == "adam")

  standard = dataclasses.replace(recipes.STANDARD_RECIPE, init_scale=init_scale)

  def run(state):
    """Honest accuracy (fresh learners on D: standard recipe, and D's own) and that of the solver's current w."""
    own = solver.recipe(state, init_scale, recipe)
    out = dict(honest_accuracy=float(probe(state.images, standard)),
               current_w_accuracy=float(accuracy_of(solver.learner_params(state))))
    if own != standard:
      out["recipe_accuracy"] = float(probe(state.images, own))
    return out

  return run
