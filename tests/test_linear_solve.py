"""The shared conjugate gradients (udd_jax/training/linear_solve.py) against dense solves (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from udd_jax.training import linear_solve

N = 12


def spd_system(seed=0):
  """An SPD matrix with badly scaled rows and columns (cond ~1e6), so a Jacobi preconditioner pays, and b."""
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(N, N))
  scale = np.logspace(-1.5, 1.5, N)
  a = scale[:, None] * (q @ q.T / N + 0.5 * np.eye(N)) * scale[None, :]
  return jnp.asarray(a), jnp.asarray(rng.normal(size=N))


def as_tree(v):
  return {"head": v[:5].reshape(5, 1), "tail": v[5:]}


def as_vector(tree):
  return jnp.concatenate([tree["head"].ravel(), tree["tail"]])


def tree_matvec(a):
  return lambda t: as_tree(a @ as_vector(t))


def test_the_system_is_badly_conditioned():
  a, _ = spd_system()
  assert np.linalg.cond(a) > 1e5 and np.all(np.linalg.eigvalsh(a) > 0)


@pytest.mark.parametrize("preconditioned", [False, True])
def test_cg_on_a_pytree_matches_a_dense_solve(preconditioned):
  a, b = spd_system()
  inverse_diagonal = as_tree(1.0 / jnp.diagonal(a))
  precondition = (lambda r: jax.tree.map(jnp.multiply, inverse_diagonal, r)) if preconditioned else None
  solution = jax.jit(lambda b: linear_solve.conjugate_gradient(
      tree_matvec(a), b, tol=1e-13, max_steps=200, precondition=precondition))(as_tree(b))
  want = jnp.linalg.solve(a, b)
  np.testing.assert_allclose(as_vector(solution.x), want, rtol=1e-8, atol=1e-8 * float(jnp.abs(want).max()))
  assert not solution.negative_curvature and float(solution.residual) <= 1e-13
  true_residual = jnp.linalg.norm(a @ as_vector(solution.x) - b) / jnp.linalg.norm(b)
  assert float(true_residual) < 1e-10
  assert 1 <= int(solution.num_steps) < 200


def test_the_jacobi_preconditioner_saves_iterations():
  a, b = spd_system()
  plain = linear_solve.conjugate_gradient(lambda v: a @ v, b, tol=1e-10, max_steps=500)
  jacobi = linear_solve.conjugate_gradient(lambda v: a @ v, b, tol=1e-10, max_steps=500,
                                           precondition=lambda r: r / jnp.diagonal(a))
  # Jacobi scaling leaves a well-conditioned system: N iterations at most, where plain CG's rounding needs ~2N.
  assert int(jacobi.num_steps) <= N < int(plain.num_steps)


def test_the_exact_inverse_as_preconditioner_solves_in_one_step():
  a, b = spd_system()
  solution = linear_solve.conjugate_gradient(lambda v: a @ v, b, tol=1e-10, max_steps=50,
                                             precondition=lambda r: jnp.linalg.solve(a, r))
  assert int(solution.num_steps) == 1
  np.testing.assert_allclose(solution.x, jnp.linalg.solve(a, b), rtol=1e-8)


def test_an_absolute_tolerance_stops_the_solve_there():
  a, b = spd_system(1)
  atol = 1e-3 * float(jnp.linalg.norm(b))
  solution = linear_solve.conjugate_gradient(lambda v: a @ v, b, atol=jnp.asarray(atol), max_steps=500,
                                             precondition=lambda r: r / jnp.diagonal(a))
  assert float(solution.residual) * float(jnp.linalg.norm(b)) <= atol
  one_fewer = linear_solve.conjugate_gradient(lambda v: a @ v, b, atol=atol, max_steps=int(solution.num_steps) - 1,
                                              precondition=lambda r: r / jnp.diagonal(a))
  assert float(one_fewer.residual) * float(jnp.linalg.norm(b)) > atol  # it stopped at the first iterate that met it


def test_the_iteration_budget_is_respected():
  a, b = spd_system()
  solution = linear_solve.conjugate_gradient(lambda v: a @ v, b, tol=1e-14, max_steps=3)
  assert int(solution.num_steps) == 3 and float(solution.residual) > 1e-14


def indefinite_system():
  """``Q diag(4, 3, 2, 1, 0.5, -1) Q^T`` and a b with most of its weight on the positive eigenvectors."""
  rng = np.random.default_rng(2)
  q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  eigenvalues = np.asarray([4.0, 3.0, 2.0, 1.0, 0.5, -1.0])
  b = q @ np.asarray([1.0, 1.0, 1.0, 1.0, 1.0, 0.3])
  return jnp.asarray(q @ np.diag(eigenvalues) @ q.T), jnp.asarray(b), jnp.asarray(q[:, -1])


@pytest.mark.parametrize("preconditioned", [False, True])
def test_negative_curvature_ends_the_solve_where_it_is(preconditioned):
  a, b, _ = indefinite_system()
  precondition = (lambda r: r / jnp.abs(jnp.diagonal(a))) if preconditioned else None
  solve = lambda steps: linear_solve.conjugate_gradient(lambda v: a @ v, b, tol=1e-12, max_steps=steps,
                                                        precondition=precondition)
  stopped = solve(50)
  assert stopped.negative_curvature and 2 <= int(stopped.num_steps) < 6
  assert np.all(np.isfinite(stopped.x))
  # A later iteration that meets p^T A p <= 0 takes no step: the iterate of the one before.
  before = solve(int(stopped.num_steps) - 1)
  assert not before.negative_curvature
  np.testing.assert_array_equal(stopped.x, before.x)


def test_negative_curvature_at_the_first_iteration_takes_one_scaled_step():
  a, _, negative_direction = indefinite_system()
  b = negative_direction  # b^T A b = -||b||^2 < 0
  solution = linear_solve.conjugate_gradient(lambda v: a @ v, b, tol=1e-12, max_steps=50)
  assert solution.negative_curvature and int(solution.num_steps) == 1
  np.testing.assert_allclose(solution.x, b * jnp.linalg.norm(b) / jnp.linalg.norm(a @ b), rtol=1e-12)
