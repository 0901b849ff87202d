"""A converged multinomial logistic regression head, the probe of docs/METHOD.md section 5.

Three solvers of the same objective: a damped Newton method (exact Hessian, Cholesky
solve, a few iterations), a Hessian-free one (conjugate gradients on Hessian-vector
products, for many weights) and L-BFGS (optax; hundreds of iterations).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int

from udd_jax.training import linear_solve


METHODS = ("auto", "newton", "newton_cg", "lbfgs")
# "auto" takes Newton up to this many weights and biases, (K + 1) C: a Hessian costs ~2 n ((K + 1) C)^2
# FLOPs, which paid at K = 128 (1290) and cost several times L-BFGS's time on 784 raw pixels (7850).
NEWTON_MAX_WEIGHTS = 2560


class LogisticHead(NamedTuple):
  """A linear map on rescaled features: ``((f - mean) / scale) @ kernel + bias``.

  ``num_steps`` counts the solver's iterations on all the rows (for Newton, the steps
  taken, each with a Hessian of its own or a reused one; see :func:`fit_logistic`);
  ``grad_norm`` is the gradient norm at the returned head (L-BFGS: at the iterate before
  the last step).
  """

  mean: Float[Array, " K"]
  scale: Float[Array, " K"]
  kernel: Float[Array, "K C"]
  bias: Float[Array, " C"]
  num_steps: Array
  grad_norm: Array


class _Problem(NamedTuple):
  """The objective in the standardised basis: ``mean CE(z1 theta, onehot) + 1/2 sum(penalty * theta^2)``."""

  z1: Float[Array, "n K+1"]  # the rescaled features and a column of ones (the bias)
  onehot: Float[Array, "n C"]
  penalty: Float[Array, "K+1 1"]  # l2 times each weight's penalty weight; 0 for the bias


def fit_logistic(
    feats: Float[Array, "n K"],
    labels: Int[Array, " n"],
    n_classes: int,
    *,
    l2: float = 1e-4,
    standardize: bool = True,
    max_steps: int = 500,
    tol: float = 1e-5,
    method: str = "auto",
) -> LogisticHead:
  """Fits a multinomial logistic regression until ``||grad|| <= tol``.

  With ``standardize`` (the default) the objective is ``mean CE + l2/2 ||W||^2`` on
  standardised features (per feature; constant features keep scale 1). Without it, the
  objective is the same on the **raw** features, ``mean CE(f V + c) + l2/2 ||V||^2``: the
  head a user fits on the features as they come. Both are solved in the standardised
  basis, which is only a change of variables for the raw problem (``V = diag(1/s) W``,
  penalty ``l2/2 sum_k ||W_k||^2 / s_k^2``): the same minimiser, better conditioned.
  Jit- and vmap-friendly (``lax.while_loop``s).

  ``method="newton"`` takes damped Newton steps: the exact Hessian of the
  ``(K + 1) C`` weights and biases and its Cholesky factor (one matrix at a time under
  ``vmap``), conjugate gradients on the current Hessian (exact Hessian-vector products)
  preconditioned by that factor, and a backtracking line search on the objective's
  decrease, computed without cancellation. A Hessian costs ``~2 n ((K + 1) C)^2`` FLOPs
  and a Hessian-vector product ``~4 n (K + 1) C``, so a factor is reused while each step
  still cuts the gradient norm by 10%; the first one, at zero, is a Kronecker product
  (every probability is 1/C). Neither moves the optimum: each step is a descent step for
  the objective. The softmax is invariant to adding one vector to every class's weights;
  the Hessian is made definite along those directions by a term that leaves the steps
  unchanged. Vmapped, the seeds' loops run in lockstep; the probe fits its seeds one
  after another. ``method="newton_cg"`` takes the same steps without a Hessian: the
  conjugate gradients are preconditioned by a Kronecker approximation of the Hessian
  (each row's class curvature replaced by a multiple of ``I - 1 1^T / C`` of the same
  trace, exact at zero), one (K + 1) x (K + 1) factor per step. ``method="lbfgs"`` runs
  optax's L-BFGS from zero (zoom line search), the solver before. ``method="auto"`` (the
  default) is Newton for at most ``NEWTON_MAX_WEIGHTS`` weights and biases
  ``(K + 1) C``; above, Hessian-free Newton on raw features and L-BFGS on standardised
  ones, where its preconditioner did not pay (docs/BENCHMARKS.md sections (j), (k)).

  Args:
    feats: features (n, K).
    labels: integer labels (n,).
    n_classes: number of classes.
    l2: weight decay, ``l2/2 ||.||^2`` on the weights of the basis named by ``standardize``.
    standardize: penalise the weights of standardised features (True) or of the raw ones.
    max_steps: iteration budget (Newton steps, or L-BFGS iterations).
    tol: stop at this gradient norm (of the objective in the standardised basis, over
      weights and biases).
    method: ``"auto"``, ``"newton"``, ``"newton_cg"`` or ``"lbfgs"``.

  Returns:
    The head; ``num_steps`` and ``grad_norm`` report the solve.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (200, 3))
    >>> y = (x[:, 0] > 0).astype(jnp.int32)
    >>> head = fit_logistic(x, y, 2)
    >>> float(accuracy(head, x, y)) > 0.95, float(head.grad_norm) <= 1e-5
    (True, True)
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
  mean = jnp.mean(feats, axis=0)
  std = jnp.std(feats, axis=0)
  if standardize:
    scale = jnp.where(std > 1e-6, std, 1.0)
    penalty_weight = jnp.ones_like(scale)
  else:
    # Any positive scale is an exact change of variables; the floor keeps the penalty of
    # (near-)constant features finite, where they carry no signal anyway.
    scale = jnp.maximum(std, 1e-3)
    penalty_weight = 1.0 / scale**2
  n, n_feats = feats.shape
  z1 = jnp.concatenate([(feats - mean) / scale, jnp.ones((n, 1), feats.dtype)], axis=1)
  penalty = jnp.concatenate([l2 * penalty_weight, jnp.zeros((1,), feats.dtype)])[:, None]
  problem = _Problem(z1, jax.nn.one_hot(labels, n_classes, dtype=feats.dtype), penalty)
  theta = jnp.zeros((n_feats + 1, n_classes), feats.dtype)
  if method == "auto":
    if (n_feats + 1) * n_classes <= NEWTON_MAX_WEIGHTS:
      method = "newton"
    else:  # Hessian-free Newton on raw features; on standardised ones its preconditioner lost to L-BFGS
      method = "lbfgs" if standardize else "newton_cg"
  if method == "newton_cg":
    theta, steps, gnorm = _newton_cg(problem, theta, max_steps=max_steps, tol=tol, from_zero=True)
  elif method == "lbfgs":
    theta, steps, gnorm = _lbfgs(z1[:, :-1], problem.onehot, l2, penalty_weight, theta, max_steps=max_steps, tol=tol)
  else:
    theta, steps, gnorm = _newton(problem, theta, max_steps=max_steps, tol=tol, from_zero=True)
  return LogisticHead(mean, scale, theta[:n_feats], theta[n_feats], steps, gnorm)


def objective(head: LogisticHead, feats: Float[Array, "n K"], labels: Int[Array, " n"], *, l2: float,
              standardize: bool) -> Array:
  """The objective :func:`fit_logistic` minimises, at ``head`` (the penalty as ``standardize`` names it)."""
  z = (feats - head.mean) / head.scale
  penalty_weight = jnp.ones_like(head.scale) if standardize else 1.0 / head.scale**2
  ce = optax.softmax_cross_entropy_with_integer_labels(z @ head.kernel + head.bias, labels)
  return jnp.mean(ce) + 0.5 * l2 * jnp.sum(penalty_weight[:, None] * head.kernel**2)


def _gradient(problem: _Problem, theta: Array) -> tuple[Array, Array]:
  """The gradient at ``theta`` and the class log-probabilities of every row."""
  log_p = jax.nn.log_softmax(problem.z1 @ theta, axis=-1)
  return problem.z1.T @ (jnp.exp(log_p) - problem.onehot) / problem.z1.shape[0] + problem.penalty * theta, log_p


def _hessian(problem: _Problem, theta: Array, chunk: int = 8192) -> Array:
  """The Hessian in (class, feature) order, plus the identity along the class-sum directions.

  The cross-entropy's block (c, d) is ``Z^T diag(p_c delta_cd - p_c p_d) Z / n``, built as
  one block diagonal minus ``Y^T Y`` with ``Y = [p_1 Z, ..., p_C Z]`` (one large matmul,
  faster here than the C(C+1)/2 symmetric blocks one by one), over chunks of rows to bound
  memory. Along ``theta -> theta + u 1^T`` the cross-entropy is flat; adding
  ``(1 1^T / C) kron I`` there makes the matrix definite and, as the gradient and the
  penalty's Hessian map those directions to themselves, changes no step.
  """
  n, k1 = problem.z1.shape
  c = problem.onehot.shape[1]
  d = k1 * c
  chunk = min(chunk, n)
  n_chunks = -(-n // chunk)
  pad = n_chunks * chunk - n
  z1 = jnp.concatenate([problem.z1, jnp.zeros((pad, k1), theta.dtype)]).reshape(n_chunks, chunk, k1)
  weight = jnp.concatenate([jnp.ones(n, theta.dtype), jnp.zeros(pad, theta.dtype)]).reshape(n_chunks, chunk, 1)

  def add_chunk(h, rows):
    z, w = rows
    scaled = (jax.nn.softmax(z @ theta, axis=-1) * w)[:, :, None] * z[:, None, :]  # (chunk, C, K+1)
    diagonal = jnp.einsum("ick,il->ckl", scaled, z)
    y = scaled.reshape(chunk, d)
    return h - y.T @ y + jnp.einsum("cd,ckl->ckdl", jnp.eye(c, dtype=theta.dtype), diagonal).reshape(d, d), None

  h, _ = jax.lax.scan(add_chunk, jnp.zeros((d, d), theta.dtype), (z1, weight))
  penalty = jnp.tile(problem.penalty[:, 0], c)
  class_sums = jnp.kron(jnp.full((c, c), 1.0 / c, theta.dtype), jnp.eye(k1, dtype=theta.dtype))
  return h / n + jnp.diag(penalty) + class_sums


def _hessian_at_zero(problem: _Problem) -> Array:
  """:func:`_hessian` at ``theta = 0``: ``(I / C - 1 1^T / C^2) kron Z^T Z / n`` plus the same two terms."""
  n, k1 = problem.z1.shape
  c = problem.onehot.shape[1]
  dtype = problem.z1.dtype
  classes = jnp.eye(c, dtype=dtype) / c - 1.0 / c**2
  gram = problem.z1.T @ problem.z1 / n
  class_sums = jnp.kron(jnp.full((c, c), 1.0 / c, dtype), jnp.eye(k1, dtype=dtype))
  return jnp.kron(classes, gram) + jnp.diag(jnp.tile(problem.penalty[:, 0], c)) + class_sums


def _decrease(problem: _Problem, theta: Array, direction: Array, logit_step: Array, log_p: Array, t: Array) -> Array:
  """``f(theta + t direction) - f(theta)``, computed without cancellation (``logit_step = z1 direction``).

  Per row, ``lse(l + t s) - lse(l) = lse_c(log p_c + t s_c)``, as ``log1p(sum_c p_c
  expm1(t s_c))`` for small steps: accurate near the optimum, where the objective itself
  changes by less than its rounding. Large steps use the log-probabilities: a class whose
  probability underflows to 0 may dominate after the step.
  """
  a = t * logit_step
  top = jnp.max(a, axis=1)
  large = jax.nn.logsumexp(log_p + a, axis=1)
  small = jnp.log1p(jnp.sum(jnp.exp(log_p) * jnp.expm1(jnp.minimum(a, 1.0)), axis=1))
  lse = jnp.where(top > 1.0, large, small)
  ce = jnp.mean(lse) - t * jnp.mean(jnp.sum(logit_step * problem.onehot, axis=1))
  return ce + t * jnp.sum(problem.penalty * theta * direction) + 0.5 * t**2 * jnp.sum(problem.penalty * direction**2)


def _hvp(problem: _Problem, p: Array, v: Array) -> Array:
  """The Hessian of :func:`_hessian` (class-sum term included) times ``v`` (K+1, C), at probabilities ``p``."""
  s = problem.z1 @ v
  q = p * (s - jnp.sum(p * s, axis=1, keepdims=True))
  return problem.z1.T @ q / problem.z1.shape[0] + problem.penalty * v + jnp.mean(v, axis=1, keepdims=True)


# One matrix at a time under vmap, for the reason spd_solve gives (heads/linear.py).
_cholesky = jax.custom_batching.sequential_vmap(jnp.linalg.cholesky)
_cho_solve = jax.custom_batching.sequential_vmap(lambda l, b: jax.scipy.linalg.cho_solve((l, True), b))


class _NewtonCarry(NamedTuple):
  """The loop state of the Newton solvers: the iterate, its gradient and log-probabilities, the count and norms."""

  theta: Array
  g: Array
  log_p: Array
  steps: Array
  gnorm: Array
  stalled: Array  # the last line search found no decrease
  previous_gnorm: Array


def _newton_step(problem: _Problem, carry: _NewtonCarry, precondition, cg_tol: Array, *, cg_steps: int,
                 line_search_steps: int) -> _NewtonCarry:
  """One damped Newton step: the current Hessian's system by preconditioned CG, then a backtracking line search."""
  theta, g, log_p, i, gnorm, _, _ = carry
  p = jnp.exp(log_p)
  direction = linear_solve.conjugate_gradient(lambda v: _hvp(problem, p, v), -g, atol=cg_tol, max_steps=cg_steps,
                                             precondition=precondition, vdot=_sum_of_products).x
  logit_step = problem.z1 @ direction
  slope = jnp.sum(g * direction)

  def search(s):
    t, _, k = s
    ok = _decrease(problem, theta, direction, logit_step, log_p, t) <= 1e-4 * t * slope
    return jnp.where(ok, t, 0.5 * t), ok, k + 1

  t, ok, _ = jax.lax.while_loop(lambda s: ~s[1] & (s[2] < line_search_steps), search,
                                (jnp.ones((), theta.dtype), jnp.asarray(False), 0))
  new_theta = jnp.where(ok, theta + t * direction, theta)  # not 0 * direction: a failed solve may be NaN
  new_g, new_p = _gradient(problem, new_theta)
  return _NewtonCarry(new_theta, new_g, new_p, i + 1, jnp.sqrt(jnp.sum(new_g**2)), ~ok, gnorm)


def _going(carry: _NewtonCarry, max_steps: int, tol: float) -> Array:
  return (carry.steps < max_steps) & (carry.gnorm > tol) & ~carry.stalled


def _start(problem: _Problem, theta: Array, from_zero: bool) -> _NewtonCarry:
  """The loop state at ``theta`` (zero when ``from_zero``: every row's probabilities are then 1/C)."""
  c = problem.onehot.shape[1]
  if from_zero:
    # Written out, not as softmax(z1 @ 0): XLA:CPU (jaxlib 0.10.2, single-threaded) miscompiled that
    # product's gradient under jit(vmap) into NaNs.
    log_p = jnp.full(problem.onehot.shape, -jnp.log(c), theta.dtype)
    g = problem.z1.T @ (jnp.exp(log_p) - problem.onehot) / problem.z1.shape[0]
  else:
    g, log_p = _gradient(problem, theta)
  gnorm = jnp.sqrt(jnp.sum(g**2))
  return _NewtonCarry(theta, g, log_p, jnp.asarray(0), gnorm, jnp.asarray(False), gnorm)


def _newton(problem: _Problem, theta: Array, *, max_steps: int, tol: float, line_search_steps: int = 40,
            reuse_ratio: float = 0.9, cg_steps: int = 50, forcing: float = 0.01,
            from_zero: bool = False) -> tuple[Array, Array, Array]:
  """Damped Newton steps from ``theta`` until ``||grad|| <= tol``; returns (theta, steps, gradient norm).

  The outer loop computes a Hessian and its Cholesky factor; the inner loop takes Newton
  steps preconditioned by it while each step reduces the gradient norm by at least
  ``reuse_ratio`` (the first always counts). A step solves the current Hessian's system by
  conjugate gradients (exact Hessian-vector products, the factor as preconditioner) to a
  residual of ``forcing ||grad||`` or ``cg_steps`` iterations; with a fresh factor the
  first iteration is already the Newton step. A line search that finds no decrease in
  ``line_search_steps`` halvings stops the solve (the gradient is then at its rounding floor).
  ``from_zero`` says that ``theta`` is zero, where the first Hessian is cheap.
  """
  k1, c = theta.shape
  d = k1 * c

  def step(carry, factor):
    precondition = lambda r: _cho_solve(factor, r.T.reshape(d, 1)).reshape(c, k1).T
    return _newton_step(problem, carry, precondition, forcing * carry.gnorm, cg_steps=cg_steps,
                        line_search_steps=line_search_steps)

  going = lambda carry: _going(carry, max_steps, tol)

  def steps_with(carry, h):
    # A relative jitter keeps the float32 factor finite on a singular or badly conditioned Hessian (l2 = 0 and
    # a constant feature; tiny l2); the conjugate gradients use the exact products, so it moves no fixed point.
    factor = _cholesky(h + 1e-4 * jnp.mean(jnp.diagonal(h)) * jnp.eye(d, dtype=h.dtype))
    carry = step(carry, factor)
    return jax.lax.while_loop(lambda s: going(s) & (s.gnorm <= reuse_ratio * s.previous_gnorm),
                              lambda s: step(s, factor), carry)

  carry = _start(problem, theta, from_zero)
  if from_zero:  # the Hessian is a Kronecker product there, ~C^2 times cheaper
    carry = jax.lax.cond(going(carry), lambda: steps_with(carry, _hessian_at_zero(problem)), lambda: carry)
  carry = jax.lax.while_loop(going, lambda s: steps_with(s, _hessian(problem, s.theta)), carry)
  return carry.theta, carry.steps, carry.gnorm


def _newton_cg(problem: _Problem, theta: Array, *, max_steps: int, tol: float, line_search_steps: int = 40,
               cg_steps: int = 250, from_zero: bool = False) -> tuple[Array, Array, Array]:
  """Hessian-free damped Newton steps from ``theta`` until ``||grad|| <= tol``; returns (theta, steps, gradient norm).

  The steps of :func:`_newton` without a Hessian: each solves the current Hessian's
  system by conjugate gradients on exact Hessian-vector products to a residual of
  ``min(0.5, sqrt(||grad||)) ||grad||`` (superlinear near the optimum) or ``cg_steps``
  iterations. The preconditioner replaces each row's class curvature
  ``diag(p) - p p^T`` by ``a (I - 1 1^T / C)`` with ``a = (1 - ||p||^2) / (C - 1)``, the
  same trace: the approximate Hessian is then a Kronecker product, exact at zero (every
  probability 1/C), and inverts through one (K + 1) x (K + 1) Cholesky factor of
  ``Z^T diag(a) Z / n + penalty`` on the directions whose classes sum to zero, and
  ``penalty + 1`` on the class-sum ones. A step costs that weighted Gram matrix
  (``~2 n (K + 1)^2`` FLOPs) and a few Hessian-vector products (``~4 n (K + 1) C`` each)
  instead of a Hessian (``~2 n ((K + 1) C)^2``), which raw pixels' 7850 weights and
  biases cannot afford. The factor is made afresh at every step: kept while each step cut
  the gradient norm by 10%, as :func:`_newton` keeps its Hessian's, it cost more conjugate
  gradient iterations than it saved on MNIST's raw pixels (docs/BENCHMARKS.md section (k)).
  """
  k1 = theta.shape[0]
  n, c = problem.onehot.shape

  def factor_at(carry):
    a = (1.0 - jnp.sum(jnp.exp(2 * carry.log_p), axis=1)) / (c - 1)
    m = (problem.z1 * a[:, None]).T @ problem.z1 / n + jnp.diag(problem.penalty[:, 0])
    # A relative jitter keeps the float32 factor finite when l2 = 0 and a feature is constant; it only
    # changes the preconditioner, not the fixed point.
    return _cholesky(m + 1e-6 * jnp.mean(jnp.diagonal(m)) * jnp.eye(k1, dtype=m.dtype))

  def step(carry, factor):
    def precondition(r):
      mean = jnp.mean(r, axis=1, keepdims=True)
      return _cho_solve(factor, r - mean) + mean / (problem.penalty + 1.0)

    cg_tol = jnp.minimum(0.5, jnp.sqrt(carry.gnorm)) * carry.gnorm
    return _newton_step(problem, carry, precondition, cg_tol, cg_steps=cg_steps, line_search_steps=line_search_steps)

  step_fresh = lambda carry: step(carry, factor_at(carry))
  carry = jax.lax.while_loop(lambda s: _going(s, max_steps, tol), step_fresh, _start(problem, theta, from_zero))
  return carry.theta, carry.steps, carry.gnorm


def _sum_of_products(a: Array, b: Array) -> Array:
  """The inner product of the conjugate gradients, as the probe has always summed it (not a dot product, which rounds
  differently: the heads would change in their last bits)."""
  return jnp.sum(a * b)


def _lbfgs(z: Array, onehot: Array, l2: float, penalty_weight: Array, theta: Array, *, max_steps: int,
           tol: float) -> tuple[Array, Array, Array]:
  """optax's L-BFGS from ``theta`` until ``||grad|| <= tol``; returns (theta, steps, gradient norm)."""

  def loss(params):
    w, b = params
    return jnp.mean(optax.softmax_cross_entropy(z @ w + b, onehot)) + 0.5 * l2 * jnp.sum(penalty_weight[:, None] * w**2)

  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def cond(carry):
    _, _, i, gnorm = carry
    return (i < max_steps) & (gnorm > tol)

  def body(carry):
    params, state, i, _ = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=loss)
    params = optax.apply_updates(params, updates)
    return params, state, i + 1, optax.tree.norm(grad)

  params0 = (theta[:-1], theta[-1])
  (w, b), _, steps, gnorm = jax.lax.while_loop(
      cond, body, (params0, opt.init(params0), jnp.asarray(0), jnp.asarray(jnp.inf, theta.dtype)))
  return jnp.concatenate([w, b[None]]), steps, gnorm


def predict(head: LogisticHead, feats: Float[Array, "n K"]) -> Int[Array, " n"]:
  return jnp.argmax(((feats - head.mean) / head.scale) @ head.kernel + head.bias, axis=-1)


def accuracy(head: LogisticHead, feats: Float[Array, "n K"], labels: Int[Array, " n"]) -> Array:
  return jnp.mean(predict(head, feats) == labels)
