"""The maths of the inner learners: closed forms, autodiff, finite differences (float64)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.test_util import check_grads

import udd_jax

SHAPES = [(1, 1, 1), (5, 3, 2), (17, 10, 7), (32, 64, 16)]  # (n, d, K)


def random_problem(n, d, k, seed=0, scale=0.7):
  """Random float64 params (non-zero biases, so every term of the gradient matters) and data."""
  keys = jax.random.split(jax.random.key(seed), 4)
  params = udd_jax.GRBMParams(
      W=scale * jax.random.normal(keys[0], (d, k), jnp.float64),
      b=0.5 * jax.random.normal(keys[1], (k,), jnp.float64),
      a=0.5 * jax.random.normal(keys[2], (d,), jnp.float64),
  )
  x = jax.random.uniform(keys[3], (n, d), jnp.float64)
  return params, x


def max_rel_err(tree_a, tree_b):
  errs = jax.tree.map(lambda u, v: jnp.max(jnp.abs(u - v)) / jnp.maximum(jnp.max(jnp.abs(v)), 1e-300), tree_a, tree_b)
  return max(float(e) for e in jax.tree.leaves(errs))


CLOSED_FORMS = {  # name: (loss, its closed-form gradient, its closed-form penalty ||grad_w loss||^2)
    "ae": (udd_jax.ae_loss, udd_jax.ae_grad_closed_form, udd_jax.ae_penalty_closed_form),
    "score_matching": (
        udd_jax.score_matching_loss,
        udd_jax.score_matching_grad_closed_form,
        udd_jax.score_matching_penalty_closed_form,
    ),
}


def named_cases(shapes, sigma2s):
  return [
      dict(testcase_name=f"{name}_n{n}_d{d}_k{k}_sigma2_{sigma2}", name=name, shape=(n, d, k), sigma2=sigma2)
      for name in CLOSED_FORMS
      for n, d, k in shapes
      for sigma2 in sigma2s
  ]


class ClosedFormTest(chex.TestCase):
  """The closed forms against autodiff, each computed jitted and not jitted (chex variants)."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*named_cases(SHAPES, [1.0, 0.3]))
  def test_closed_form_gradient_matches_autodiff(self, name, shape, sigma2):
    loss, closed_form, _ = CLOSED_FORMS[name]
    params, x = random_problem(*shape)

    @self.variant
    def gradients(params, x, sigma2):
      return jax.grad(loss)(params, x, sigma2=sigma2), closed_form(params, x, sigma2=sigma2)

    auto, manual = gradients(params, x, sigma2)
    assert isinstance(manual, udd_jax.GRBMParams)
    assert max_rel_err(manual, auto) < 1e-10

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*named_cases(SHAPES[1:], [0.5]))
  def test_closed_form_penalty_matches_autodiff_penalty(self, name, shape, sigma2):
    loss, _, penalty = CLOSED_FORMS[name]
    params, x = random_problem(*shape, seed=1)

    @self.variant
    def penalties(params, x, sigma2):
      return penalty(params, x, sigma2=sigma2), udd_jax.gradient_penalty(loss, params, x, sigma2=sigma2)

    manual, auto = penalties(params, x, sigma2)
    assert manual > 0
    assert abs(manual - auto) / auto < 1e-10


def per_sample_column_gradient(params, x, transposed_jacobian):
  """grad_{w_k} averaged over samples, column by column, from the seed's per-sample hint."""
  W, b, a = params
  d, k = W.shape
  g_W = jnp.zeros_like(W)
  for xi in x:
    h = jax.nn.sigmoid(W.T @ xi + b)
    r = (a - xi) + W @ h
    dh = h * (1 - h)
    outer = [jnp.outer(xi, W[:, j]) if transposed_jacobian else jnp.outer(W[:, j], xi) for j in range(k)]
    cols = [(h[j] * jnp.eye(d) + dh[j] * outer[j]) @ r for j in range(k)]
    g_W = g_W + jnp.stack(cols, axis=1) / x.shape[0]
  return g_W


@pytest.mark.slow
def test_closed_form_gradient_is_the_per_sample_column_formula():
  """grad_{w_k} = (h_k I + h'_k x w_k^T) r per sample, averaged, for every column k.

  The seed's slide writes ``w_k x^T`` (the Jacobian dr/dw_k itself, not its
  transpose); that literal version is wrong, and this test shows it. The seed's
  batched Julia code (``Xs * (W_r .* dhiddens)'``) is right and is what
  ``ae_grad_closed_form`` implements.
  """
  params, x = random_problem(4, 5, 3, seed=2)
  closed = udd_jax.ae_grad_closed_form(params, x).W
  assert max_rel_err(closed, per_sample_column_gradient(params, x, transposed_jacobian=True)) < 1e-12
  assert max_rel_err(closed, per_sample_column_gradient(params, x, transposed_jacobian=False)) > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("loss", [udd_jax.ae_loss, udd_jax.score_matching_loss], ids=["ae", "score_matching"])
def test_check_grads_order_two(loss):
  params, x = random_problem(6, 5, 4, seed=3)
  check_grads(lambda p, d: loss(p, d, sigma2=0.8), (params, x), order=2, modes=["fwd", "rev"])


def test_check_grads_order_two_denoising_score_matching():
  params, x = random_problem(6, 5, 4, seed=4)
  key = jax.random.key(5)
  check_grads(
      lambda p, d: udd_jax.denoising_score_matching_loss(p, d, key, noise_std=0.3),
      (params, x),
      order=2,
      modes=["fwd", "rev"],
  )


def test_check_grads_order_two_sliced_score_matching():
  params, x = random_problem(6, 5, 4, seed=4)
  key = jax.random.key(6)
  check_grads(lambda p, d: udd_jax.sliced_score_matching_loss(p, d, key, sigma2=0.7), (params, x), order=2,
              modes=["fwd", "rev"])


@pytest.mark.parametrize("sigma2", [1.0, 0.4])
def test_sliced_score_matching_projection_is_a_jvp_of_the_score(sigma2):
  """The closed-form v^T (ds/dx) v against jax.jvp of the score, with the same projections v."""
  params, x = random_problem(9, 6, 4, seed=8)
  key = jax.random.key(1)
  v = jax.random.normal(key, x.shape, x.dtype)
  score_one = lambda xi: udd_jax.score(params, xi[None], sigma2=sigma2)[0]
  projected = jax.vmap(lambda xi, vi: vi @ jax.jvp(score_one, (xi,), (vi,))[1])(x, v)
  s = udd_jax.score(params, x, sigma2=sigma2)
  by_jvp = jnp.mean(0.5 * jnp.sum(v * s, axis=1) ** 2 + projected)
  value = udd_jax.sliced_score_matching_loss(params, x, key, sigma2=sigma2)
  assert abs(value - by_jvp) < 1e-12 * abs(by_jvp)


def test_sliced_score_matching_averages_to_score_matching():
  """E_v over the projections is exact score matching (E[v v^T] = I); the AE loss (no trace term) is far off."""
  params, x = random_problem(3, 5, 4, seed=12)
  tiled = jnp.tile(x, (20_000, 1))
  draws = jnp.stack([udd_jax.sliced_score_matching_loss(params, tiled, jax.random.key(i)) for i in range(10)])
  mean, standard_error = jnp.mean(draws), jnp.std(draws, ddof=1) / jnp.sqrt(10)
  assert abs(mean - udd_jax.score_matching_loss(params, x)) < 5 * standard_error
  assert abs(mean - udd_jax.ae_loss(params, x)) > 50 * standard_error


def central_difference(f, x, direction, eps=1e-6):
  return (f(x + eps * direction) - f(x - eps * direction)) / (2 * eps)


@pytest.mark.slow
@pytest.mark.parametrize("loss", [udd_jax.ae_loss, udd_jax.score_matching_loss], ids=["ae", "score_matching"])
def test_penalty_gradients_match_central_differences(loss):
  """d/dD and d/dw of ||grad_w L(w; D)||^2 by autodiff agree with central differences."""
  params, x = random_problem(7, 6, 5, seed=6)
  penalty = lambda p, d: udd_jax.gradient_penalty(loss, p, d)
  g_params, g_x = jax.grad(penalty, argnums=(0, 1))(params, x)
  rng = np.random.default_rng(0)
  for _ in range(3):
    v_x = jnp.asarray(rng.normal(size=x.shape))
    fd = central_difference(lambda d: penalty(params, d), x, v_x)
    assert abs(jnp.vdot(g_x, v_x) - fd) <= 1e-7 * max(abs(fd), 1.0)
    v_p = jax.tree.map(lambda leaf: jnp.asarray(rng.normal(size=leaf.shape)), params)
    fd = central_difference(
        lambda t: penalty(jax.tree.map(lambda p, v: p + t * v, params, v_p), x), 0.0, 1.0
    )
    analytic = sum(jnp.vdot(g, v) for g, v in zip(g_params, v_p))
    assert abs(analytic - fd) <= 1e-7 * max(abs(fd), 1.0)


@pytest.mark.slow
def test_penalty_gradient_wrt_data_elementwise():
  """Every entry of d penalty / dD, not just random directions, on a small problem."""
  params, x = random_problem(3, 4, 2, seed=7)
  penalty = lambda d: udd_jax.ae_penalty_closed_form(params, d)
  g = jax.grad(penalty)(x)
  fd = np.zeros(x.shape)
  for idx in np.ndindex(*x.shape):
    e = jnp.zeros(x.shape).at[idx].set(1.0)
    fd[idx] = central_difference(penalty, x, e)
  np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("sigma2", [1.0, 0.4])
def test_score_matching_equals_brute_force_jacobian_trace(sigma2):
  params, x = random_problem(9, 6, 4, seed=8)
  score_one = lambda xi: udd_jax.score(params, xi[None], sigma2=sigma2)[0]
  s = udd_jax.score(params, x, sigma2=sigma2)
  traces = jax.vmap(lambda xi: jnp.trace(jax.jacfwd(score_one)(xi)))(x)
  brute = 0.5 * jnp.mean(jnp.sum(s**2, axis=1)) + jnp.mean(traces)
  assert abs(udd_jax.score_matching_loss(params, x, sigma2=sigma2) - brute) < 1e-12 * abs(brute) + 1e-13


def test_score_is_gradient_of_log_density():
  params, x = random_problem(5, 4, 3, seed=9)
  sigma2 = 0.6

  def log_p(xi):
    return -jnp.sum((xi - params.a) ** 2) / (2 * sigma2) + jnp.sum(jax.nn.softplus(xi @ params.W + params.b))

  np.testing.assert_allclose(udd_jax.score(params, x, sigma2=sigma2), jax.vmap(jax.grad(log_p))(x), rtol=1e-12)


def test_ae_loss_is_half_mean_squared_score():
  params, x = random_problem(5, 4, 3, seed=10)
  s = udd_jax.score(params, x, sigma2=0.5)
  assert abs(udd_jax.ae_loss(params, x, sigma2=0.5) - 0.5 * jnp.mean(jnp.sum(s**2, 1))) < 1e-12


def test_denoising_score_matching_matches_its_expectation_in_the_linear_case():
  """With W = 0 and sigma2 = 1, E_eps 1/2||a - x + eps (1/s - s)||^2 = 1/2(||a-x||^2 + d (1/s - s)^2)."""
  d, noise_std = 3, 0.5
  params = udd_jax.GRBMParams(W=jnp.zeros((d, 2)), b=jnp.zeros(2), a=jnp.array([0.2, -0.1, 0.4]))
  x = jnp.tile(jnp.array([[0.5, 0.5, 0.0]]), (200_000, 1))
  value = udd_jax.denoising_score_matching_loss(params, x, jax.random.key(0), noise_std=noise_std)
  expected = 0.5 * (jnp.sum((params.a - x[0]) ** 2) + d * (1 / noise_std - noise_std) ** 2)
  # Monte Carlo standard error is about 0.006 here.
  assert abs(value - expected) < 0.03
  # A different noise level gives a clearly different value: the test can fail.
  assert abs(udd_jax.denoising_score_matching_loss(params, x, jax.random.key(0), noise_std=0.3) - expected) > 1.0


@pytest.mark.slow
@pytest.mark.parametrize(
    "fn",
    [
        udd_jax.ae_loss,
        udd_jax.score_matching_loss,
        udd_jax.features,
        udd_jax.ae_grad_closed_form,
        udd_jax.score_matching_grad_closed_form,
        udd_jax.ae_penalty_closed_form,
        lambda p, x: udd_jax.denoising_score_matching_loss(p, x, jax.random.key(3)),
        lambda p, x: udd_jax.sliced_score_matching_loss(p, x, jax.random.key(3)),
        lambda p, x: udd_jax.gradient_penalty(udd_jax.score_matching_loss, p, x),
    ],
)
def test_jit_matches_no_jit(fn):
  params, x = random_problem(8, 5, 3, seed=11)
  eager = fn(params, x)
  jitted = jax.jit(fn)(params, x)
  chex.assert_trees_all_close(eager, jitted, rtol=1e-12, atol=1e-14)


def test_init_params_recipe():
  params = udd_jax.init_params(jax.random.key(0), 300, 200, init_scale=0.05)
  assert params.W.shape == (300, 200) and params.W.dtype == jnp.float32
  assert abs(float(jnp.std(params.W)) - 0.05) < 0.002
  assert not jnp.any(params.b) and not jnp.any(params.a)
  other = udd_jax.init_params(jax.random.key(1), 300, 200, init_scale=0.05)
  assert not jnp.allclose(params.W, other.W)
  assert udd_jax.init_params(jax.random.key(0), 3, 2, dtype=jnp.float64).W.dtype == jnp.float64


def test_features_are_sigmoid_of_affine_map():
  params, x = random_problem(4, 3, 2, seed=12)
  expected = 1 / (1 + np.exp(-(np.asarray(x) @ np.asarray(params.W) + np.asarray(params.b))))
  np.testing.assert_allclose(udd_jax.features(params, x), expected, rtol=1e-12)
