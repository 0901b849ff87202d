"""Task heads on top of learned features, stacked over tasks and ``vmap``ped.

A head maps features ``(n, K)`` to a loss against integer labels. Tasks may have
different numbers of classes: every task's head is padded to the largest count
and a boolean ``class_mask`` (one row per task) marks the classes that exist.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, Scalar

from udd_jax import _validation


def _solve(a: Array, b: Array) -> Array:
  return jax.scipy.linalg.solve(a, b, assume_a="pos")


# Batched (vmapped) calls of these run one system at a time: XLA:CPU's batched LAPACK kernels
# spread a batch over the intra-op thread pool, and two simulated CPU devices doing so at
# once deadlock in jaxlib 0.10 (docs/SCALING.md). One system at a time is the same LAPACK
# call per system, so nothing changes on one device.
_solve_one_at_a_time = jax.custom_batching.sequential_vmap(_solve)
_solve_vjp_one_at_a_time = jax.custom_batching.sequential_vmap(lambda a, b, ct: jax.vjp(_solve, a, b)[1](ct))


@jax.custom_vjp
def spd_solve(a: Float[Array, "K K"], b: Float[Array, "K C"]) -> Float[Array, "K C"]:
  """``a^-1 b`` for a symmetric positive definite ``a`` (Cholesky), one system at a time under ``vmap``.

  Its gradient is JAX's own of ``jax.scipy.linalg.solve(a, b, assume_a="pos")``, computed
  one system at a time as well.
  """
  return _solve_one_at_a_time(a, b)


def _spd_solve_fwd(a, b):
  return _solve_one_at_a_time(a, b), (a, b)


def _spd_solve_bwd(residuals, ct):
  return _solve_vjp_one_at_a_time(*residuals, ct)


spd_solve.defvjp(_spd_solve_fwd, _spd_solve_bwd)

def _with_bias(feats: Array) -> Array:
  """``[f, 1]``: the features with a constant column, whose coefficient is the bias."""
  return jnp.concatenate([feats, jnp.ones((feats.shape[0], 1), feats.dtype)], axis=1)


HEADS = ("softmax", "ridge", "standardized_ridge", "ridge_ce", "logistic")
_MASKED_LOGIT = -1e9
RIDGE_CE_TEMPERATURE = 0.1  # the head "ridge_ce", and the logistic head's starting point
_LINE_SEARCH_STEPS = 8  # the logistic head's Newton steps try 1, 1/2, ..., 1/128 of the Newton direction


class LinearHeadParams(NamedTuple):
  """A linear map from features to class scores: ``kernel`` (K, C), ``bias`` (C,)."""

  kernel: Float[Array, "K C"]
  bias: Float[Array, " C"]


@dataclasses.dataclass(frozen=True)
class SoftmaxHead:
  """Multinomial logistic regression: mean cross-entropy plus ``l2/2 ||W||^2`` (over existing classes)."""

  l2: float = 1e-4
  has_params = True

  def init(self, key: PRNGKeyArray, n_features: int, n_classes: int, dtype=jnp.float32) -> LinearHeadParams:
    del key  # the loss is convex in the head: zeros are a fine and deterministic start
    return LinearHeadParams(jnp.zeros((n_features, n_classes), dtype), jnp.zeros((n_classes,), dtype))

  def logits(self, params: LinearHeadParams, feats: Float[Array, "n K"], class_mask: Bool[Array, " C"]) -> Array:
    return jnp.where(class_mask, feats @ params.kernel + params.bias, _MASKED_LOGIT)

  def loss(
      self,
      params: LinearHeadParams,
      feats: Float[Array, "n K"],
      labels: Int[Array, " n"],
      class_mask: Bool[Array, " C"],
  ) -> Scalar:
    ce = optax.softmax_cross_entropy_with_integer_labels(self.logits(params, feats, class_mask), labels)
    # Padded classes (absent from this task) carry no weight decay either.
    return jnp.mean(ce) + 0.5 * self.l2 * jnp.sum(jnp.where(class_mask, params.kernel, 0.0) ** 2)

  def predict(self, params: LinearHeadParams, feats: Array, class_mask: Array, *, fit_feats=None, fit_labels=None) -> Array:
    del fit_feats, fit_labels
    return jnp.argmax(self.logits(params, feats, class_mask), axis=-1)


@dataclasses.dataclass(frozen=True)
class RidgeHead:
  """Closed-form ridge regression onto one-hot labels, fitted on the batch it is given.

  The loss is ``min_beta mean_i ||[f_i, 1] beta - e_{y_i}||^2 + l2 ||beta||^2``: the
  head is at its optimum by construction, so it has no parameters of its own. With
  ``standardize`` the features are first centred and scaled to unit variance with the
  fitting batch's statistics (as the evaluation probe does), so the penalty weighs every
  hidden unit alike whatever its scale.

  With a ``temperature`` (the head ``"ridge_ce"``: 0.1), the loss is instead the softmax
  cross-entropy of the fitted scores divided by it, ``mean_i CE([f_i, 1] beta* / t, y_i)``:
  the closed-form head judged by the probe's own loss, as in distillation for linear
  probes (docs/METHOD.md section 3).
  """

  l2: float = 1e-3
  standardize: bool = False
  temperature: float | None = None
  has_params = False

  def init(self, key: PRNGKeyArray, n_features: int, n_classes: int, dtype=jnp.float32) -> tuple[()]:
    del key, n_features, n_classes, dtype
    return ()

  def _design(self, feats: Array, fit_feats: Array) -> Array:
    if self.standardize:
      mean = jnp.mean(fit_feats, axis=0)
      feats = (feats - mean) / jnp.sqrt(jnp.var(fit_feats, axis=0) + 1e-8)
    return _with_bias(feats)

  def fit(self, feats: Array, labels: Array, class_mask: Array) -> Array:
    """The ridge coefficients ``beta`` (K+1, C) on ``feats``; last row is the bias."""
    f1 = self._design(feats, feats)
    targets = jax.nn.one_hot(labels, class_mask.shape[0], dtype=feats.dtype)
    n = feats.shape[0]
    gram = f1.T @ f1 / n + self.l2 * jnp.eye(f1.shape[1], dtype=feats.dtype)
    return spd_solve(gram, f1.T @ targets / n)

  def loss(self, params: tuple[()], feats: Array, labels: Array, class_mask: Array) -> Scalar:
    del params
    beta = self.fit(feats, labels, class_mask)
    targets = jax.nn.one_hot(labels, class_mask.shape[0], dtype=feats.dtype)
    scores = self._design(feats, feats) @ beta
    if self.temperature is not None:
      logits = jnp.where(class_mask, scores / self.temperature, _MASKED_LOGIT)
      return jnp.mean(optax.softmax_cross_entropy(logits, targets))
    return jnp.mean(jnp.sum((scores - targets)**2, axis=1)) + self.l2 * jnp.sum(beta**2)

  def predict(self, params: tuple[()], feats: Array, class_mask: Array, *, fit_feats: Array, fit_labels: Array) -> Array:
    del params
    scores = self._design(feats, fit_feats) @ self.fit(fit_feats, fit_labels, class_mask)
    return jnp.argmax(jnp.where(class_mask, scores, _MASKED_LOGIT), axis=-1)


@dataclasses.dataclass(frozen=True)
class NewtonLogisticHead:
  """A multinomial logistic head fitted to its optimum on the batch it is given, differentiated by the envelope theorem.

  The loss is ``min_beta mean_i CE([f_i, 1] beta, y_i) + l2/2 ||beta||^2``, the probe's own
  objective. ``beta`` starts from the ridge head's scores at temperature 0.1 (``"ridge_ce"``)
  and takes ``newton_steps`` Newton steps, each solving ``H delta = -g`` by ``cg_steps``
  conjugate-gradient iterations on Hessian-vector products (the (K+1)C x (K+1)C Hessian is
  never formed) and backtracking along ``delta`` to the largest of ``1, 1/2, ..., 1/128``
  that decreases the loss enough (Armijo). The fit sees the features with their gradient stopped: at the optimum
  ``dL/dbeta = 0``, so the derivative of the optimal loss with respect to the features is
  the partial one at a fixed ``beta*`` (docs/METHOD.md section 3), and nothing is
  differentiated through the Newton steps.
  """

  l2: float = 1e-3
  newton_steps: int = 5  # with 20 CG iterations: within 4e-6 of the optimal loss on MNIST features (docs/RESULTS.md)
  cg_steps: int = 20
  has_params = False

  def init(self, key: PRNGKeyArray, n_features: int, n_classes: int, dtype=jnp.float32) -> tuple[()]:
    del key, n_features, n_classes, dtype
    return ()

  def fit(self, feats: Array, labels: Array, class_mask: Array) -> Array:
    """The head ``beta`` (K+1, C) on ``feats`` after the Newton steps; last row is the bias, padded classes zero."""
    feats = jax.lax.stop_gradient(feats)
    z = _with_bias(feats)
    targets = jax.nn.one_hot(labels, class_mask.shape[0], dtype=feats.dtype)
    n = feats.shape[0]
    probs = lambda b: jax.nn.softmax(jnp.where(class_mask, z @ b, _MASKED_LOGIT), axis=-1)

    def newton(_, b):
      p = probs(b)
      grad = z.T @ (p - targets) / n + self.l2 * b

      def hvp(v):
        u = z @ v
        return z.T @ (p * u - p * jnp.sum(p * u, axis=-1, keepdims=True)) / n + self.l2 * v

      delta, _ = jax.scipy.sparse.linalg.cg(hvp, -grad, maxiter=self.cg_steps)
      # Backtracking on a fixed ladder of step sizes, evaluated together: the largest with Armijo's decrease (else none).
      steps = 0.5 ** jnp.arange(_LINE_SEARCH_STEPS, dtype=feats.dtype)
      values = jax.vmap(lambda a: self.objective(b + a * delta, feats, labels, class_mask))(steps)
      decrease = values <= self.objective(b, feats, labels, class_mask) + 1e-4 * steps * jnp.vdot(grad, delta)
      return b + jnp.where(jnp.any(decrease), steps[jnp.argmax(decrease)], 0.0) * delta

    start = RidgeHead(l2=self.l2).fit(feats, labels, class_mask) / RIDGE_CE_TEMPERATURE
    return jax.lax.fori_loop(0, self.newton_steps, newton, jnp.where(class_mask, start, 0.0))

  def gradient_norm(self, beta: Array, feats: Array, labels: Array, class_mask: Array) -> Array:
    """``||dL/dbeta||`` at ``beta``: how far the fit is from the head's optimum (zero there)."""
    return jnp.linalg.norm(jax.grad(self.objective)(beta, feats, labels, class_mask))

  def objective(self, beta: Array, feats: Array, labels: Array, class_mask: Array) -> Scalar:
    """``mean_i CE([f_i, 1] beta, y_i) + l2/2 ||beta||^2``, absent classes masked: what :meth:`fit` minimises."""
    logits = jnp.where(class_mask, _with_bias(feats) @ beta, _MASKED_LOGIT)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels)) + 0.5 * self.l2 * jnp.sum(beta**2)

  def loss(self, params: tuple[()], feats: Array, labels: Array, class_mask: Array) -> Scalar:
    del params
    return self.objective(self.fit(feats, labels, class_mask), feats, labels, class_mask)

  def predict(self, params: tuple[()], feats: Array, class_mask: Array, *, fit_feats: Array, fit_labels: Array) -> Array:
    del params
    scores = _with_bias(feats) @ self.fit(fit_feats, fit_labels, class_mask)
    return jnp.argmax(jnp.where(class_mask, scores, _MASKED_LOGIT), axis=-1)


Head = SoftmaxHead | RidgeHead | NewtonLogisticHead


def get_head(name: str | Head, *, l2: float | None = None) -> Head:
  """Returns the head called ``name`` (``"softmax"``, ``"ridge"``, ``"standardized_ridge"``, ``"ridge_ce"`` or ``"logistic"``).

  A head object passes through unchanged.
  """
  if isinstance(name, (SoftmaxHead, RidgeHead, NewtonLogisticHead)):
    return name
  _validation.check_choice(name, "head", HEADS)
  kwargs = {} if l2 is None else {"l2": _validation.check_positive_float(l2, "head_l2", allow_zero=True)}
  if name == "softmax":
    return SoftmaxHead(**kwargs)
  if name == "ridge_ce":
    return RidgeHead(temperature=RIDGE_CE_TEMPERATURE, **kwargs)
  if name == "logistic":
    return NewtonLogisticHead(**kwargs)
  return RidgeHead(standardize=name == "standardized_ridge", **kwargs)


def multitask_loss(
    head: Head,
    heads_params: Any,
    feats: Float[Array, "T n K"],
    labels: Int[Array, "T n"],
    class_mask: Bool[Array, "T C"],
) -> tuple[Scalar, Float[Array, " T"]]:
  """Sum over tasks of each task's head loss, the heads stacked on a leading axis and vmapped.

  Returns:
    ``(total, per_task)``.
  """
  per_task = jax.vmap(head.loss)(heads_params, feats, labels, class_mask)
  return jnp.sum(per_task), per_task
