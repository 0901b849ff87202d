"""The Gauss-Newton curvature of the implicit hypergradient (float64).

The tied AE's loss is ``(1/n) * 1/2 ||r||^2``; its Gauss-Newton matrix ``G = (1/n) J^T J`` is
positive semi-definite where the Hessian, at a learner that is not at a minimum, is not.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import udd_jax
from udd_jax import bilevel, experiment, training
from udd_jax import inner as inner_lib
from udd_jax.bilevel import implicit_diff

DAMPING = 0.1


@functools.cache
def ae_at_a_learner_that_is_not_converged(seed=0, n=6, d=4, k=3, steps=20):
  """A tiny AE after 20 Adam steps: gradient norm ~0.4, Hessian eigenvalues down to about -0.4.

  Returns the learner ``w``, the data ``x``, the loss ``f(w, x)``, its residual map and the
  ravel / unravel pair of ``w``.
  """
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(n, d)))
  learner = inner_lib.GRBMLearner("ae")
  key = jax.random.key(0)
  f = lambda p, x: learner.loss(p, x, key)
  residuals = lambda p, x: tuple(learner.least_squares(p, x, key))
  w0 = learner.init(jax.random.key(seed), d, k, init_scale=0.5, dtype=jnp.float64)
  opt = optax.adam(3e-2)
  w = training.inner_solve(lambda p: f(p, x), w0, opt.init(w0), opt, max_steps=steps, tol=0.0).params
  flat, unravel = ravel_pytree(w)
  return w, x, f, residuals, flat, unravel


def dense(matvec, flat, unravel):
  """The matrix of a linear map on parameter pytrees, column by column."""
  return jax.jit(jax.vmap(lambda e: ravel_pytree(matvec(unravel(e)))[0], out_axes=1))(jnp.eye(flat.size))


def dense_hessian(f, x, flat, unravel):
  return jax.jit(jax.hessian(lambda z: f(unravel(z), x)))(flat)


# ---------------------------------------------------------------------------
# The learner's least-squares form.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, sigma2", [("ae", 1.0), ("ae", 0.3), ("denoising_score_matching", 1.0)])
def test_least_squares_is_the_loss(name, sigma2):
  rng = np.random.default_rng(1)
  learner = inner_lib.GRBMLearner(name, sigma2=sigma2)
  params = learner.init(jax.random.key(2), 5, 3, init_scale=0.5, dtype=jnp.float64)
  params = params._replace(b=jnp.asarray(rng.normal(size=3)), a=jnp.asarray(rng.normal(size=5)))
  x, key = jnp.asarray(rng.normal(size=(7, 5))), jax.random.key(3)
  r, scale = learner.least_squares(params, x, key)
  assert r.shape == (7, 5) and scale == pytest.approx(1 / 7)
  np.testing.assert_allclose(scale * 0.5 * jnp.sum(r**2), learner.loss(params, x, key), rtol=1e-14)
  problem = bilevel.make_problem(n_visible=5, n_hidden=3, n_classes=2, inner=name, sigma2=sigma2)
  np.testing.assert_array_equal(problem.inner_least_squares(params, x, key).residuals, r)


def test_score_matching_and_a_plain_learner_have_no_least_squares_form():
  params = udd_jax.init_params(jax.random.key(0), 4, 2, dtype=jnp.float64)
  x, key = jnp.ones((3, 4)), jax.random.key(1)
  assert inner_lib.GRBMLearner("score_matching").least_squares(params, x, key) is None
  assert inner_lib.InnerLearner.least_squares(inner_lib.GRBMLearner("ae"), params, x, key) is None  # the default


# ---------------------------------------------------------------------------
# The Gauss-Newton-vector product and the matrix it multiplies by.
# ---------------------------------------------------------------------------


def test_gnvp_is_the_jacobian_product():
  w, x, _, residuals, flat, unravel = ae_at_a_learner_that_is_not_converged()
  J = jax.jit(jax.jacfwd(lambda z: residuals(unravel(z), x)[0].ravel()))(flat)
  scale = residuals(w, x)[1]
  t = jnp.asarray(np.random.default_rng(5).normal(size=flat.size))
  got = ravel_pytree(implicit_diff.gnvp(residuals, w, x, unravel(t)))[0]
  np.testing.assert_allclose(got, scale * (J.T @ (J @ t)), rtol=1e-10, atol=1e-12)
  assert float(jnp.linalg.norm(got)) > 1e-3  # not trivially zero


def test_gauss_newton_is_psd_where_the_hessian_is_indefinite():
  w, x, f, residuals, flat, unravel = ae_at_a_learner_that_is_not_converged()
  assert optax.tree.norm(jax.grad(f)(w, x)) > 0.1  # not stationary: Adam's learners never are
  G = dense(lambda t: implicit_diff.gnvp(residuals, w, x, t), flat, unravel)
  np.testing.assert_allclose(G, G.T, atol=1e-12)
  assert np.linalg.eigvalsh(G).min() >= -1e-10
  H = dense_hessian(f, x, flat, unravel)
  assert np.linalg.eigvalsh(H).min() < -0.1  # why the Gauss-Newton matrix is there


def test_cg_converges_on_gauss_newton_where_hessian_cg_meets_negative_curvature():
  w, x, f, residuals, flat, unravel = ae_at_a_learner_that_is_not_converged()
  v = unravel(jnp.asarray(np.random.default_rng(6).normal(size=flat.size)))
  _, hessian = implicit_diff.solve_adjoint(f, w, x, v, damping=DAMPING, tol=1e-8, max_steps=100)
  assert hessian.negative_curvature and hessian.residual > 0.5
  u, gn = implicit_diff.solve_adjoint(f, w, x, v, damping=DAMPING, tol=1e-8, max_steps=100, curvature="gauss_newton",
                                      residuals=residuals)
  assert not gn.negative_curvature and gn.residual < 1e-6
  G = dense(lambda t: implicit_diff.gnvp(residuals, w, x, t), flat, unravel)
  vv = ravel_pytree(v)[0]
  true_residual = jnp.linalg.norm((G + DAMPING * jnp.eye(flat.size)) @ ravel_pytree(u)[0] - vv) / jnp.linalg.norm(vv)
  assert true_residual < 1e-6


@pytest.mark.slow
def test_gauss_newton_hypergradient_is_the_dense_formula():
  """-(d^2 f / dD dw)^T (G + damping I)^-1 v by dense linear algebra, at a learner far from a minimum."""
  w, x, f, residuals, flat, unravel = ae_at_a_learner_that_is_not_converged()
  v = unravel(jnp.asarray(np.random.default_rng(7).normal(size=flat.size)))
  G = dense(lambda t: implicit_diff.gnvp(residuals, w, x, t), flat, unravel)
  mixed = jax.jit(jax.jacfwd(lambda d: ravel_pytree(jax.grad(f)(w, d))[0]))(x)  # (p, n, d)
  u = jnp.linalg.solve(G + DAMPING * jnp.eye(flat.size), ravel_pytree(v)[0])
  expected = -jnp.einsum("p,pnd->nd", u, mixed)
  g, stats = implicit_diff.implicit_hypergradient(f, w, x, v, damping=DAMPING, tol=1e-13, max_steps=200,
                                                  curvature="gauss_newton", residuals=residuals)
  assert stats.residual < 1e-12
  np.testing.assert_allclose(g, expected, rtol=1e-9, atol=1e-12)
  g_hessian, _ = implicit_diff.implicit_hypergradient(f, w, x, v, damping=DAMPING, tol=1e-13, max_steps=200)
  assert float(jnp.linalg.norm(g_hessian - g)) > 0.1 * float(jnp.linalg.norm(g))  # an approximation here


@pytest.mark.slow
def test_gauss_newton_is_the_hessian_at_a_zero_residual_point():
  """Data that the tied AE reconstructs exactly: fixed points x = a + sigma2 W h(x) of a contraction.

  There the residuals vanish, the learner is stationary, the dropped term of the Hessian is
  zero and the Gauss-Newton hypergradient is the exact implicit one.
  """
  rng = np.random.default_rng(8)
  d, k, n = 3, 2, 8
  learner = inner_lib.GRBMLearner("ae")
  W = rng.normal(size=(d, k))
  W *= 1.5 / np.linalg.norm(W, 2)  # so x -> a + W h(x) contracts (Lipschitz ||W||^2 / 4 < 1): one fixed point
  params = udd_jax.GRBMParams(W=jnp.asarray(W), b=jnp.asarray(rng.normal(size=k)), a=jnp.asarray(rng.normal(size=d)))
  x = jnp.asarray(rng.normal(size=(n, d)))
  x = jax.jit(lambda x: jax.lax.fori_loop(0, 500, lambda _, x: params.a + udd_jax.features(params, x) @ params.W.T, x))(x)
  key = jax.random.key(0)
  f = lambda p, x: learner.loss(p, x, key)
  residuals = lambda p, x: tuple(learner.least_squares(p, x, key))
  assert jnp.abs(residuals(params, x)[0]).max() < 1e-14
  flat, unravel = ravel_pytree(params)
  G = dense(lambda t: implicit_diff.gnvp(residuals, params, x, t), flat, unravel)
  H = dense_hessian(f, x, flat, unravel)
  np.testing.assert_allclose(G, H, atol=1e-12)
  assert np.abs(H).max() > 0.1

  v = unravel(jnp.asarray(rng.normal(size=flat.size)))
  kwargs = dict(damping=1e-2, tol=1e-13, max_steps=200)
  g_gn, _ = implicit_diff.implicit_hypergradient(f, params, x, v, curvature="gauss_newton", residuals=residuals, **kwargs)
  g_h, _ = implicit_diff.implicit_hypergradient(f, params, x, v, **kwargs)
  np.testing.assert_allclose(g_gn, g_h, rtol=1e-9, atol=1e-12)


def test_curvature_errors():
  w, x, f, residuals, _, _ = ae_at_a_learner_that_is_not_converged()
  with pytest.raises(ValueError, match=r"unknown curvature 'newton'; valid options are \['gauss_newton', 'hessian'\]"):
    implicit_diff.solve_adjoint(f, w, x, w, curvature="newton")
  with pytest.raises(ValueError, match="curvature='gauss_newton' needs residuals"):
    implicit_diff.solve_adjoint(f, w, x, w, curvature="gauss_newton")


# ---------------------------------------------------------------------------
# The solvers' curvature option.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["implicit", "pool"])
def test_solver_curvature_option_errors(solver):
  implicit = dict(hypergradient="implicit") if solver == "pool" else {}
  with pytest.raises(ValueError, match=r"unknown curvature 'newton'; valid options are \['gauss_newton', 'hessian'\]"):
    bilevel.get_solver(solver, curvature="newton", **implicit)
  built = bilevel.get_solver(solver, curvature="gauss_newton", **implicit)
  assert bilevel.get_solver(**built.to_config()) == built
  assert bilevel.get_solver(solver).curvature == "hessian"
  problem = bilevel.make_problem(n_visible=4, n_hidden=2, n_classes=2, inner="score_matching", head=built.default_head)
  with pytest.raises(ValueError, match=r"curvature='gauss_newton' needs an inner loss that is a sum of squares .*"
                                       r"the 'score_matching' learner has none"):
    built.init(problem, jax.random.key(0), jnp.ones((3, 4)))
  for inner in ("ae", "denoising_score_matching"):
    problem = bilevel.make_problem(n_visible=4, n_hidden=2, n_classes=2, inner=inner, head=built.default_head)
    built.init(problem, jax.random.key(0), jnp.ones((3, 4)))


def test_pool_refuses_gauss_newton_with_the_truncated_hypergradient():
  with pytest.raises(ValueError, match=r"curvature='gauss_newton' is for hypergradient='implicit'"):
    bilevel.Pool(curvature="gauss_newton")


@pytest.mark.slow
@pytest.mark.parametrize("solver, options", [
    ("pool", dict(pool_size=2, inner_steps=3, lifetime=12, hypergradient="implicit", curvature="gauss_newton")),
    ("implicit", dict(cg_steps=5, curvature="gauss_newton")),
])
def test_distill_with_gauss_newton_curvature_on_digits(solver, options):
  (x, y), _ = udd_jax.load_dataset("digits")
  result = udd_jax.distill(x, y, n_distill=10, n_hidden=8, steps=4, log_every=1, batch_size=64, solver=solver,
                           progress=False, seed=0, **options)
  assert np.all(np.isfinite(result.images)) and result.config["solver_options"]["curvature"] == "gauss_newton"
  residuals = [row["cg_residual"] for row in result.history]
  assert len(residuals) == 4 and all(np.isfinite(r) and r < 0.1 for r in residuals), residuals
  assert all(row["cg_negative_curvature"] == 0.0 for row in result.history)


@pytest.mark.slow
def test_opt_curvature_reaches_both_solvers_from_the_app_options(tmp_path):
  """``--opt curvature=gauss_newton`` as the apps parse it (``parse_options``), through ``experiment.run``."""
  for solver, opts in (("pool", ["hypergradient=implicit", "curvature=gauss_newton", "pool_size=2", "lifetime=20"]),
                       ("implicit", ["curvature=gauss_newton", "cg_steps=3"])):
    options = experiment.parse_options(opts)
    assert options["curvature"] == "gauss_newton"
    experiment.run(dataset="digits", n_distill=8, n_hidden=6, steps=2, eval_every=0, eval_seeds=0, baselines=(),
                   solver=solver, options=options, batch_size=32, log_every=1, checkpoint_every=2, progress=False,
                   workdir=str(tmp_path / solver))
    config = (tmp_path / solver / "config.json").read_text()
    assert '"curvature": "gauss_newton"' in config
