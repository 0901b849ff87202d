"""The float32 tier: the key numerical checks of test_bilevel.py run in float32 against float64 oracles.

x64 is on for every test (conftest.py), but the library computes in the dtype of its inputs, so
float32 inputs run the float32 path an accelerator runs. The oracles stay float64. Each tolerance
says why it is what it is: float32's unit round-off is 6e-8, and an error grows with the condition
number of the system it goes through.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from test_bilevel import LAM, RidgePoolProblem, ToyProblem, ridge_oracle, ridge_problem, run_solver

from udd_jax import bilevel, training

F32 = jnp.float32


def f32(*arrays):
  return tuple(jnp.asarray(a, F32) for a in arrays)


def ridge32(seed):
  """Oracle 1 (test_bilevel.py) with float32 data, and its float64 answer."""
  D, t, B, c, _, _ = ridge_problem(seed=seed)
  w_star, expected = ridge_oracle(D, t, B, c)
  D32, t32, B32, c32 = f32(D, t, B, c)
  inner = lambda w, D: 0.5 * jnp.sum((D @ w - t32) ** 2) + 0.5 * LAM * jnp.sum(w**2)
  outer = lambda w: 0.5 * jnp.sum((B32 @ w - c32) ** 2)
  return (D, t, B, c), (D32, inner, outer), w_star, expected


def condition_number(D):
  return float(np.linalg.cond(np.asarray(D.T @ D + LAM * jnp.eye(D.shape[1]))))


def assert_float32(*trees):
  for leaf in jax.tree.leaves(trees):
    assert leaf.dtype == F32, leaf.dtype


def test_hvp_matches_the_explicit_hessian():
  (D, t, _, _), (D32, inner, _), w_star, _ = ridge32(seed=0)
  hessian = D.T @ D + LAM * jnp.eye(4)  # of the ridge inner loss, float64
  directions = jax.random.normal(jax.random.key(0), (3, 4))
  got = jnp.stack([bilevel.hvp(inner, *f32(w_star, D32, v)) for v in directions])
  assert_float32(got)
  # A few sums of 7 float32 products per entry: errors of a few ulps, so 1e-5 relative to the largest
  # entry (against 1e-12 in float64); checked per entry against max |Hv| for entries near zero.
  want = directions @ hessian.T
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_hvp_on_the_grbm_inner_loss_matches_the_explicit_hessian():
  x = jax.random.normal(jax.random.key(1), (6, 5))
  problem = bilevel.make_problem(n_visible=5, n_hidden=3, n_classes=2, init_scale=0.5)
  flat, unravel = ravel_pytree(problem.init_params(jax.random.key(2), jnp.float64))
  f = lambda p, x: problem.inner_loss(unravel(p), x, jax.random.key(3))
  v = jax.random.normal(jax.random.key(4), flat.shape)
  want = jax.jit(jax.hessian(f))(flat, x) @ v  # the explicit 23 x 23 Hessian, float64
  got = jax.jit(lambda *args: bilevel.hvp(f, *args))(*f32(flat, x, v))
  assert_float32(got)
  # Nonlinear (the hidden units' second derivatives), but one forward-over-reverse pass of a few
  # small matmuls: tens of ulps, so 1e-5 relative to the largest entry; a TF32 or bf16 matmul
  # (~1e-3) would fail it.
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_conjugate_gradient_solves_an_spd_system():
  rng = np.random.default_rng(3)
  q = rng.normal(size=(6, 6))
  a = q @ q.T + 0.5 * np.eye(6)
  b = rng.normal(size=6)
  x_star = np.linalg.solve(a, b)
  cond = np.linalg.cond(a)
  assert 10 < cond < 1e3  # the tolerance below is sized for this condition number
  a32, b32 = f32(a, b)
  x, steps, negative, residual = bilevel.implicit_diff.conjugate_gradient(lambda v: a32 @ v, b32, tol=1e-6, max_steps=50)
  assert_float32(x, residual)
  assert not negative and float(residual) <= 1e-6
  # The relative forward error of a solve is at most cond * the relative residual (1e-6 here, with
  # cond ~ 4e1: ~4e-5), doubled for float32 round-off in the matvec; in float64 the test asks 1e-9.
  assert np.linalg.norm(x - x_star) / np.linalg.norm(x_star) < 2 * cond * 1e-6


@pytest.mark.parametrize("seed", [0, 1])
def test_implicit_hypergradient_matches_the_closed_form(seed):
  (D, *_), (D32, inner, outer), w_star, expected = ridge32(seed)
  w32 = jnp.asarray(w_star, F32)
  g, stats = bilevel.implicit_hypergradient(inner, w32, D32, jax.grad(outer)(w32), damping=0.0, tol=1e-6, max_steps=100)
  assert_float32(g)
  assert float(stats.residual) < 1e-5 and not stats.negative_curvature
  # The adjoint solve goes through D^T D + lam I: its error is at most the condition number (below
  # 1e2 here) times the CG residual (1e-6), so 1e-4 relative to the largest entry (1e-9 in float64).
  assert condition_number(D) < 1e2
  np.testing.assert_allclose(g, expected, rtol=1e-4, atol=1e-4 * float(jnp.abs(expected).max()))


def test_implicit_argmin_custom_vjp_matches_the_closed_form():
  _, (D32, inner, outer), _, expected = ridge32(seed=1)
  t32 = jnp.asarray(ridge_problem(seed=1)[1], F32)
  solve = lambda w0, D: jnp.linalg.solve(D.T @ D + LAM * jnp.eye(4, dtype=D.dtype), D.T @ t32)  # exact, in float32
  argmin = bilevel.implicit_argmin(inner, solve, damping=0.0, tol=1e-6, max_steps=100)
  g = jax.grad(lambda D: outer(argmin(jnp.zeros(4, F32), D)))(D32)
  assert_float32(g)
  # As the implicit hypergradient above: the same adjoint solve behind a custom_vjp.
  np.testing.assert_allclose(g, expected, rtol=1e-4, atol=1e-4 * float(jnp.abs(expected).max()))


def test_unrolled_hypergradient_with_many_steps_matches_the_closed_form():
  (D, *_), (D32, inner, outer), _, expected = ridge32(seed=2)
  M = D.T @ D + LAM * jnp.eye(4)
  steps = jnp.full((3000,), 1.0 / jnp.linalg.eigvalsh(M).max(), F32)
  g = jax.grad(lambda D: outer(training.unroll(inner, jnp.zeros(4, F32), D, steps)))(D32)
  assert_float32(g)
  # Backprop through 3000 gradient steps accumulates round-off, but each step contracts (condition
  # number ~ 6 here) and damps the earlier steps' errors: 1e-4 relative to the largest entry,
  # against 1e-7 in float64.
  assert condition_number(D) < 1e1
  np.testing.assert_allclose(g, expected, rtol=1e-4, atol=1e-4 * float(jnp.abs(expected).max()))


@pytest.mark.parametrize("name", ["implicit", "pool"])
def test_implicit_solver_steps_match_the_closed_form(name):
  D, t, B, c, _, _ = ridge_problem(seed=4)
  w_star, expected = ridge_oracle(D, t, B, c)
  M = D.T @ D + LAM * jnp.eye(4)
  lr = float(1.0 / jnp.linalg.eigvalsh(M).max())
  problem = RidgePoolProblem(*f32(D, t, B, c))  # every learner starts at w*(D), rounded to float32
  sgd = dict(inner_optimizer="sgd", inner_lr=lr, damping=0.0, cg_steps=50, cg_tol=1e-6, image_optimizer="sgd", image_lr=1.0)
  if name == "pool":
    solver = bilevel.Pool(pool_size=2, inner_steps=3, lifetime=1000, hypergradient="implicit", **sgd)
  else:
    solver = bilevel.Implicit(inner_steps=3, inner_tol=0.0, warm_start_adjoint=False, **sgd)
  batch = bilevel.TaskBatch(jnp.zeros((1, 3, 4), F32), jnp.zeros((1, 3), jnp.int32))
  state = solver.init(problem, jax.random.key(0), problem.D)
  new_state, metrics = jax.jit(lambda s: solver.step(problem, s, batch))(state)
  assert_float32(new_state.images)
  assert float(metrics["cg_residual"]) < 1e-5 and float(metrics["cg_negative_curvature"]) == 0.0
  # One SGD step of size 1 on D: D - D' is the hypergradient. Tolerance as for the implicit
  # hypergradient (1e-4), doubled for the rounding of D - D' and the learner's three float32 steps.
  np.testing.assert_allclose(problem.D - new_state.images, expected, rtol=2e-4, atol=2e-4 * float(jnp.abs(expected).max()))
  np.testing.assert_allclose(jnp.ravel(new_state.adjoint)[:4], jnp.linalg.solve(M, B.T @ (B @ w_star - c)), rtol=2e-4)


@pytest.mark.parametrize("solver_name", ["penalty", "value_function"])
def test_penalty_and_value_function_converge_in_float32(solver_name):
  mu = 10.0
  lr = 0.5 / (1.0 + 2.0 * mu)
  options = dict(mu=mu, image_optimizer="sgd", image_lr=lr, model_optimizer="sgd", model_lr=lr)
  if solver_name == "value_function":
    options.update(inner_steps=1, inner_optimizer="sgd", inner_lr=1.0)
  state, _ = run_solver(bilevel.get_solver(solver_name, **options), ToyProblem(), jnp.zeros((1, 1), F32), 2000)
  assert_float32(state.images, state.params)
  # The fixed point theta = -1, w = ((1 - mu), (-3 - mu)) / (1 + mu) of a contraction: float32 iterates
  # settle within a few ulps of it, so 1e-5 absolute (values of order 1; 1e-8 in float64).
  np.testing.assert_allclose(float(state.images[0, 0]), -1.0, atol=1e-5)
  np.testing.assert_allclose(state.params, [(1 - mu) / (1 + mu), (-3 - mu) / (1 + mu)], atol=1e-5)


def test_the_adjoint_computation_asks_for_highest_matmul_precision():
  _, (D32, inner, outer), w_star, _ = ridge32(seed=0)
  w32 = jnp.asarray(w_star, F32)
  args = (w32, D32, jax.grad(outer)(w32))

  def hlo(precision):
    fn = lambda w, D, v: bilevel.implicit_hypergradient(inner, w, D, v, precision=precision)
    return jax.jit(fn).lower(*args).as_text()

  # Every dot of the solve and the mixed product at HIGHEST by default (what an accelerator needs,
  # docs/CORRECTNESS.md); precision=None leaves JAX's default on the Hessian-vector products.
  assert bilevel.implicit_diff.PRECISION == "highest"
  assert "DEFAULT" not in hlo("highest") and "HIGHEST" in hlo("highest")
  assert "DEFAULT" in hlo(None)
  if jax.default_backend() == "cpu":  # where the setting changes no number
    default = bilevel.implicit_hypergradient(inner, *args)
    ambient = bilevel.implicit_hypergradient(inner, *args, precision=None)
    jax.tree.map(np.testing.assert_array_equal, default, ambient)
