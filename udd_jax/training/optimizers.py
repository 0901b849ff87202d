"""Optimisers by name: the one place where a name and a step size become an optax transformation.

Every optimiser option of the library (a solver's ``image_optimizer``, ``model_optimizer``,
``inner_optimizer``, ``head_optimizer``; a :class:`~udd_jax.training.recipes.Recipe`'s
``inner_optimizer``) is a plain name with a step size beside it, so that a run's
``config.json`` says everything needed to replay it.
"""

from __future__ import annotations

from collections.abc import Callable

import optax
from jaxtyping import Array

from udd_jax import _validation

OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("constant", "cosine")

LearningRate = float | Callable[[Array], Array]


def optimizer(name: str, learning_rate: LearningRate) -> optax.GradientTransformation:
  """``optax.adam`` or ``optax.sgd`` at ``learning_rate`` (a float or an optax schedule).

  Examples:
    >>> optimizer("sgd", 0.1).update({"w": 1.0}, optimizer("sgd", 0.1).init({"w": 0.0}))[0]["w"]
    -0.1
  """
  _validation.check_choice(name, "optimizer", OPTIMIZERS)
  return optax.adam(learning_rate) if name == "adam" else optax.sgd(learning_rate)


def direction(name: str) -> optax.GradientTransformation:
  """The update direction of an optimiser without its step size: Adam's scaling, or the plain gradient.

  For unrolls whose step sizes come from elsewhere (one per step, possibly learned).
  """
  _validation.check_choice(name, "optimizer", OPTIMIZERS)
  return optax.scale_by_adam() if name == "adam" else optax.identity()


def learning_rate(value: float, schedule: str = "constant", steps: int | None = None) -> LearningRate:
  """A step size, constant or decayed to zero by a cosine over ``steps`` optimiser steps.

  Examples:
    >>> lr = learning_rate(1.0, "cosine", steps=10)
    >>> float(lr(0)), float(lr(5)), float(lr(10))
    (1.0, 0.5, 0.0)
  """
  _validation.check_choice(schedule, "lr_schedule", LR_SCHEDULES)
  if schedule == "constant":
    return value
  if steps is None:
    raise ValueError("a cosine lr_schedule needs the number of steps to decay over.")
  return optax.cosine_decay_schedule(value, decay_steps=steps)
