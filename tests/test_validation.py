"""Bad input to public entry points fails early with an error naming the argument and problem."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import udd_jax

PARAMS = udd_jax.GRBMParams(W=jnp.ones((4, 3)), b=jnp.zeros(3), a=jnp.zeros(4))
X = jnp.ones((5, 4))
KEY = jax.random.key(0)

LOSSES = {
    "ae_loss": udd_jax.ae_loss,
    "score_matching_loss": udd_jax.score_matching_loss,
    "denoising_score_matching_loss": lambda p, x, **kw: udd_jax.denoising_score_matching_loss(p, x, KEY, **kw),
    "features": lambda p, x, **kw: udd_jax.features(p, x),
    "ae_grad_closed_form": udd_jax.ae_grad_closed_form,
    "score_matching_grad_closed_form": udd_jax.score_matching_grad_closed_form,
}

BAD_DATA = [
    (jnp.ones((5, 3)), ValueError, "x has 3 features but params.W expects 4"),
    (jnp.ones((5, 2, 2)), ValueError, r"x must have shape \(n, 4\)"),
    (jnp.ones((0, 4)), ValueError, "x is empty"),
    (jnp.ones((5, 4), jnp.int32), TypeError, "x must be a floating array"),
    ([[1.0] * 4], TypeError, "x must be an array"),
]

BAD_PARAMS = [
    (udd_jax.GRBMParams(jnp.ones((4, 3)), jnp.zeros(2), jnp.zeros(4)), ValueError, r"params.b must have shape \(3,\)"),
    (udd_jax.GRBMParams(jnp.ones((4, 3)), jnp.zeros(3), jnp.zeros(5)), ValueError, r"params.a must have shape \(4,\)"),
    (udd_jax.GRBMParams(jnp.ones(4), jnp.zeros(3), jnp.zeros(4)), ValueError, "params.W must have rank 2"),
    (udd_jax.GRBMParams(jnp.ones((4, 3), jnp.int32), jnp.zeros(3), jnp.zeros(4)), TypeError, "params.W must be a floating"),
    ((jnp.ones((4, 3)), jnp.zeros(3)), TypeError, "params must be a GRBMParams"),
]


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("x, error, match", BAD_DATA)
def test_bad_data(name, x, error, match):
  with pytest.raises(error, match=match):
    LOSSES[name](PARAMS, x)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("params, error, match", BAD_PARAMS)
def test_bad_params(name, params, error, match):
  with pytest.raises(error, match=match):
    LOSSES[name](params, X)


@pytest.mark.parametrize("sigma2", [0.0, -1.0, float("nan")])
def test_bad_sigma2(sigma2):
  with pytest.raises(ValueError, match="sigma2 must be a finite positive number"):
    udd_jax.ae_loss(PARAMS, X, sigma2=sigma2)


def test_bad_noise_std():
  with pytest.raises(ValueError, match="noise_std"):
    udd_jax.denoising_score_matching_loss(PARAMS, X, KEY, noise_std=0.0)


def test_shape_errors_raise_under_jit_at_trace_time():
  with pytest.raises(ValueError, match="x has 3 features"):
    jax.jit(udd_jax.ae_loss)(PARAMS, jnp.ones((5, 3)))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(n_visible=0, n_hidden=3), ValueError, "n_visible must be a positive integer; got 0"),
        (dict(n_visible=4, n_hidden=-2), ValueError, "n_hidden must be a positive integer; got -2"),
        (dict(n_visible=4, n_hidden=2.5), TypeError, "n_hidden must be a positive integer"),
        (dict(n_visible=4, n_hidden=True), TypeError, "n_hidden must be a positive integer"),
        (dict(n_visible=4, n_hidden=3, init_scale=-0.1), ValueError, "init_scale must be a finite non-negative"),
        (dict(n_visible=4, n_hidden=3, dtype=jnp.int32), TypeError, "dtype must be a floating dtype"),
    ],
)
def test_bad_init(kwargs, error, match):
  with pytest.raises(error, match=match):
    udd_jax.init_params(KEY, **kwargs)


@pytest.mark.parametrize(
    "x, kwargs, error, match",
    [
        (np.ones((3, 2, 2)), dict(method="whiten"), ValueError, r"unknown method 'whiten'; valid options are \['none'"),
        (np.ones(5), {}, ValueError, "rank >= 2"),
        (np.ones((0, 4)), {}, ValueError, "x is empty"),
        (np.array([[1.0, np.inf]]), {}, ValueError, "1 non-finite value"),
        (np.array([["a", "b"]]), {}, TypeError, "numeric array"),
        (np.ones((3, 2), complex), {}, TypeError, "real numbers"),
        (np.ones((3, 2)), dict(method="zca", zca_reg=0.0), ValueError, "zca_reg must be a finite positive"),
    ],
)
def test_bad_preprocessing_input(x, kwargs, error, match):
  with pytest.raises(error, match=match):
    udd_jax.fit_preprocessing(x, **kwargs)
