"""The InnerLearner interface: the GRBM behind it, and a second learner plugged in without touching the driver."""

import dataclasses
import json
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import udd_jax
from udd_jax.data.preprocessing import fit_preprocessing
from udd_jax.driver import result as result_lib
from udd_jax.inner import grbm, learners


class LinearDecoderParams(NamedTuple):
  """Tied weights ``W`` (d, K) and a decoder bias ``c`` (d,): no hidden bias."""

  W: jax.Array
  c: jax.Array


@dataclasses.dataclass(frozen=True)
class LinearDecoderAE(learners.InnerLearner):
  """A tied autoencoder without hidden biases: ``h = sigmoid(x W)``, reconstruction ``c + h W^T``."""

  name: str = "linear_decoder_ae"

  def init(self, key, n_visible, n_hidden, *, init_scale=0.01, dtype=jnp.float32):
    W = init_scale * jax.random.normal(key, (n_visible, n_hidden), dtype)
    return LinearDecoderParams(W, jnp.zeros((n_visible,), dtype))

  def features(self, params, x):
    return jax.nn.sigmoid(x @ params.W)

  def residual(self, params, x):
    return params.c + self.features(params, x) @ params.W.T - x

  def loss(self, params, x, key):
    del key
    return 0.5 * jnp.mean(jnp.sum(self.residual(params, x) ** 2, axis=-1))

  def check_params(self, params, x, name="x"):
    if not isinstance(params, LinearDecoderParams):
      raise TypeError(f"params must be LinearDecoderParams; got {type(params).__name__}.")
    super().check_params(params, x, name)  # x: a floating (n, d) array
    if x.shape[1] != params.W.shape[0]:
      raise ValueError(f"{name} has {x.shape[1]} features but W expects {params.W.shape[0]}.")

  def to_arrays(self, params):
    return {"W": np.asarray(params.W), "c": np.asarray(params.c)}

  def from_arrays(self, arrays):
    return LinearDecoderParams(arrays["W"], arrays["c"])

  def filters(self, params):
    return np.asarray(params.W).T


@pytest.fixture(scope="module")
def digits():
  return udd_jax.load_dataset("digits")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_init_with_a_traced_scale_equals_unit_init_then_scaled(dtype):
  """Recipes used to init with scale 1 and multiply W; init with the (traced) scale gives the same bits."""
  learner = udd_jax.get_inner_learner("ae")
  key = jax.random.key(7)

  def old(s):
    p = learner.init(key, 64, 16, init_scale=1.0, dtype=dtype)
    return p._replace(W=s * p.W)

  new = lambda s: learner.init(key, 64, 16, init_scale=s, dtype=dtype)
  for scale in (0.01, 0.37):
    chex.assert_trees_all_equal(jax.jit(new)(scale), jax.jit(old)(scale))
    chex.assert_trees_all_equal(new(scale), old(scale))
  assert new(0.01).W.dtype == dtype


def test_grbm_learner_behind_the_interface():
  learner = udd_jax.get_inner_learner("score_matching", sigma2=0.5)
  assert learner == udd_jax.get_inner_learner("score_matching", sigma2=0.5)  # hashable by value: a static jit argument
  params = learner.init(jax.random.key(0), 6, 4, init_scale=0.3)
  x = jax.random.uniform(jax.random.key(1), (5, 6))
  arrays = learner.to_arrays(params)
  assert {k: v.shape for k, v in arrays.items()} == {"W": (6, 4), "b": (4,), "a": (6,)}
  chex.assert_trees_all_equal(learner.from_arrays(arrays), jax.tree.map(np.asarray, params))
  np.testing.assert_array_equal(learner.filters(params), np.asarray(params.W).T)
  np.testing.assert_array_equal(learner.residual(params, x), grbm.score(params, x, sigma2=0.5))
  assert learner.loss(params, x, jax.random.key(2)) == grbm.score_matching_loss(params, x, sigma2=0.5)
  with pytest.raises(ValueError, match="x has 5 features but params.W expects 6"):
    learner.check_params(params, x[:, :5])
  with pytest.raises(ValueError, match="the ae learner's parameters lack \\['a'\\]"):
    udd_jax.get_inner_learner("ae").from_arrays({"W": arrays["W"], "b": arrays["b"]})


def test_a_format_1_distilled_set_still_loads(tmp_path):
  """Format 1: params_W / params_b / params_a, the recipe's keys (inner_steps) at the top of the config."""
  rng = np.random.default_rng(0)
  W, b, a = rng.normal(size=(64, 8)), rng.normal(size=8), rng.normal(size=64)
  images = rng.uniform(size=(10, 8, 8)).astype(np.float32)
  config = dict(solver="pool", inner="ae", n_distill=10, n_hidden=8, steps=3, problem_options=dict(init_scale=0.01),
                inner_optimizer="adam", inner_lr=0.003, inner_steps=4000, init_scale=0.01, until_converged=True,
                max_steps=16000)
  prep = fit_preprocessing(images, method="none")
  np.savez(tmp_path / "v1.npz", format_version=np.asarray(1), library_version=np.asarray("0.1.0"), images=images,
           params_W=W, params_b=b, params_a=a, config=np.asarray(json.dumps(config)),
           history=np.asarray(json.dumps([{"step": 3, "outer_loss": 1.0}])),
           **{f"preprocessing_{k}": v for k, v in prep.to_dict().items()})
  loaded = udd_jax.load_distilled(tmp_path / "v1.npz")
  assert isinstance(loaded.params, udd_jax.GRBMParams) and loaded.learner.name == "ae"
  chex.assert_trees_all_equal(loaded.params, udd_jax.GRBMParams(W, b, a))
  assert loaded.recipe == udd_jax.Recipe("adam", 0.003, 4000, 0.01, until_converged=True, max_steps=16000)
  np.testing.assert_array_equal(loaded.images, images)
  # Saved again, it is a format-2 set with the same parameters.
  again = udd_jax.load_distilled(loaded.save(tmp_path / "v2.npz"))
  chex.assert_trees_all_equal(again.params, loaded.params)
  with np.load(tmp_path / "v2.npz") as f:
    assert int(f["format_version"]) == result_lib.FORMAT_VERSION == 2
    assert {"params/W", "params/b", "params/a"} <= set(f.files) and "params_W" not in f.files


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["pool", "implicit"])
def test_a_second_learner_distills_evaluates_and_round_trips(digits, tmp_path, solver):
  (x, y), (xt, yt) = digits
  learner = LinearDecoderAE()
  result = udd_jax.distill(x, y, n_distill=10, n_hidden=8, inner=learner, solver=solver, steps=3, log_every=1,
                           progress=False)
  assert isinstance(result.params, LinearDecoderParams)
  assert result.params.W.shape == (64, 8) and result.params.c.shape == (64,)
  assert all(np.all(np.isfinite(p)) for p in result.params) and np.all(np.isfinite(result.images))
  assert result.images.shape == (10, 8, 8) and result.config["inner"] == "linear_decoder_ae"
  assert [h["step"] for h in result.history] == [1, 2, 3]
  assert all(np.isfinite(h["outer_loss"]) and np.isfinite(h["d_minus_ae_d"]) for h in result.history)
  # The driver's residual metric is this learner's residual: ||c + h W^T - x|| of D under the final w.
  short = udd_jax.Recipe("adam", 0.01, 20, 0.01)
  report = udd_jax.evaluate(result.images, (x, y), (xt, yt), n_hidden=8, inner=learner, n_seeds=1, baselines=(),
                            recipe=short, standard_recipe=short, head_steps=50)
  [row] = report.rows
  assert len(row.accuracies) == 1 and 0.2 < row.accuracies[0] <= 1.0 and np.isfinite(row.inner_loss)
  assert report.settings["inner"] == "linear_decoder_ae"
  path = result.save(tmp_path / "d.npz")
  with np.load(path) as f:
    assert {k for k in f.files if k.startswith("params")} == {"params/W", "params/c"}
  with pytest.raises(ValueError, match="learner 'linear_decoder_ae', which udd_jax does not register"):
    udd_jax.load_distilled(path)
  loaded = udd_jax.load_distilled(path, learner=learner)
  assert isinstance(loaded.params, LinearDecoderParams)
  chex.assert_trees_all_equal((loaded.images, loaded.params), (result.images, result.params))
  assert loaded.config == result.config and loaded.recipe == result.recipe


def test_distill_refuses_an_unknown_learner_name_before_compiling(digits):
  (x, y), _ = digits
  with pytest.raises(ValueError, match="unknown inner loss 'vae'"):
    udd_jax.distill(x, y, n_distill=10, n_hidden=8, inner="vae", steps=1, progress=False)


def test_the_grbm_learner_checks_its_settings_however_it_is_made():
  with pytest.raises(ValueError, match=r"unknown inner loss 'vae'; valid options are \['ae', 'denoising_score_matching'"):
    learners.GRBMLearner(name="vae")
  with pytest.raises(ValueError, match="sigma2 must be a finite positive number"):
    learners.GRBMLearner(sigma2=-1.0)
  with pytest.raises(ValueError, match="noise_std must be a finite positive number"):
    learners.get_inner_learner("denoising_score_matching", noise_std=0.0)
  assert learners.get_inner_learner("score_matching", sigma2=0.5) == learners.GRBMLearner("score_matching", 0.5)
