"""The probe's logistic heads: the Newton solver reaches L-BFGS's optimum (float64 oracles)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from udd_jax.evaluation import logistic


def _problem(n=400, k=6, c=4, seed=0):
  """Badly scaled features with a constant column, and labels that no linear map separates."""
  key_f, key_y = jax.random.split(jax.random.key(seed))
  scales = jnp.asarray([1.0, 0.01, 10.0, 1e-3, 3.0, 0.0], jnp.float64)[:k]
  u = jax.random.normal(key_f, (n, k), jnp.float64)
  labels = jnp.argmax(u[:, :c] + jax.random.normal(key_y, (n, c), jnp.float64), axis=1)
  return u * scales + 0.5, labels, c


def _grad_norm(head, feats, labels, c, l2, standardize):
  """||grad|| of fit_logistic's objective in its own (standardised) basis, over kernel and bias."""
  z = (feats - head.mean) / head.scale
  weight = jnp.ones_like(head.scale) if standardize else 1.0 / head.scale**2
  loss = lambda w, b: (jnp.mean(optax.softmax_cross_entropy_with_integer_labels(z @ w + b, labels))
                       + 0.5 * l2 * jnp.sum(weight[:, None] * w**2))
  return float(optax.tree.norm(jax.grad(loss, argnums=(0, 1))(head.kernel, head.bias)))


@pytest.mark.parametrize("standardize", [False, True])
def test_newton_reaches_the_lbfgs_optimum(standardize):
  feats, labels, c = _problem()
  l2, tol = 2e-3, 1e-9
  reference = logistic.fit_logistic(feats, labels, c, l2=l2, standardize=standardize, max_steps=5000, tol=1e-11,
                                    method="lbfgs")
  f_ref = float(logistic.objective(reference, feats, labels, l2=l2, standardize=standardize))
  for method in ("auto", "newton", "newton_cg"):  # auto: Newton for 7 x 4 weights and biases
    head = logistic.fit_logistic(feats, labels, c, l2=l2, standardize=standardize, tol=tol, method=method)
    f_new = float(logistic.objective(head, feats, labels, l2=l2, standardize=standardize))
    assert abs(f_new - f_ref) <= 1e-8 * f_ref
    assert float(head.grad_norm) <= tol
    assert _grad_norm(head, feats, labels, c, l2, standardize) <= 2 * tol  # the reported norm is the true one
    assert int(head.num_steps) < 50  # Newton, not a first-order crawl
    np.testing.assert_array_equal(logistic.predict(head, feats), logistic.predict(reference, feats))
    # The same linear map on the raw features (up to the softmax's free constant per feature).
    v_new, v_ref = head.kernel / head.scale[:, None], reference.kernel / reference.scale[:, None]
    np.testing.assert_allclose(v_new - v_new.mean(1, keepdims=True), v_ref - v_ref.mean(1, keepdims=True), atol=1e-6)


@pytest.mark.parametrize("standardize", [False, True])
def test_auto_above_the_newton_limit_reaches_the_lbfgs_optimum(standardize):
  """2610 weights and biases: auto takes Hessian-free Newton on raw features, L-BFGS on standardised ones."""
  key_f, key_y = jax.random.split(jax.random.key(1))
  n, k, c = 300, 260, 10
  scales = jnp.logspace(-1, 0.5, k)
  feats = jax.random.normal(key_f, (n, k), jnp.float64) * scales + 0.5
  labels = jnp.argmax(feats[:, :c] / scales[:c] + 2 * jax.random.normal(key_y, (n, c), jnp.float64), axis=1)
  assert (k + 1) * c > logistic.NEWTON_MAX_WEIGHTS
  l2, tol = 1e-2, 1e-8
  reference = logistic.fit_logistic(feats, labels, c, l2=l2, standardize=standardize, max_steps=5000, tol=1e-11,
                                    method="lbfgs")
  assert float(reference.grad_norm) <= 1e-11
  f_ref = float(logistic.objective(reference, feats, labels, l2=l2, standardize=standardize))
  head = logistic.fit_logistic(feats, labels, c, l2=l2, standardize=standardize, tol=tol, method="auto")
  for method in ("newton_cg", "lbfgs"):  # auto is one of them; Hessian-free Newton reaches the optimum either way
    one = logistic.fit_logistic(feats, labels, c, l2=l2, standardize=standardize, tol=tol, method=method)
    f_new = float(logistic.objective(one, feats, labels, l2=l2, standardize=standardize))
    assert abs(f_new - f_ref) <= 1e-12 * f_ref
    assert float(one.grad_norm) <= tol and _grad_norm(one, feats, labels, c, l2, standardize) <= 2 * tol
    if method == "newton_cg":
      assert int(one.num_steps) < 30  # Newton steps, not L-BFGS iterations
  chosen = logistic.fit_logistic(feats, labels, c, l2=l2, standardize=standardize, tol=tol,
                                 method="lbfgs" if standardize else "newton_cg")
  np.testing.assert_array_equal(head.kernel, chosen.kernel)


def test_newton_without_weight_decay_and_a_constant_feature_converges():
  """l2 = 0: the Hessian is singular along the constant feature's weights; the solve stays finite."""
  feats, labels, c = _problem()
  head = logistic.fit_logistic(feats, labels, c, l2=0.0, tol=1e-8)
  assert np.all(np.isfinite(head.kernel)) and float(head.grad_norm) <= 1e-8


def test_newton_vmapped_over_seeds_equals_a_loop():
  problems = [_problem(seed=s) for s in range(3)]
  feats = jnp.stack([f for f, _, _ in problems])
  labels = problems[0][1]
  fit = lambda f: logistic.fit_logistic(f, labels, 4, l2=2e-3, standardize=False, tol=1e-9)
  batched = jax.jit(jax.vmap(fit))(feats)
  for s in range(3):
    one = jax.jit(fit)(feats[s])
    np.testing.assert_allclose(batched.kernel[s], one.kernel, rtol=1e-7, atol=1e-9)
    assert float(batched.grad_norm[s]) <= 1e-9


def test_unknown_method_is_refused():
  feats, labels, c = _problem()
  with pytest.raises(ValueError, match="method"):
    logistic.fit_logistic(feats, labels, c, method="sgd")


@pytest.mark.slow
def test_evaluate_reports_each_row_on_stderr_only_when_asked(capsys):
  import udd_jax

  (x, y), (xt, yt) = udd_jax.load_dataset("digits")
  short = udd_jax.Recipe("adam", 0.01, 5, 0.01)
  run = lambda progress: udd_jax.evaluate(x[:10], (x[:300], y[:300]), (xt[:100], yt[:100]), n_hidden=4, n_seeds=2,
                                          standard_recipe=short, baselines=("raw_pixels",), head_steps=20,
                                          progress=progress)
  report = run(True)
  err = capsys.readouterr().err.splitlines()
  assert [r.name for r in report.rows] == ["distilled D", "raw pixels"]
  assert len(err) == 2 and "row 1/2 distilled D [standard recipe]" in err[0] and "row 2/2 raw pixels" in err[1]
  assert all("ETA" in line for line in err) and err[1].endswith("ETA 0m00s")
  run(False)
  captured = capsys.readouterr()
  assert captured.err == "" and captured.out == ""
