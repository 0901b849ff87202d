"""The bilevel problem every solver works on, and batches of real data for its tasks.

A problem exposes four things the solvers use (a toy problem in the tests
implements the same four, which is how the solvers are checked against
closed-form answers):

* ``inner_loss(params, images, key) -> scalar``: the unsupervised fit on ``images``;
* ``outer_loss(params, heads, batch) -> (total, per_task)``: the task losses;
* ``init_params(key, dtype) -> params``: a fresh random init of the inner learner;
* ``head`` (with ``has_params``) and ``init_heads(key, dtype)``: the stacked task heads.

and, optionally, ``inner_least_squares(params, images, key) -> (residuals, scale) | None``:
the inner loss as ``scale * 1/2 ||residuals||^2``, which the Gauss-Newton curvature of the
implicit hypergradient needs (``curvature="gauss_newton"``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray, Scalar

from udd_jax import _validation
from udd_jax.heads import linear as heads_lib
from udd_jax.inner import learners


class TaskBatch(NamedTuple):
  """Real labelled inputs for every task, stacked: ``x`` (T, B, d), ``y`` (T, B)."""

  x: Float[Array, "T B d"]
  y: Int[Array, "T B"]


@dataclasses.dataclass(frozen=True)
class BilevelProblem:
  """Unsupervised distillation: an inner learner fitted on D, linear heads on its features.

  Attributes:
    learner: the inner learner (loss, features, init).
    head: the task head (shared type, one set of parameters per task).
    n_visible: input dimension ``d``.
    n_hidden: number of features ``K``.
    n_classes: number of classes of each task.
    init_scale: standard deviation of fresh inner weights.
  """

  learner: learners.InnerLearner
  head: heads_lib.Head
  n_visible: int
  n_hidden: int
  n_classes: tuple[int, ...]
  init_scale: float = 0.01

  @property
  def n_tasks(self) -> int:
    return len(self.n_classes)

  @property
  def class_mask(self) -> np.ndarray:
    """Boolean (T, C_max): which padded classes exist for each task."""
    return np.arange(max(self.n_classes))[None, :] < np.asarray(self.n_classes)[:, None]

  def check_images(self, images: Any) -> None:
    """Raises if ``images`` is not a floating (N, n_visible) array."""
    params = jax.eval_shape(lambda: self.init_params(jax.random.key(0)))
    self.learner.check_params(params, images, "images")

  def inner_loss(self, params: Any, images: Float[Array, "N d"], key: PRNGKeyArray) -> Scalar:
    return self.learner.loss(params, images, key)

  def inner_least_squares(self, params: Any, images: Float[Array, "N d"], key: PRNGKeyArray
                          ) -> learners.LeastSquares | None:
    """The inner loss as ``scale * 1/2 ||r||^2`` (the learner's ``least_squares``); None if it is not a sum of squares."""
    return self.learner.least_squares(params, images, key)

  def features(self, params: Any, x: Float[Array, "n d"]) -> Float[Array, "n K"]:
    return self.learner.features(params, x)

  def outer_loss(self, params: Any, heads: Any, batch: TaskBatch) -> tuple[Scalar, Float[Array, " T"]]:
    feats = jax.vmap(self.learner.features, in_axes=(None, 0))(params, batch.x)
    return heads_lib.multitask_loss(self.head, heads, feats, batch.y, jnp.asarray(self.class_mask))

  def init_params(self, key: PRNGKeyArray, dtype=jnp.float32) -> Any:
    return self.learner.init(key, self.n_visible, self.n_hidden, init_scale=self.init_scale, dtype=dtype)

  def init_heads(self, key: PRNGKeyArray, dtype=jnp.float32) -> Any:
    keys = jax.random.split(key, self.n_tasks)
    n_max = max(self.n_classes)
    return jax.vmap(lambda k: self.head.init(k, self.n_hidden, n_max, dtype))(keys)


def make_problem(
    *,
    n_visible: int,
    n_hidden: int,
    n_classes: int | Sequence[int],
    inner: str | learners.InnerLearner = "ae",
    head: str | heads_lib.Head = "softmax",
    head_l2: float | None = None,
    sigma2: float = 1.0,
    noise_std: float = 0.1,
    init_scale: float = 0.01,
) -> BilevelProblem:
  """Builds a :class:`BilevelProblem`, checking every option.

  Args:
    n_visible: input dimension ``d``.
    n_hidden: number of hidden units ``K``.
    n_classes: classes per task (an int for a single task).
    inner: ``"ae"``, ``"score_matching"``, ``"denoising_score_matching"`` or an ``InnerLearner``.
    head: ``"softmax"``, ``"ridge"``, ``"standardized_ridge"``, ``"ridge_ce"`` or ``"logistic"``.
    head_l2: L2 strength of the heads (the head's default if None).
    sigma2: GRBM visible variance.
    noise_std: denoising score matching noise level.
    init_scale: std of fresh inner weights.

  Examples:
    >>> problem = make_problem(n_visible=64, n_hidden=32, n_classes=[10, 2])
    >>> problem.n_tasks, problem.class_mask.shape
    (2, (2, 10))
  """
  n_visible = _validation.check_positive_int(n_visible, "n_visible")
  n_hidden = _validation.check_positive_int(n_hidden, "n_hidden")
  classes = (n_classes,) if not isinstance(n_classes, Sequence) else tuple(n_classes)
  if not classes:
    raise ValueError("n_classes is empty: give at least one task.")
  classes = tuple(_validation.check_positive_int(c, "n_classes") for c in classes)
  return BilevelProblem(
      learner=learners.get_inner_learner(inner, sigma2=sigma2, noise_std=noise_std),
      head=heads_lib.get_head(head, l2=head_l2),
      n_visible=n_visible,
      n_hidden=n_hidden,
      n_classes=classes,
      init_scale=_validation.check_positive_float(init_scale, "init_scale", allow_zero=True),
  )


def sample_batch(key: PRNGKeyArray, tasks: Sequence[tuple[Array, Array]], batch_size: int) -> TaskBatch:
  """Draws ``batch_size`` examples (with replacement) from each task's real data, on device.

  Args:
    key: PRNG key.
    tasks: one ``(x, y)`` per task, ``x`` (n_t, d) and ``y`` (n_t,); sizes may differ.
    batch_size: examples per task.

  Returns:
    A :class:`TaskBatch` with leading axis over tasks.
  """
  keys = jax.random.split(key, len(tasks))
  xs, ys = [], []
  # A static loop over the (few) tasks: only the gathers differ, as tasks may have
  # different sizes; everything downstream is vmapped over the stacked batch.
  for k, (x, y) in zip(keys, tasks):
    idx = jax.random.randint(k, (batch_size,), 0, x.shape[0])
    xs.append(x[idx])
    ys.append(y[idx])
  return TaskBatch(jnp.stack(xs), jnp.stack(ys))
