"""The learned image prior: its score and fit, its gradient in D's update, distill(prior=...) with every solver (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import udd_jax
from udd_jax import bilevel
from udd_jax.inner import GRBMParams, ImagePrior
from test_bilevel import SOLVER_CASES, digits_tasks, make_solver


def random_prior(d=6, k=4, seed=0, sigma2=0.5):
  keys = jax.random.split(jax.random.key(seed), 3)
  params = GRBMParams(W=0.7 * jax.random.normal(keys[0], (d, k), jnp.float64),
                      b=0.5 * jax.random.normal(keys[1], (k,), jnp.float64),
                      a=0.5 * jax.random.normal(keys[2], (d,), jnp.float64))
  return ImagePrior(params, sigma2)


@pytest.fixture(scope="module")
def digits_prior():
  (x, _), (xt, _) = udd_jax.load_dataset("digits")
  x, xt = x.reshape(len(x), -1).astype(np.float64), xt.reshape(len(xt), -1).astype(np.float64)
  return udd_jax.fit_prior(x, n_hidden=32, sigma2=0.1, steps=1500, batch_size=256, lr=3e-3, seed=0), x, xt


def test_score_is_the_gradient_of_the_log_density():
  prior = random_prior()
  x = jax.random.uniform(jax.random.key(1), (5, 6), jnp.float64)
  auto = jax.vmap(jax.grad(lambda xi: prior.log_density(xi[None])[0]))(x)
  np.testing.assert_allclose(prior.score(x), auto, rtol=1e-12)


def test_fitted_prior_prefers_real_images_to_noise_and_to_its_init(digits_prior):
  prior, x, xt = digits_prior
  real = np.asarray(prior.log_density(jnp.asarray(xt)))
  noise = np.asarray(prior.log_density(jax.random.uniform(jax.random.key(0), xt.shape, jnp.float64)))
  assert np.median(real) > np.percentile(noise, 99)
  # The fit did something: held-out real images are likelier than under a prior with the fit's a but no hidden units' training.
  untrained = ImagePrior(prior.params._replace(W=jnp.zeros_like(prior.params.W), b=jnp.zeros_like(prior.params.b)),
                         prior.sigma2)
  gain = np.median(real) - np.median(np.asarray(untrained.log_density(jnp.asarray(xt))))
  assert gain > 0, gain


def test_save_load_and_checks(tmp_path, digits_prior):
  prior = digits_prior[0]
  loaded = udd_jax.load_prior(prior.save(tmp_path / "prior.npz"))
  np.testing.assert_array_equal(loaded.params.W, prior.params.W)
  assert loaded.sigma2 == prior.sigma2 and loaded.record() == prior.record()
  with pytest.raises(ValueError, match="the prior is a density over 64 features, but D has 10"):
    udd_jax.distill(np.zeros((20, 10), np.float32), np.arange(20) % 2, n_distill=4, n_hidden=3, steps=1,
                    prior=prior, prior_weight=1.0)
  np.savez(tmp_path / "other.npz", x=np.zeros(3))
  with pytest.raises(ValueError, match="is not an image prior: it lacks"):
    udd_jax.load_prior(tmp_path / "other.npz")


@pytest.mark.parametrize("paired", [False, True])
def test_add_prior_adds_the_gradient_of_minus_weight_mean_log_density(paired):
  prior = random_prior()
  images = jax.random.uniform(jax.random.key(2), (5, 6), jnp.float64)
  g = jax.random.normal(jax.random.key(3), images.shape, jnp.float64)
  tx = bilevel.add_prior(0.3, prior, paired)
  params, updates = ((images, jnp.ones(2)), (g, jnp.ones(2))) if paired else (images, g)
  out, _ = tx.update(updates, tx.init(params), params)
  expected = g + jax.grad(lambda d: -0.3 * jnp.mean(prior.log_density(d)))(images)
  np.testing.assert_allclose(out[0] if paired else out, expected, rtol=1e-12)
  if paired:
    np.testing.assert_array_equal(out[1], jnp.ones(2))


@pytest.mark.slow
@pytest.mark.parametrize("name", SOLVER_CASES)
def test_every_solver_takes_the_prior_into_its_image_step(name, digits_prior):
  """One step with the prior at weight w moves D by the optimiser applied to the same gradient plus the prior's.

  Checked with SGD on D, where the difference of the two steps is exactly -lr * (prior's gradient).
  """
  prior = digits_prior[0]
  x, tasks, n_classes = digits_tasks(1)
  problem = bilevel.make_problem(n_visible=64, n_hidden=8, n_classes=n_classes, init_scale=0.1)
  batch = bilevel.sample_batch(jax.random.key(1), tasks, 32)
  images = x[:10]
  solver = make_solver(name)
  plain = type(solver)(**{**solver.__dict__, "image_optimizer": "sgd", "image_lr": 0.1})
  with_prior = type(solver)(**{**plain.__dict__, "prior_weight": 2.0})
  step = lambda s: jax.jit(s.step, static_argnums=0)
  a, _ = step(plain)(problem, plain.init(problem, jax.random.key(0), images), batch)
  b, _ = step(with_prior)(problem, with_prior.init(problem, jax.random.key(0), images, prior=prior), batch)
  expected = -0.1 * jax.grad(lambda d: -2.0 * jnp.mean(prior.log_density(d)))(images)
  np.testing.assert_allclose(b.images - a.images, expected, rtol=1e-7, atol=1e-10)


def test_distill_with_a_prior_gives_likelier_images(digits_prior):
  prior, x, xt = digits_prior
  (_, y), _ = udd_jax.load_dataset("digits")
  common = dict(n_distill=10, n_hidden=8, steps=40, log_every=20, progress=False, init="random", image_lr=0.05)
  without = udd_jax.distill(x, y, **common)
  with_prior = udd_jax.distill(x, y, prior=prior, prior_weight=50.0, **common)
  assert with_prior.config["prior"] == prior.record() and "prior" not in without.config
  assert with_prior.config["solver_options"]["prior_weight"] == 50.0
  ours, theirs = (udd_jax.naturalness(r.images.reshape(10, -1), prior, xt) for r in (with_prior, without))
  assert ours["mean_log_p"] > theirs["mean_log_p"] + 1.0, (ours, theirs)
  assert ours["nearest_real_distance"] < theirs["nearest_real_distance"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(prior_weight=1.0), "prior_weight is 1.0, but no prior was given"),
    (dict(prior="PRIOR"), "a prior was given, but prior_weight is 0"),
    (dict(prior="PRIOR", prior_weight=1.0, preprocessing="standardize"), "a prior needs preprocessing='none'"),
    (dict(prior_weight=-1.0), "prior_weight must be"),
])
def test_bad_prior_arguments_are_refused_before_any_work(kwargs, match):
  (x, y), _ = udd_jax.load_dataset("digits")
  if kwargs.get("prior") == "PRIOR":
    kwargs["prior"] = random_prior(d=64)
  with pytest.raises(ValueError, match=match):
    udd_jax.distill(x, y, n_distill=10, n_hidden=4, steps=1, progress=False, **kwargs)


@pytest.mark.slow
def test_the_app_reports_naturalness_and_refuses_a_weight_without_a_prior(tmp_path, digits_prior):
  from udd_jax import experiment
  path = digits_prior[0].save(tmp_path / "prior.npz")
  common = dict(dataset="digits", n_distill=10, n_hidden=8, steps=20, eval_seeds=1, baselines=(), eval_every=0,
                progress=False)
  summary = experiment.run(workdir=str(tmp_path / "run"), prior=str(path), options=dict(prior_weight=20.0), **common)
  nat = summary["naturalness"]
  assert set(nat) >= {"mean_log_p", "real_log_p_q25", "real_log_p_q75", "nearest_real_distance"}
  assert nat["real_log_p_q25"] < nat["real_log_p_q75"]
  with pytest.raises(ValueError, match="prior_weight needs --prior"):
    experiment.run(workdir=str(tmp_path / "run2"), options=dict(prior_weight=1.0), **common)


@pytest.mark.slow
def test_a_run_with_a_prior_resumes_and_refuses_another_prior(tmp_path, digits_prior):
  prior, x, _ = digits_prior
  (_, y), _ = udd_jax.load_dataset("digits")
  common = dict(n_distill=10, n_hidden=8, log_every=5, checkpoint_every=5, progress=False, prior_weight=5.0)
  whole = udd_jax.distill(x, y, steps=10, prior=prior, **common)
  udd_jax.distill(x, y, steps=5, prior=prior, workdir=tmp_path / "run", **common)
  resumed = udd_jax.distill(x, y, steps=10, prior=prior, workdir=tmp_path / "run", **common)
  np.testing.assert_allclose(resumed.images, whole.images, rtol=1e-6, atol=1e-7)
  other = ImagePrior(prior.params._replace(a=prior.params.a + 0.1), prior.sigma2)
  with pytest.raises(ValueError, match="prior"):
    udd_jax.distill(x, y, steps=10, prior=other, workdir=tmp_path / "run", **common)
