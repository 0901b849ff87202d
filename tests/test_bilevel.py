"""Bilevel solvers against problems with known answers (float64)."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import udd_jax
from udd_jax import bilevel, training
from udd_jax import inner as inner_lib
from udd_jax.heads import linear as heads_lib

# ---------------------------------------------------------------------------
# Oracle 1: inner ridge regression, w*(D) = (D^T D + lam I)^-1 D^T t, outer 1/2||B w - c||^2.
# ---------------------------------------------------------------------------

LAM = 0.5


def ridge_problem(seed=0, n=7, p=4, m=5):
  rng = np.random.default_rng(seed)
  D = jnp.asarray(rng.normal(size=(n, p)))
  t = jnp.asarray(rng.normal(size=n))
  B = jnp.asarray(rng.normal(size=(m, p)))
  c = jnp.asarray(rng.normal(size=m))
  inner = lambda w, D: 0.5 * jnp.sum((D @ w - t) ** 2) + 0.5 * LAM * jnp.sum(w**2)
  outer = lambda w: 0.5 * jnp.sum((B @ w - c) ** 2)
  return D, t, B, c, inner, outer


def ridge_oracle(D, t, B, c):
  """Analytic dL/dD = (t - D w*) u^T - D u w*^T with u = M^-1 grad L(w*), M = D^T D + lam I."""
  M = D.T @ D + LAM * jnp.eye(D.shape[1])
  w = jnp.linalg.solve(M, D.T @ t)
  u = jnp.linalg.solve(M, B.T @ (B @ w - c))
  return w, jnp.outer(t - D @ w, u) - jnp.outer(D @ u, w)


def test_ridge_oracle_matches_autodiff_of_closed_form():
  D, t, B, c, _, outer = ridge_problem()
  w_star = lambda D: jnp.linalg.solve(D.T @ D + LAM * jnp.eye(D.shape[1]), D.T @ t)
  np.testing.assert_allclose(jax.grad(lambda D: outer(w_star(D)))(D), ridge_oracle(D, t, B, c)[1], rtol=1e-12)


def test_implicit_hypergradient_matches_oracle():
  D, t, B, c, inner, outer = ridge_problem()
  w, expected = ridge_oracle(D, t, B, c)
  g, stats = bilevel.implicit_hypergradient(inner, w, D, jax.grad(outer)(w), damping=0.0, tol=1e-13, max_steps=100)
  np.testing.assert_allclose(g, expected, rtol=1e-9, atol=1e-12)
  assert stats.residual < 1e-12 and not stats.negative_curvature
  assert 1 <= stats.num_steps <= 4 + 1  # CG on a 4x4 SPD system: at most 4 steps in exact arithmetic


def test_conjugate_gradient_warm_start():
  rng = np.random.default_rng(3)
  q = rng.normal(size=(6, 6))
  a = jnp.asarray(q @ q.T + 0.5 * np.eye(6))
  b = jnp.asarray(rng.normal(size=6))
  x_star = jnp.linalg.solve(a, b)
  matvec = lambda x: a @ x
  x, steps, negative, residual = bilevel.implicit_diff.conjugate_gradient(matvec, b, tol=1e-12, max_steps=50, x0=x_star)
  assert int(steps) == 0 and not negative  # already solved: no iteration
  np.testing.assert_allclose(x, x_star, rtol=1e-12)
  x0 = x_star + jnp.asarray(rng.normal(size=6))
  x, steps, _, residual = bilevel.implicit_diff.conjugate_gradient(matvec, b, tol=1e-12, max_steps=50, x0=x0)
  np.testing.assert_allclose(x, x_star, rtol=1e-9)
  assert 1 <= int(steps) <= 6 + 1
  # the reported residual is the true one
  assert float(residual) <= 1e-12
  assert float(jnp.linalg.norm(a @ x - b) / jnp.linalg.norm(b)) < 1e-10


def _implicit_run(problem, tasks, x, n_steps, same_batch=False, **options):
  solver = bilevel.Implicit(inner_steps=300, inner_tol=0.0, damping=1.0, **options)  # damped: positive definite
  state = solver.init(problem, jax.random.key(0), x[:10])
  step = jax.jit(lambda s, b: solver.step(problem, s, b))
  history = []
  for i in range(n_steps):
    state, metrics = step(state, bilevel.sample_batch(jax.random.key(10 + (0 if same_batch else i)), tasks, 32))
    assert not metrics["cg_negative_curvature"]
    history.append(metrics)
  return state, history


@pytest.mark.slow
def test_implicit_warm_started_adjoint_solves_the_same_systems():
  x, tasks, n_classes = digits_tasks(1)
  problem = bilevel.make_problem(n_visible=64, n_hidden=8, n_classes=n_classes, init_scale=0.1)
  cold, cold_m = _implicit_run(problem, tasks, x, 4, warm_start_adjoint=False, cg_tol=1e-10, cg_steps=500)
  warm, warm_m = _implicit_run(problem, tasks, x, 4, warm_start_adjoint=True, cg_tol=1e-10, cg_steps=500)
  np.testing.assert_allclose(warm.images, cold.images, rtol=1e-7, atol=1e-10)
  chex.assert_trees_all_close(warm.adjoint, cold.adjoint, rtol=1e-6, atol=1e-9)  # the stored adjoints
  assert int(warm_m[0]["cg_steps"]) == int(cold_m[0]["cg_steps"])  # the first warm start is from zero


def test_implicit_warm_started_adjoint_accumulates_accuracy_over_steps():
  # Three CG iterations a step: cold starts stay at the same residual, warm starts keep improving.
  x, tasks, n_classes = digits_tasks(1)
  problem = bilevel.make_problem(n_visible=64, n_hidden=8, n_classes=n_classes, init_scale=0.1)
  runs = {warm: _implicit_run(problem, tasks, x, 8, same_batch=True, warm_start_adjoint=warm, cg_tol=0.0, cg_steps=3)[1]
          for warm in (False, True)}
  cold, warm = ([float(m["cg_residual"]) for m in runs[w]] for w in (False, True))
  assert warm[0] == pytest.approx(cold[0], rel=1e-9)
  assert warm[-1] < 0.3 * cold[-1]
  assert warm[-1] < 0.3 * warm[0]


def test_implicit_argmin_custom_vjp_matches_oracle():
  D, t, B, c, inner, outer = ridge_problem(seed=1)
  opt = optax.sgd(0.05)

  def solve(w0, D):
    return training.inner_solve(lambda w: inner(w, D), w0, opt.init(w0), opt, max_steps=20000, tol=1e-13).params

  argmin = bilevel.implicit_argmin(inner, solve, damping=0.0, tol=1e-13, max_steps=100)
  g = jax.grad(lambda D: outer(argmin(jnp.zeros(4), D)))(D)
  np.testing.assert_allclose(g, ridge_oracle(D, t, B, c)[1], rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("truncate", [None, 1500])
def test_unrolled_hypergradient_with_many_steps_matches_oracle(truncate):
  D, t, B, c, inner, outer = ridge_problem(seed=2)
  M = D.T @ D + LAM * jnp.eye(4)
  lr = 1.0 / jnp.linalg.eigvalsh(M).max()
  steps = jnp.full((3000,), lr)
  g = jax.grad(lambda D: outer(training.unroll(inner, jnp.zeros(4), D, steps, truncate=truncate)))(D)
  np.testing.assert_allclose(g, ridge_oracle(D, t, B, c)[1], rtol=1e-7, atol=1e-10)


def test_unrolled_gradient_wrt_step_sizes_matches_finite_differences():
  D, t, B, c, inner, outer = ridge_problem(seed=3)
  steps = jnp.linspace(0.01, 0.05, 10)
  loss = lambda s: outer(training.unroll(inner, jnp.zeros(4), D, s, transform=optax.scale_by_adam()))
  g = jax.grad(loss)(steps)
  eps = 1e-6
  for i in (0, 4, 9):
    e = jnp.zeros(10).at[i].set(eps)
    fd = (loss(steps + e) - loss(steps - e)) / (2 * eps)
    assert abs(g[i] - fd) <= 1e-6 * max(abs(fd), 1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("truncate", [None, 3])
@pytest.mark.parametrize("remat", [False, True, "segments"])
def test_unroll_with_per_step_batches_matches_a_python_loop(remat, truncate):
  """Per-step data (here mini-batch indices) reach the loss as its third argument; remat changes no number."""
  D, t, B, c, _, outer = ridge_problem(seed=4)
  batches = jax.random.randint(jax.random.key(0), (8, 3), 0, D.shape[0])
  loss = lambda w, d, idx: 0.5 * jnp.sum((d[idx] @ w - t[idx]) ** 2) + 0.5 * LAM * jnp.sum(w**2)
  steps = jnp.linspace(0.02, 0.05, 8)

  def by_loop(d, s):
    w = jnp.zeros(4)
    for i in range(8):
      if truncate is not None and i == 8 - truncate:
        w = jax.lax.stop_gradient(w)
      w = w - s[i] * jax.grad(loss)(w, d, batches[i])
    return outer(w)

  def by_unroll(d, s):
    return outer(training.unroll(loss, jnp.zeros(4), d, s, xs=batches, truncate=truncate, remat=remat))

  value, grads = jax.value_and_grad(by_unroll, argnums=(0, 1))(D, steps)
  expected, expected_grads = jax.value_and_grad(by_loop, argnums=(0, 1))(D, steps)
  np.testing.assert_allclose(value, expected, rtol=1e-12)
  chex.assert_trees_all_close(grads, expected_grads, rtol=1e-10, atol=1e-13)
  if truncate is not None:
    assert not bool(jnp.any(grads[1][:8 - truncate])) and bool(jnp.all(grads[1][8 - truncate:] != 0))


def test_segment_remat_gives_the_same_gradient_with_memory_growing_as_sqrt_t():
  """Segments of floor(sqrt T) steps (T = 10: three of three and one left over): the same numbers, less memory."""
  learner = inner_lib.get_inner_learner("ae")
  images = jax.random.normal(jax.random.key(0), (20, 16))
  w0 = learner.init(jax.random.key(1), 16, 8, init_scale=0.1, dtype=jnp.float64)
  loss = lambda p, d: learner.loss(p, d, None)

  def outer(d, steps, remat):
    w = training.unroll(loss, w0, d, steps, transform=optax.scale_by_adam(), remat=remat)
    return jnp.sum(jnp.tanh(w.W))

  steps = jnp.linspace(0.01, 0.03, 10)
  plain = jax.grad(outer, argnums=(0, 1))(images, steps, False)
  chex.assert_trees_all_close(jax.grad(outer, argnums=(0, 1))(images, steps, "segments"), plain, rtol=1e-11, atol=1e-14)

  def temp_bytes(n, remat):
    grad = jax.jit(jax.grad(lambda d: outer(d, jnp.full(n, 0.01), remat)))
    return grad.lower(images).compile().memory_analysis().temp_size_in_bytes

  # XLA's plan for the backward pass: T times longer costs ~T times the memory per step, ~sqrt(T) by segments.
  assert temp_bytes(400, "step") / temp_bytes(100, "step") > 3.0
  assert temp_bytes(400, "segments") / temp_bytes(100, "segments") < 2.2
  assert temp_bytes(400, "segments") < 0.3 * temp_bytes(400, "step")
  with pytest.raises(ValueError, match=r"unknown remat 'layers'; valid options are \[False, True, 'step', 'segments'\]"):
    training.unroll(loss, w0, images, steps, remat="layers")


def test_unroll_remat_checkpoints_the_step_and_changes_no_number():
  D, t, B, c, inner, outer = ridge_problem(seed=5)
  steps = jnp.linspace(0.01, 0.05, 10)

  def f(d, s, remat):
    return outer(training.unroll(inner, jnp.zeros(4), d, s, transform=optax.scale_by_adam(), remat=remat))

  plain, remat = (jax.value_and_grad(f, argnums=(0, 1))(D, steps, r) for r in (False, True))
  np.testing.assert_allclose(remat[0], plain[0], rtol=1e-13)
  chex.assert_trees_all_close(remat[1], plain[1], rtol=1e-12, atol=1e-15)
  jaxprs = {r: str(jax.make_jaxpr(lambda d, s: f(d, s, r))(D, steps)) for r in (False, True)}
  assert "remat" in jaxprs[True] and "remat" not in jaxprs[False]  # the primitive of jax.checkpoint


def test_unroll_keeps_the_parameters_dtype():
  loss = lambda w, d, i: 0.5 * jnp.sum((w - d[i]) ** 2)
  w = training.unroll(loss, jnp.zeros(2, jnp.float32), jnp.ones((3, 2), jnp.float32), jnp.full((3,), 0.5),
                      xs=jnp.arange(3))
  assert w.dtype == jnp.float32
  np.testing.assert_allclose(w, 0.875)


def test_inner_solve_stops_at_tolerance():
  opt = optax.sgd(0.1)
  res = training.inner_solve(lambda w: 0.5 * jnp.sum(w**2), jnp.ones(3), opt.init(jnp.ones(3)), opt, max_steps=1000, tol=1e-3)
  # ||grad|| = sqrt(3) 0.9^k <= 1e-3 first at k = 71.
  assert int(res.num_steps) == 71 and res.grad_norm <= 1e-3


# ---------------------------------------------------------------------------
# Oracle 2: penalty and OVR converge to the bilevel solution as mu grows.
# inner 1/2 (w1 - th)^2 + 1/2 (w2 - th)^2, outer 1/2 (w1 - 1)^2 + 1/2 (w2 + 3)^2.
# Bilevel solution th* = -1, w* = (-1, -1). Penalty/OVR solution: th = -1,
# w1 = (1 - mu)/(1 + mu), w2 = (-3 - mu)/(1 + mu), so ||w - w*(th)|| = 2 sqrt(2)/(1 + mu).
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ToyProblem:
  head = heads_lib.RidgeHead()
  class_mask = np.ones((1, 1), bool)

  def inner_loss(self, w, images, key):
    return 0.5 * jnp.sum((w - images[0, 0]) ** 2)

  def outer_loss(self, w, heads, batch):
    value = 0.5 * (w[0] - 1.0) ** 2 + 0.5 * (w[1] + 3.0) ** 2
    return value, value[None]

  def init_params(self, key, dtype=jnp.float64):
    return jnp.zeros(2, dtype)

  def init_heads(self, key, dtype=jnp.float64):
    return ()


def run_solver(solver, problem, images, steps, batch=None):
  state = solver.init(problem, jax.random.key(0), images)

  @jax.jit
  def run(state):
    return jax.lax.scan(lambda s, _: solver.step(problem, s, batch), state, None, length=steps)

  return run(state)


@pytest.mark.parametrize("solver_name", ["penalty", "value_function"])
def test_penalty_and_value_function_converge_to_bilevel_solution(solver_name):
  errors = []
  for mu in (1.0, 10.0, 100.0):
    lr = 0.5 / (1.0 + 2.0 * mu)
    options = dict(mu=mu, image_optimizer="sgd", image_lr=lr, model_optimizer="sgd", model_lr=lr)
    if solver_name == "value_function":
      options.update(inner_steps=1, inner_optimizer="sgd", inner_lr=1.0)  # exact inner minimum in one step
    state, _ = run_solver(bilevel.get_solver(solver_name, **options), ToyProblem(), jnp.zeros((1, 1)), 20000)
    theta, w = float(state.images[0, 0]), np.asarray(state.params)
    np.testing.assert_allclose(theta, -1.0, atol=1e-8)
    np.testing.assert_allclose(w, [(1 - mu) / (1 + mu), (-3 - mu) / (1 + mu)], atol=1e-8)
    errors.append(np.linalg.norm(w - theta))
  np.testing.assert_allclose(errors, [2 * np.sqrt(2) / (1 + mu) for mu in (1.0, 10.0, 100.0)], rtol=1e-6)


def test_geometric_mu_schedule_drives_the_gap_to_zero():
  schedule = bilevel.mu_schedule("geometric", 1.0, final=1e4, steps=20000)
  solver = bilevel.Penalty(mu=schedule, image_lr=1e-2, model_lr=1e-2)
  state, metrics = run_solver(solver, ToyProblem(), jnp.zeros((1, 1)), 30000)
  assert abs(float(state.images[0, 0]) + 1.0) < 1e-2
  np.testing.assert_allclose(state.params, [-1.0, -1.0], atol=1e-2)
  assert metrics["mu"][-1] == pytest.approx(1e4)


# ---------------------------------------------------------------------------
# Oracle 3: the real GRBM problem. Implicit hypergradient at a converged inner solution
# equals central finite differences of the outer loss with the inner problem re-solved.
# ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("inner, weight_decay", [("ae", 0.0), ("score_matching", 1e-2)])
def test_implicit_hypergradient_matches_finite_differences_on_grbm(inner, weight_decay):
  """Data from two clusters, so the fitted GRBM uses its hidden units and the minimum is strict.

  Score matching on such data has a nearly flat direction (a hidden unit that saturates),
  so the oracle applies only with a little weight decay, which is added here.
  """
  rng = np.random.default_rng(0)
  problem = bilevel.make_problem(n_visible=5, n_hidden=2, n_classes=3, inner=inner, init_scale=0.5)
  centres = 2.0 * rng.normal(size=(2, 5))
  images = jnp.asarray(centres[rng.integers(0, 2, 20)] + 0.5 * rng.normal(size=(20, 5)))
  batch = bilevel.TaskBatch(jnp.asarray(rng.normal(size=(1, 30, 5))), jnp.asarray(rng.integers(0, 3, size=(1, 30))))
  heads = heads_lib.LinearHeadParams(jnp.asarray(rng.normal(size=(1, 2, 3))), jnp.asarray(rng.normal(size=(1, 3))))
  key = jax.random.key(0)
  f = lambda p, D: problem.inner_loss(p, D, key) + 0.5 * weight_decay * optax.tree.norm(p, squared=True)
  w0 = problem.init_params(jax.random.key(1), jnp.float64)
  flat0, unravel = ravel_pytree(w0)

  @jax.jit
  def newton_solve(flat, D):
    g = lambda z: ravel_pytree(jax.grad(f)(unravel(z), D))[0]

    def body(z, _):
      return z - jnp.linalg.solve(jax.jacfwd(g)(z), g(z)), None

    return jax.lax.scan(body, flat, None, length=30)[0]

  opt = optax.adam(0.02)
  warm = training.inner_solve(lambda p: f(p, images), w0, opt.init(w0), opt, max_steps=5000).params
  w_star = newton_solve(ravel_pytree(warm)[0], images)
  assert optax.tree.norm(jax.grad(f)(unravel(w_star), images)) < 1e-12
  hessian = jax.hessian(lambda z: f(unravel(z), images))(w_star)
  assert jnp.linalg.eigvalsh(hessian).min() > 1e-3  # a strict local minimum: the oracle applies

  outer = lambda z: problem.outer_loss(unravel(z), heads, batch)[0]
  v = jax.grad(lambda p: problem.outer_loss(p, heads, batch)[0])(unravel(w_star))
  g, stats = bilevel.implicit_hypergradient(f, unravel(w_star), images, v, damping=0.0, tol=1e-12, max_steps=200)
  assert stats.residual < 1e-10

  eps = 1e-5
  for _ in range(3):
    direction = jnp.asarray(rng.normal(size=images.shape))
    fd = (
        outer(newton_solve(w_star, images + eps * direction)) - outer(newton_solve(w_star, images - eps * direction))
    ) / (2 * eps)
    np.testing.assert_allclose(jnp.vdot(g, direction), fd, rtol=1e-6, atol=1e-10)


# ---------------------------------------------------------------------------
# Heads and tasks.
# ---------------------------------------------------------------------------


def test_ridge_head_matches_least_squares():
  rng = np.random.default_rng(0)
  feats, labels = rng.normal(size=(40, 6)), rng.integers(0, 4, size=40)
  head = heads_lib.RidgeHead(l2=0.1)
  beta = head.fit(jnp.asarray(feats), jnp.asarray(labels), jnp.ones(4, bool))
  f1 = np.hstack([feats, np.ones((40, 1))])
  expected = np.linalg.solve(f1.T @ f1 / 40 + 0.1 * np.eye(7), f1.T @ np.eye(4)[labels] / 40)
  np.testing.assert_allclose(beta, expected, rtol=1e-10)


def test_standardized_ridge_head_is_ridge_on_standardized_features_and_scale_free():
  rng = np.random.default_rng(2)
  feats = jnp.asarray(rng.normal(size=(50, 5)) * [1.0, 1e-2, 3.0, 0.1, 1.0] + 2.0)
  labels, mask = jnp.asarray(rng.integers(0, 3, size=50)), jnp.ones(3, bool)
  head = heads_lib.get_head("standardized_ridge", l2=0.1)
  z = (feats - feats.mean(0)) / jnp.sqrt(feats.var(0) + 1e-8)
  np.testing.assert_allclose(head.fit(feats, labels, mask), heads_lib.RidgeHead(l2=0.1).fit(z, labels, mask), rtol=1e-10)
  scale = jnp.asarray([10.0, 0.5, 2.0, 100.0, 1.0])
  np.testing.assert_allclose(head.loss((), feats * scale, labels, mask), head.loss((), feats, labels, mask), rtol=1e-6)
  plain = heads_lib.RidgeHead(l2=0.1)
  assert abs(float(plain.loss((), feats * scale, labels, mask) - plain.loss((), feats, labels, mask))) > 1e-3
  # Prediction standardises new features with the fitting batch's statistics.
  new = feats[:7] + 0.3
  expected = jnp.argmax(heads_lib.RidgeHead(l2=0.1)._design((new - feats.mean(0)) / jnp.sqrt(feats.var(0) + 1e-8), None)
                        @ head.fit(feats, labels, mask), axis=1)
  np.testing.assert_array_equal(head.predict((), new, mask, fit_feats=feats, fit_labels=labels), expected)


@pytest.mark.slow
@pytest.mark.parametrize("head", ["softmax", "ridge", "standardized_ridge"])
def test_vmap_over_tasks_equals_python_loop(head):
  rng = np.random.default_rng(1)
  problem = bilevel.make_problem(n_visible=6, n_hidden=4, n_classes=[5, 2, 3], head=head)
  params = udd_jax.init_params(jax.random.key(0), 6, 4, init_scale=1.0, dtype=jnp.float64)
  heads = problem.init_heads(jax.random.key(1), jnp.float64)
  heads = jax.tree.map(lambda h: h + jnp.asarray(rng.normal(size=h.shape)), heads)
  batch = bilevel.TaskBatch(jnp.asarray(rng.uniform(size=(3, 20, 6))), jnp.asarray(rng.integers(0, 2, size=(3, 20))))
  total, per_task = problem.outer_loss(params, heads, batch)
  loop = []
  for t, n_classes in enumerate((5, 2, 3)):
    task_problem = dataclasses.replace(problem, n_classes=(n_classes,))
    task_heads = jax.tree.map(lambda h: h[t : t + 1, ..., :n_classes] if h.ndim == 2 else h[t : t + 1, :, :n_classes], heads)
    task_batch = bilevel.TaskBatch(batch.x[t : t + 1], batch.y[t : t + 1])
    loop.append(task_problem.outer_loss(params, task_heads, task_batch)[0])
  np.testing.assert_allclose(per_task, loop, rtol=1e-12)
  assert float(total) == pytest.approx(float(sum(loop)), rel=1e-12)


# ---------------------------------------------------------------------------
# The solvers on real data: jit equals no-jit, no recompilation, they learn.
# ---------------------------------------------------------------------------

SOLVER_OPTIONS = {
    "penalty": dict(mu=0.01, model_lr=3e-2),
    "value_function": dict(mu=1.0, inner_steps=5, model_lr=3e-2),
    "implicit": dict(inner_steps=20, cg_steps=10, damping=0.1),
    "unrolled": dict(unroll_steps=5, inner_lr=0.1, head_steps=10),
    # Learners live 20 outer steps: a 60-step run restarts each of them about three times.
    "pool": dict(pool_size=3, inner_steps=5, lifetime=100, inner_lr=3e-2, head_steps=10),
    # The pool with its other hypergradient: CG at each learner, warm-started adjoints.
    "pool_implicit": dict(pool_size=3, inner_steps=5, lifetime=100, inner_lr=3e-2, head_steps=10, hypergradient="implicit"),
}
SOLVER_CASES = list(bilevel.SOLVERS) + ["pool_implicit"]  # every registered solver, and the pool's implicit variant


def make_solver(case):
  return bilevel.get_solver(case.removesuffix("_implicit"), **SOLVER_OPTIONS[case])


def test_every_registered_solver_has_test_options():
  assert set(bilevel.SOLVERS) <= set(SOLVER_OPTIONS) and set(SOLVER_OPTIONS) == set(SOLVER_CASES)


def digits_tasks(n_tasks):
  (x, y), _ = udd_jax.load_dataset("digits")
  x = jnp.asarray(x.reshape(len(x), -1), jnp.float64)
  y = jnp.asarray(y)
  tasks = ((x, y), (x, y % 2), (x, (y >= 5).astype(jnp.int32)))[:n_tasks]
  return x, tasks, [10, 2, 2][:n_tasks]


@pytest.mark.slow
@pytest.mark.parametrize("name", SOLVER_CASES)
def test_jit_equals_no_jit_and_no_recompilation(name):
  x, tasks, n_classes = digits_tasks(3)
  problem = bilevel.make_problem(n_visible=64, n_hidden=8, n_classes=n_classes, init_scale=0.1)
  solver = make_solver(name)
  state = solver.init(problem, jax.random.key(0), x[:10])
  batch = bilevel.sample_batch(jax.random.key(1), tasks, 16)
  eager_state, eager_metrics = solver.step(problem, state, batch)

  traces = []

  def step(state, batch):
    traces.append(1)
    return solver.step(problem, state, batch)

  jitted = jax.jit(step)
  jit_state, jit_metrics = jitted(state, batch)
  key_data = lambda a: jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a
  chex.assert_trees_all_close(
      jax.tree.map(key_data, (eager_state, eager_metrics)),
      jax.tree.map(key_data, (jit_state, jit_metrics)),
      rtol=1e-9,
      atol=1e-12,
  )
  for i in range(3):
    jit_state, _ = jitted(jit_state, bilevel.sample_batch(jax.random.key(2 + i), tasks, 16))
  assert len(traces) == 1


@pytest.mark.slow
@pytest.mark.parametrize("n_tasks", [1, 3])
@pytest.mark.parametrize("name", SOLVER_CASES)
def test_solvers_reduce_the_outer_loss_on_digits(name, n_tasks):
  x, tasks, n_classes = digits_tasks(n_tasks)
  # Unrolled starts every step from a new init, and the pool scores learners that restart and
  # change from step to step, so their heads are refitted each step: ridge does it exactly.
  head = "ridge" if name.startswith(("unrolled", "pool")) else "softmax"
  problem = bilevel.make_problem(n_visible=64, n_hidden=16, n_classes=n_classes, init_scale=0.1, head=head)
  solver = make_solver(name)
  state = solver.init(problem, jax.random.key(0), x[:10])

  @jax.jit
  def run(state):
    def body(s, _):
      k = jax.random.fold_in(s.key, 7)
      return solver.step(problem, s, bilevel.sample_batch(k, tasks, 64))

    return jax.lax.scan(body, state, None, length=60)

  final, metrics = run(state)
  assert all(bool(jnp.all(jnp.isfinite(v))) for v in metrics.values())
  outer = np.asarray(metrics["outer_loss"])
  assert outer[-10:].mean() < 0.9 * outer[:5].mean()
  assert not jnp.allclose(final.images, state.images)


@pytest.mark.slow
def test_unrolled_with_several_inits_averages_their_hypergradients():
  x, tasks, n_classes = digits_tasks(1)
  problem = bilevel.make_problem(n_visible=64, n_hidden=8, n_classes=n_classes, init_scale=0.1, head="ridge")
  solver = bilevel.Unrolled(
      unroll_steps=4, n_inits=3, learn_step_size=False, image_optimizer="sgd", image_lr=1.0, inner_lr=0.05
  )
  state = solver.init(problem, jax.random.key(0), x[:10])
  batch = bilevel.sample_batch(jax.random.key(1), tasks, 32)
  new_state, metrics = solver.step(problem, state, batch)

  # The same step by hand: one hypergradient per init (the solver's own key stream), averaged.
  _, k_init, k_inner, _ = jax.random.split(state.key, 4)
  steps = jnp.full((4,), 0.05)

  def outer_of(images, k):
    w0 = problem.init_params(k, jnp.float64)
    w = training.unroll(lambda p, d: problem.inner_loss(p, d, k_inner), w0, images, steps)
    return problem.outer_loss(w, (), batch)[0]

  per_init = [jax.value_and_grad(outer_of)(state.images, k) for k in jax.random.split(k_init, 3)]
  grads = np.stack([np.asarray(g) for _, g in per_init])
  assert np.abs(grads[0] - grads[1]).max() > 1e-6  # the inits really differ
  np.testing.assert_allclose(state.images - new_state.images, grads.mean(0), rtol=1e-9, atol=1e-12)
  assert float(metrics["outer_loss"]) == pytest.approx(np.mean([float(v) for v, _ in per_init]), rel=1e-12)
  np.testing.assert_array_equal(new_state.log_step_sizes, state.log_step_sizes)  # step sizes stay fixed


# ---------------------------------------------------------------------------
# The pool: persistent learners, restarts, and its two hypergradients against oracles.
# ---------------------------------------------------------------------------


def small_pool_problem(seed=0, n_images=6, n_visible=5, n_hidden=3, n_classes=3):
  """A small GRBM problem with a ridge head (closed form, so outer_loss needs no head parameters)."""
  rng = np.random.default_rng(seed)
  problem = bilevel.make_problem(n_visible=n_visible, n_hidden=n_hidden, n_classes=n_classes, init_scale=0.5, head="ridge")
  images = jnp.asarray(rng.normal(size=(n_images, n_visible)))
  batch = bilevel.TaskBatch(jnp.asarray(rng.normal(size=(1, 20, n_visible))),
                            jnp.asarray(rng.integers(0, n_classes, size=(1, 20))))
  return problem, images, batch


def with_ages(state, ages):
  return state._replace(age=jnp.asarray(ages, state.age.dtype))


@pytest.mark.slow
@pytest.mark.parametrize("inner_optimizer, min_age", [("adam", 0), ("sgd", 0), ("adam", 8)])
def test_pool_truncated_hypergradient_is_the_gradient_of_the_pool_objective(inner_optimizer, min_age):
  """One step's image gradient is grad_D of mean_i L(advance(L_in, w_i, s_i, D, opt, m)) over the counted learners."""
  problem, images, batch = small_pool_problem()
  solver = bilevel.Pool(pool_size=3, inner_steps=4, lifetime=1000, inner_optimizer=inner_optimizer, inner_lr=0.05,
                        min_age=min_age, image_optimizer="sgd", image_lr=1.0)
  state = solver.init(problem, jax.random.key(0), images)
  step = jax.jit(lambda s: solver.step(problem, s, batch))
  state = step(step(state)[0])[0]  # two steps first: learners with moments of their own, D moved
  state = with_ages(state, [0, 10, 20])  # after the step 4, 14, 24: nobody restarts; min_age 8 leaves learner 0 out
  counted = [0, 1, 2] if min_age == 0 else [1, 2]
  new_state, metrics = step(state)

  _, _, k_inner, _ = jax.random.split(state.key, 4)
  inner = lambda p, d: problem.inner_loss(p, d, k_inner)
  opt = solver.learner_transform()
  learner = lambda i: jax.tree.map(lambda a: a[i], (state.params, state.opt_state))

  def objective(d):
    losses = [problem.outer_loss(training.advance(inner, *learner(i), d, opt, 4)[0], (), batch)[0] for i in counted]
    return sum(losses) / len(losses)

  value, expected = jax.value_and_grad(objective)(state.images)
  assert float(jnp.abs(expected).max()) > 1e-6  # a real gradient, not a vacuous match
  np.testing.assert_allclose(state.images - new_state.images, expected, rtol=1e-8, atol=1e-14)
  assert float(metrics["outer_loss"]) == pytest.approx(float(value), rel=1e-10)
  for i in range(3):  # every learner (counted or not) continues its training on the old D
    w, s = training.advance(inner, *learner(i), state.images, opt, 4)
    new_learner = jax.tree.map(lambda a: a[i], (new_state.params, new_state.opt_state))
    chex.assert_trees_all_close(new_learner, (w, s), rtol=1e-12, atol=1e-15)
  np.testing.assert_array_equal(new_state.age, [4, 14, 24])


@pytest.mark.slow
def test_pool_learners_restart_after_their_lifetime_and_stay_staggered():
  problem, images, batch = small_pool_problem(seed=1)
  solver = bilevel.Pool(pool_size=3, inner_steps=2, lifetime=6, inner_lr=0.05, head_steps=5)
  state = solver.init(problem, jax.random.key(0), images)
  np.testing.assert_array_equal(state.age, [0, 2, 4])  # staggered over the lifetime from the start
  step = jax.jit(lambda s: solver.step(problem, s, batch))
  opt = solver.learner_transform()
  advance = jax.jit(lambda w, s, d, k: training.advance(lambda p, d: problem.inner_loss(p, d, k), w, s, d, opt, 2)[0])
  restarts = []
  for t in range(9):
    new_state, _ = step(state)
    k_fresh, k_inner = jax.random.split(state.key, 4)[1:3]
    fresh = jax.vmap(lambda k: problem.init_params(k, jnp.float64))(jax.random.split(k_fresh, 3))
    old_age = np.asarray(state.age)
    restarted = [i for i in range(3) if old_age[i] >= solver.lifetime]
    restarts.append(restarted)
    for i in range(3):
      new = jax.tree.map(lambda a: a[i], new_state.params)
      continued = advance(jax.tree.map(lambda a: a[i], state.params), jax.tree.map(lambda a: a[i], state.opt_state),
                          state.images, k_inner)
      if i in restarted:  # a fresh init (its moments reset too), trained inner_steps on D
        w0 = jax.tree.map(lambda a: a[i], fresh)
        expected = advance(w0, opt.init(w0), state.images, k_inner)
        assert int(new_state.age[i]) == solver.inner_steps
        assert max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(continued))) > 1e-3
      else:
        expected = continued
        assert int(new_state.age[i]) == old_age[i] + solver.inner_steps
      chex.assert_trees_all_close(new, expected, rtol=1e-12, atol=1e-15)
    assert sorted(np.asarray(new_state.age).tolist()) == [2, 4, 6]  # still staggered, evenly
    state = new_state
  # The oldest learner restarts at every step from the second on, each in turn.
  assert restarts == [[], [2], [1], [0], [2], [1], [0], [2], [1]]


@pytest.mark.slow
def test_pool_learner_params_is_the_oldest_learner():
  problem, images, batch = small_pool_problem(seed=2)
  solver = bilevel.Pool(pool_size=4, inner_steps=3, lifetime=100, head_steps=5)
  state = with_ages(solver.init(problem, jax.random.key(0), images), [30, 90, 10, 60])
  chex.assert_trees_all_equal(solver.learner_params(state), jax.tree.map(lambda a: a[1], state.params))
  assert any(float(jnp.abs(a[1] - a[3]).max()) > 0 for a in jax.tree.leaves(state.params))  # learners really differ
  new_state, metrics = solver.step(problem, state, batch)  # the metrics are the oldest learner's
  _, _, k_inner, _ = jax.random.split(state.key, 4)
  oldest = jax.tree.map(lambda a: a[1], new_state.params)
  assert float(metrics["inner_value"]) == pytest.approx(float(problem.inner_loss(oldest, state.images, k_inner)), rel=1e-12)
  # Another solver reports its one learner.
  single = bilevel.Implicit().init(problem, jax.random.key(0), images)
  assert bilevel.Implicit().learner_params(single) is single.params


@dataclasses.dataclass(frozen=True)
class RidgePoolProblem:
  """Oracle 1 as a problem the pool can run: every learner starts at the exact inner solution w*(D)."""

  D: jax.Array
  t: jax.Array
  B: jax.Array
  c: jax.Array
  head = heads_lib.RidgeHead()
  class_mask = np.ones((1, 2), bool)

  def inner_loss(self, w, images, key):
    return 0.5 * jnp.sum((images @ w - self.t) ** 2) + 0.5 * LAM * jnp.sum(w**2)

  def outer_loss(self, w, heads, batch):
    value = 0.5 * jnp.sum((self.B @ w - self.c) ** 2)
    return value, value[None]

  def features(self, w, x):  # only for the (unused) head fit of a ridge head
    return x * w[0]

  def init_params(self, key, dtype=jnp.float64):
    return ridge_oracle(self.D, self.t, self.B, self.c)[0].astype(dtype)

  def init_heads(self, key, dtype=jnp.float64):
    return ()


@pytest.mark.slow
def test_pool_implicit_hypergradient_at_a_converged_learner_matches_oracle():
  D, t, B, c, _, _ = ridge_problem(seed=4)
  problem = RidgePoolProblem(D, t, B, c)
  w_star, expected = ridge_oracle(D, t, B, c)
  M = D.T @ D + LAM * jnp.eye(4)
  lr = float(1.0 / jnp.linalg.eigvalsh(M).max())  # plain gradient steps at w* stay at w*
  solver = bilevel.Pool(pool_size=2, inner_steps=3, lifetime=1000, inner_optimizer="sgd", inner_lr=lr,
                        hypergradient="implicit", damping=0.0, cg_steps=50, cg_tol=1e-14, image_optimizer="sgd", image_lr=1.0)
  batch = bilevel.TaskBatch(jnp.zeros((1, 3, 4)), jnp.zeros((1, 3), jnp.int32))
  state = solver.init(problem, jax.random.key(0), D)
  new_state, metrics = jax.jit(lambda s: solver.step(problem, s, batch))(state)
  np.testing.assert_allclose(D - new_state.images, expected, rtol=1e-8, atol=1e-12)
  u = jnp.linalg.solve(M, B.T @ (B @ w_star - c))  # the adjoint, kept per learner for the next warm start
  np.testing.assert_allclose(new_state.adjoint, jnp.stack([u, u]), rtol=1e-8, atol=1e-12)
  assert float(metrics["cg_residual"]) < 1e-12 and float(metrics["cg_negative_curvature"]) == 0.0
  # Warm-started at the right adjoint, the next step's CG has nothing left to do.
  _, again = jax.jit(lambda s: solver.step(problem, s, batch))(new_state._replace(images=D))
  assert float(again["cg_steps"]) == 0.0


@pytest.mark.slow
def test_a_pool_of_mixed_learners_follows_the_mean_of_its_groups():
  """members: each (rule, K) group is its own vmapped stack, and D follows the mean hypergradient over every learner.

  With a ridge head and AE / score-matching groups nothing depends on the step's keys, so each group's part of the
  image gradient is what a one-group pool of the same learners gives (SGD on D at lr 1: the step is -g).
  """
  problem, images, batch = small_pool_problem(n_hidden=3)
  options = dict(inner_steps=2, lifetime=1000, inner_lr=0.05, image_optimizer="sgd", image_lr=1.0)
  solver = bilevel.Pool(pool_size=6, members="ae:3,ae:2,score_matching:4", **options)
  assert solver.member_groups == (("ae", 3), ("ae", 2), ("score_matching", 4)) and solver.n_members == 2
  state = solver.init(problem, jax.random.key(0), images)
  assert [p.W.shape for p in state.params] == [(2, 5, 3), (2, 5, 2), (2, 5, 4)]
  for age in state.age:  # every group covers the lifetime evenly
    np.testing.assert_array_equal(age, [0, 500])
  step = jax.jit(lambda s: solver.step(problem, s, batch))
  state = step(state)[0]
  new_state, metrics = step(state)

  parts, losses = [], []
  for g, sub_problem in enumerate(solver.group_problems(problem)):
    single = bilevel.Pool(pool_size=2, **options)
    sub_state = state._replace(params=state.params[g], opt_state=state.opt_state[g], age=state.age[g],
                               adjoint=state.adjoint[g], image_opt_state=single.image_transform().init(images))
    sub_new, sub_metrics = single.step(sub_problem, sub_state, batch)
    chex.assert_trees_all_close(sub_new.params, new_state.params[g], rtol=1e-12, atol=1e-15)
    parts.append(state.images - sub_new.images)
    losses.append(float(sub_metrics["outer_loss"]))
  assert float(jnp.abs(parts[0] - parts[2]).max()) > 1e-6  # the groups really pull D different ways
  np.testing.assert_allclose(state.images - new_state.images, sum(parts) / 3, rtol=1e-10, atol=1e-14)
  assert float(metrics["outer_loss"]) == pytest.approx(sum(losses) / 3, rel=1e-10)
  # The run reports, probes and saves the oldest learner of the first group: the problem's own.
  chex.assert_trees_all_equal(solver.learner_params(new_state), jax.tree.map(lambda a: a[1], new_state.params[0]))
  assert solver.to_config()["members"] == "ae:3,ae:2,score_matching:4"
  assert bilevel.get_solver(**solver.to_config()) == solver


def test_pool_members_errors():
  problem, images, _ = small_pool_problem(n_hidden=3)
  with pytest.raises(ValueError, match=r"members entry 'ae' must be RULE:K with K a positive integer"):
    bilevel.Pool(members="ae")
  with pytest.raises(ValueError, match=r"unknown members scoring rule 'sliced'"):
    bilevel.Pool(members="ae:3,sliced:3")
  with pytest.raises(ValueError, match=r"members='ae:3,ae:3' names a group twice"):
    bilevel.Pool(members="ae:3,ae:3")
  with pytest.raises(ValueError, match=r"pool_size \(8\) must be a multiple of the 3 member groups"):
    bilevel.Pool(pool_size=8, members="ae:3,ae:2,ae:4")
  with pytest.raises(ValueError, match=r"first group of members='ae:2,ae:3' .* must be the problem's own, ae:3"):
    bilevel.Pool(pool_size=2, members="ae:2,ae:3").init(problem, jax.random.key(0), images)
  with pytest.raises(ValueError, match=r"mixes learners of the GRBM family; this problem's learner is NoneType"):
    bilevel.Pool(pool_size=2, members="ae:2,ae:3").group_problems(RidgePoolProblem(*ridge_problem()[:4]))


def test_pool_option_errors():
  with pytest.raises(ValueError, match=r"lifetime \(5\) must be at least inner_steps \(10\)"):
    bilevel.Pool(inner_steps=10, lifetime=5)
  with pytest.raises(ValueError, match=r"min_age \(100\) must be below lifetime \(100\): no learner would count"):
    bilevel.Pool(lifetime=100, min_age=100)
  with pytest.raises(ValueError, match=r"unknown hypergradient 'exact'; valid options are \['implicit', 'truncated'\]"):
    bilevel.Pool(hypergradient="exact")
  with pytest.raises(ValueError, match=r"unknown inner_optimizer 'rmsprop'; valid options are \['adam', 'sgd'\]"):
    bilevel.Pool(inner_optimizer="rmsprop")
  with pytest.raises(ValueError, match="pool_size must be a positive integer; got 0"):
    bilevel.Pool(pool_size=0)
  with pytest.raises(ValueError, match="min_age must be a non-negative integer; got -1"):
    bilevel.Pool(min_age=-1)
  with pytest.raises(TypeError, match=r"unknown option\(s\) \['unroll_steps'\] for solver 'pool'"):
    bilevel.get_solver("pool", unroll_steps=5)
  assert bilevel.get_solver("pool", lifetime=50, inner_steps=5).lifetime == 50


# ---------------------------------------------------------------------------
# Options.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(bilevel.SOLVERS))
def test_a_solver_name_and_an_instance_are_the_same_solver(name):
  cls = bilevel.SOLVERS[name]
  assert bilevel.get_solver(name) == cls() and bilevel.get_solver(cls()) == cls()
  assert cls.default_steps == {"unrolled": 300, "pool": 500}.get(name, 600)
  assert cls.default_head == {"unrolled": "ridge", "pool": "ridge_ce"}.get(name, "softmax")


def test_solver_defaults_are_distills():
  geometric = bilevel.mu_schedule("geometric", 0.01, final=100.0, steps=2000)
  assert bilevel.Penalty().mu == geometric and bilevel.ValueFunction().mu == geometric
  unrolled = bilevel.Unrolled()
  assert (unrolled.unroll_steps, unrolled.inner_optimizer, unrolled.inner_lr) == (200, "sgd", 0.02)


def test_solver_recipes_are_what_a_distilled_set_ships():
  state = lambda solver: solver.init(ToyProblem(), jax.random.key(0), jnp.zeros((1, 1)))
  given = udd_jax.Recipe("sgd", 0.1, 50, 0.5)
  for name in ("penalty", "value_function", "implicit"):
    solver = bilevel.get_solver(name)
    assert solver.recipe(state(solver), 0.05) == dataclasses.replace(udd_jax.STANDARD_RECIPE, init_scale=0.05)
    assert solver.recipe(state(solver), 0.05, given) == given
  # The unrolled solver ships its own unroll with the step sizes it learned, whatever was given.
  by_name, by_instance = bilevel.get_solver("unrolled"), bilevel.Unrolled()
  recipe = by_name.recipe(state(by_name), 0.05, given)
  assert recipe == by_instance.recipe(state(by_instance), 0.05)
  assert (recipe.inner_optimizer, recipe.steps, recipe.init_scale) == ("sgd", 200, 0.05)
  np.testing.assert_allclose(recipe.inner_lr, np.full(200, 0.02), rtol=1e-12)
  pool = bilevel.get_solver("pool")
  assert pool.recipe(state(pool), 0.05, given) == udd_jax.Recipe("adam", 3e-3, 4000, 0.05, until_converged=True)


def test_solver_option_errors():
  valid = r"\['implicit', 'penalty', 'pool', 'unrolled', 'value_function'\]"
  with pytest.raises(ValueError, match=r"unknown solver 'newton'; valid options are " + valid):
    bilevel.get_solver("newton")
  with pytest.raises(TypeError, match=r"unknown option\(s\) \['cg_iters'\] for solver 'implicit'"):
    bilevel.get_solver("implicit", cg_iters=3)
  with pytest.raises(ValueError, match="unknown inner_optimizer 'rmsprop'"):
    bilevel.Unrolled(inner_optimizer="rmsprop")
  with pytest.raises(ValueError, match="n_inits"):
    bilevel.Unrolled(n_inits=0)
  with pytest.raises(ValueError, match="mu must be a finite non-negative"):
    bilevel.Penalty(mu=-1.0)
  with pytest.raises(ValueError, match="needs both final and steps"):
    bilevel.mu_schedule("linear", 1.0)
  with pytest.raises(ValueError, match="unknown head 'svm'"):
    bilevel.make_problem(n_visible=4, n_hidden=2, n_classes=3, head="svm")
  with pytest.raises(ValueError, match="unknown inner loss 'vae'"):
    bilevel.make_problem(n_visible=4, n_hidden=2, n_classes=3, inner="vae")
  problem = bilevel.make_problem(n_visible=4, n_hidden=2, n_classes=3)
  with pytest.raises(ValueError, match="images has 5 features but params.W expects 4"):
    bilevel.Penalty().init(problem, jax.random.key(0), jnp.zeros((3, 5)))


@pytest.mark.slow
@pytest.mark.parametrize("inner", udd_jax.INNER_LOSSES)
def test_every_inner_loss_works_with_every_solver(inner):
  x, tasks, n_classes = digits_tasks(1)
  problem = bilevel.make_problem(n_visible=64, n_hidden=8, n_classes=n_classes, inner=inner, init_scale=0.1)
  batch = bilevel.sample_batch(jax.random.key(1), tasks, 32)
  for name in SOLVER_CASES:
    solver = make_solver(name)
    state = solver.init(problem, jax.random.key(0), x[:10])
    new_state, metrics = jax.jit(solver.step, static_argnums=0)(problem, state, batch)
    assert all(bool(jnp.isfinite(v)) for v in metrics.values()), (name, metrics)
    assert float(jnp.abs(new_state.images - state.images).max()) > 0, name


@pytest.mark.slow
def test_tasks_from_different_datasets(real_data_dir):
  """MNIST, Fashion-MNIST and USPS (resized to 28x28) as three tasks sharing one D."""
  tasks = []
  for name in ("mnist", "fashion_mnist", "usps"):
    (x, y), _ = udd_jax.load_dataset(name, data_dir=real_data_dir)
    x = udd_jax.resize_images(x[:2000], (28, 28))
    tasks.append((jnp.asarray(x.reshape(len(x), -1)), jnp.asarray(y[:2000])))
  assert tasks[2][0].shape == (2000, 784)
  problem = bilevel.make_problem(n_visible=784, n_hidden=16, n_classes=[10, 10, 10], init_scale=0.1)
  solver = bilevel.get_solver("penalty", mu=0.01, model_lr=3e-2)
  state = solver.init(problem, jax.random.key(0), tasks[0][0][:10])
  step = jax.jit(solver.step, static_argnums=0)
  losses = []
  for i in range(40):
    batch = bilevel.sample_batch(jax.random.key(i), tasks, 64)
    assert batch.x.shape == (3, 64, 784)
    state, metrics = step(problem, state, batch)
    losses.append(float(metrics["outer_loss"]))
  # Three 10-class tasks start at 3 log(10) = 6.91 and must all improve.
  assert losses[0] == pytest.approx(3 * np.log(10), rel=1e-3)
  assert np.mean(losses[-5:]) < 0.9 * losses[0]


def test_unrolled_solver_with_segment_remat_takes_the_same_steps():
  x, tasks, n_classes = digits_tasks(1)
  problem = bilevel.make_problem(n_visible=64, n_hidden=8, n_classes=n_classes, init_scale=0.1, head="ridge")
  batch = bilevel.sample_batch(jax.random.key(1), tasks, 32)
  states = []
  for remat in (False, "segments"):
    solver = bilevel.Unrolled(unroll_steps=12, remat=remat)
    state = solver.init(problem, jax.random.key(0), x[:10])
    for _ in range(2):
      state, _ = solver.step(problem, state, batch)
    states.append(state)
  np.testing.assert_allclose(states[1].images, states[0].images, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(states[1].log_step_sizes, states[0].log_step_sizes, rtol=1e-10, atol=1e-12)
  with pytest.raises(ValueError, match="unknown remat 'yes'"):
    bilevel.Unrolled(remat="yes")


def test_spd_solve_one_system_at_a_time_equals_jax_solve_and_its_gradient():
  """The ridge head's solve (sequential under vmap) against jax.scipy.linalg.solve, values and gradients, float64."""
  spd_solve = heads_lib.spd_solve
  x = jax.random.normal(jax.random.key(0), (3, 2, 7, 5))  # batch dims 3 x 2 of (7, 5) designs
  b = jax.random.normal(jax.random.key(1), (3, 2, 5, 4))

  def loss(solve, x, b):
    a = jnp.swapaxes(x, -1, -2) @ x + 0.1 * jnp.eye(5)
    return jnp.sum(jnp.sin(jax.vmap(jax.vmap(solve))(a, b)))

  reference = lambda a, rhs: jax.scipy.linalg.solve(a, rhs, assume_a="pos")
  np.testing.assert_allclose(jax.jit(loss, static_argnums=0)(spd_solve, x, b), loss(reference, x, b), rtol=1e-12)
  for argnum in (1, 2):
    np.testing.assert_allclose(jax.grad(loss, argnum)(spd_solve, x, b), jax.grad(loss, argnum)(reference, x, b),
                               rtol=1e-10, atol=1e-12)


def test_ridge_ce_head_is_the_cross_entropy_of_the_fitted_ridge_scores():
  """head="ridge_ce": the ridge fit of head="ridge", judged by softmax CE at temperature 0.1 (absent classes masked)."""
  head = heads_lib.get_head("ridge_ce")
  feats = jax.random.normal(jax.random.key(0), (40, 6))
  labels = jax.random.randint(jax.random.key(1), (40,), 0, 3)
  mask = jnp.array([True, True, True, False])
  design = np.concatenate([np.asarray(feats), np.ones((40, 1))], axis=1)
  targets = np.eye(4)[np.asarray(labels)]
  beta = np.linalg.solve(design.T @ design / 40 + 1e-3 * np.eye(7), design.T @ targets / 40)
  logits = (design @ beta / 0.1)[:, :3]
  expected = np.mean(np.log(np.sum(np.exp(logits), axis=1)) - logits[np.arange(40), np.asarray(labels)])
  np.testing.assert_allclose(head.loss((), feats, labels, mask), expected, rtol=1e-10)
  assert heads_lib.get_head("ridge").temperature is None


def test_logistic_head_reaches_its_optimum_and_its_gradient_is_the_optimal_value_s():
  """head="logistic": Newton-CG to the minimiser of CE + l2/2 ||beta||^2, differentiated by the envelope theorem.

  Its loss's gradient with respect to the features, which never differentiates through the
  Newton steps, equals the derivative of the optimal value min_beta L(f, beta) (central
  differences of fits to a gradient below 1e-9, where the line search can no longer see a
  decrease in float64) along random directions; padded classes stay zero.
  """
  head = heads_lib.get_head("logistic")
  precise = dataclasses.replace(head, newton_steps=25, cg_steps=60)
  feats = jax.random.normal(jax.random.key(0), (60, 5))
  labels = jax.random.randint(jax.random.key(1), (60,), 0, 3)
  mask = jnp.array([True, True, True, False])
  beta = precise.fit(feats, labels, mask)
  assert precise.gradient_norm(beta, feats, labels, mask) < 1e-9 and jnp.all(beta[:, 3] == 0.0)
  start = dataclasses.replace(head, newton_steps=0)
  start_norm = start.gradient_norm(start.fit(feats, labels, mask), feats, labels, mask)
  assert head.gradient_norm(head.fit(feats, labels, mask), feats, labels, mask) < 0.05 * start_norm  # the default 5
  grad = jax.grad(lambda f: precise.loss((), f, labels, mask))(feats)
  for k in range(3):
    v = jax.random.normal(jax.random.key(10 + k), feats.shape)
    eps = 1e-5
    value = lambda f: precise.loss((), f, labels, mask)
    fd = (value(feats + eps * v) - value(feats - eps * v)) / (2 * eps)
    np.testing.assert_allclose(jnp.vdot(grad, v), fd, rtol=1e-7)
  assert head.predict((), feats, mask, fit_feats=feats, fit_labels=labels).max() < 3
