"""D optimised in a basis, D = D0 + C U^T (``image_basis``): the chain is the reparameterisation (float64)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.fft

import udd_jax
from udd_jax import experiment
from udd_jax.bilevel import basis as basis_lib
from udd_jax.bilevel.solvers import base as solver_base
from udd_jax.driver import arguments as driver_arguments
from udd_jax.driver import build as driver_build
from udd_jax.training import optimizers

# Tiny versions of the solvers that take D through its chain in three different ways: jointly
# with (w, heads), alone, and paired with the learned step sizes.
SMALL = dict(penalty=dict(mu=1.0, diversity=0.1), unrolled=dict(unroll_steps=4), pool=dict(pool_size=2, inner_steps=2,
                                                                                             lifetime=6))
N_STEPS = 4


@pytest.fixture(scope="module")
def digits64():
  (x, y), _ = udd_jax.load_dataset("digits")
  x = jnp.asarray(x.reshape(len(x), -1), jnp.float64)
  return x, jnp.asarray(y)


def run_steps(solver, x, y, basis=None, steps=N_STEPS):
  problem = udd_jax.make_problem(n_visible=x.shape[1], n_hidden=6, n_classes=10, head=solver.default_head)
  state = solver.init(problem, jax.random.key(0), x[:8], basis=basis)
  step = jax.jit(lambda s, b: solver.step(problem, s, b))
  for i in range(steps):
    state, _ = step(state, udd_jax.sample_batch(jax.random.key(10 + i), [(x, y)], 32))
  return state


class TodaysChain:
  """D's chain exactly as it was before ``image_basis``: the reference of the pixels basis."""

  def image_transform(self, paired=False):
    parts = []
    if self.diversity and not self.diversity_in_objective:
      parts.append(solver_base.add_diversity(self.diversity, paired))
    parts.append(optimizers.optimizer(self.image_optimizer, self.outer_lr(self.image_lr)))
    if self.image_bounds is not None:
      parts.append(solver_base.project_onto_box(*self.image_bounds, paired=paired))
    return parts[0] if len(parts) == 1 else optax.chain(*parts)


SLOW = pytest.mark.slow  # five seconds or more on 2 cores: compiling the pool's and the unroll's steps


@pytest.mark.parametrize("name", ["penalty", pytest.param("unrolled", marks=SLOW), pytest.param("pool", marks=SLOW)])
def test_pixels_leaves_every_step_bit_identical(digits64, name):
  x, y = digits64
  solver = udd_jax.get_solver(name, image_bounds=(0.0, 1.0), **SMALL[name])
  today = type("Today", (TodaysChain, type(solver)), {})(**{f.name: getattr(solver, f.name) for f in dataclasses.fields(solver)})
  new, old = run_steps(solver, x, y), run_steps(today, x, y)
  assert jax.tree.structure(new) == jax.tree.structure(old)  # no basis in the state
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old)):
    if jnp.issubdtype(a.dtype, jnp.floating):
      np.testing.assert_array_equal(a, b)
  assert not np.array_equal(new.images, x[:8])  # D moved


def test_pixels_is_left_out_of_the_record_and_a_basis_is_kept():
  default = udd_jax.get_solver("pool")
  assert "image_basis" not in default.to_config()  # configs written before the option still match
  assert udd_jax.get_solver(**default.to_config()) == default
  pca = udd_jax.get_solver("implicit", image_basis="pca:16")
  assert pca.to_config()["image_basis"] == "pca:16"
  assert udd_jax.get_solver(**pca.to_config()) == pca


def span_residual(delta, u):
  """Relative norm of the part of ``delta`` outside span(U)."""
  return float(jnp.linalg.norm(delta - delta @ u @ u.T) / jnp.linalg.norm(delta))


@pytest.mark.parametrize("name, spec", [("penalty", "pca:12"), ("penalty", "dct:10"), pytest.param("unrolled", "dct:10", marks=SLOW),
                                        pytest.param("pool", "pca:12", marks=SLOW)])
def test_d_moves_within_its_initial_value_plus_the_span_of_the_basis(digits64, name, spec):
  x, y = digits64
  u = basis_lib.make_image_basis(spec, 64, data=x)
  solver = udd_jax.get_solver(name, image_basis=spec, **SMALL[name])
  # The DCT basis is data-free: init computes it when none is given.
  state = run_steps(solver, x, y, basis=None if spec.startswith("dct") else u)
  delta = state.images - x[:8]
  assert float(jnp.linalg.norm(delta)) > 1e-3  # D moved
  assert span_residual(delta, u) < 1e-12
  assert span_residual(x[:8] + 0.01, u) > 0.1  # the check can fail: a shift of every pixel is not in the span


def loss_of_images(images):
  """A smooth, non-quadratic function of D, so that Adam's moments differ from step to step."""
  w = jnp.sin(jnp.arange(images.size, dtype=images.dtype).reshape(images.shape))
  return jnp.sum(jnp.tanh(images * w)) + 0.1 * jnp.sum(images**4)


@pytest.mark.parametrize("spec", ["dct:5", "pca:7"])
def test_the_chain_is_adam_on_the_coefficients_of_the_reparameterised_problem(digits64, spec):
  x, _ = digits64
  d0 = x[:6]
  u = jnp.asarray(basis_lib.make_image_basis(spec, 64, data=x))
  solver = udd_jax.get_solver("penalty", image_basis=spec, image_lr=0.05, lr_schedule="cosine", decay_steps=8)
  chain, state = solver.image_transform(), solver.init_image_state(d0, u)
  reference = optax.adam(optax.cosine_decay_schedule(0.05, decay_steps=8))
  c = jnp.zeros((6, u.shape[1]))
  c_state = reference.init(c)
  images = d0
  for _ in range(6):
    images, state = solver_base.apply_updates(chain, jax.grad(loss_of_images)(images), state, images)
    c, c_state = solver_base.apply_updates(reference, jax.grad(lambda c: loss_of_images(d0 + c @ u.T))(c), c_state, c)
    np.testing.assert_allclose(images, d0 + c @ u.T, rtol=0, atol=1e-10)
  assert state.inner[0].mu.shape == (6, u.shape[1])  # Adam's moments live in coefficient space
  assert float(jnp.max(jnp.abs(images - d0))) > 1e-2


def test_the_paired_chain_writes_d_only_in_the_basis(digits64):
  """The unrolled solver's chain over (D, log step sizes): D in coefficients, the step sizes as they are."""
  x, _ = digits64
  d0, log_lr = x[:6], jnp.linspace(-1.0, 0.0, 3)
  u = jnp.asarray(basis_lib.dct_basis(5, 64))
  solver = udd_jax.get_solver("unrolled", image_basis="dct:5", image_lr=0.05)
  chain, state = solver.image_transform(paired=True), solver.init_image_state((d0, log_lr), u, paired=True)
  objective = lambda images, lr: loss_of_images(images) * jnp.sum(jnp.exp(lr))
  reference = optax.adam(0.05)
  pair = (jnp.zeros((6, 5)), log_lr)
  pair_state = reference.init(pair)
  params = (d0, log_lr)
  for _ in range(5):
    params, state = solver_base.apply_updates(chain, jax.grad(objective, argnums=(0, 1))(*params), state, params)
    pair, pair_state = solver_base.apply_updates(
        reference, jax.grad(lambda c, lr: objective(d0 + c @ u.T, lr), argnums=(0, 1))(*pair), pair_state, pair)
    np.testing.assert_allclose(params[0], d0 + pair[0] @ u.T, rtol=0, atol=1e-10)
    np.testing.assert_allclose(params[1], pair[1], rtol=0, atol=1e-10)
  assert float(jnp.max(jnp.abs(params[1] - log_lr))) > 1e-2  # the step sizes moved too


def test_dct_basis_is_orthonormal_and_is_the_inverse_dct_of_unit_coefficients():
  u = basis_lib.dct_basis(20, 64)
  np.testing.assert_allclose(u.T @ u, np.eye(20), atol=1e-13)
  full = basis_lib.dct_basis(64, 64)
  np.testing.assert_allclose(full.T @ full, np.eye(64), atol=1e-13)
  frequencies = [(0, 0), (0, 1), (1, 0), (0, 2), (1, 1), (2, 0)]  # lowest first, by k1 + k2
  for column, (k1, k2) in enumerate(frequencies):
    unit = np.zeros((8, 8))
    unit[k1, k2] = 1.0
    np.testing.assert_allclose(u[:, column], scipy.fft.idctn(unit, norm="ortho").reshape(64), atol=1e-13)


def test_pca_basis_is_orthonormal_and_matches_numpys_svd():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12)) + 3.0  # anisotropic, off-centre
  u = basis_lib.pca_basis(5, x)
  np.testing.assert_allclose(u.T @ u, np.eye(5), atol=1e-12)
  _, _, vt = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
  for k in range(5):
    np.testing.assert_allclose(abs(u[:, k] @ vt[k]), 1.0, atol=1e-10)
  np.testing.assert_allclose(np.abs(u[:, 0]), np.abs(vt[0]), atol=1e-10)
  assert np.array_equal(basis_lib.pca_basis(5, x), u)  # the same data gives the same signs


@pytest.mark.parametrize("spec, error, message", [
    ("wavelet:4", ValueError, r"unknown image_basis 'wavelet:4'; valid forms are 'pixels', 'pca:R' or 'dct:R'"),
    ("pca", ValueError, r"image_basis 'pca' needs its size: 'pca:R'"),
    ("pca:0", ValueError, r"the size R must be a positive integer; got '0'"),
    ("dct:-3", ValueError, r"the size R must be a positive integer; got '-3'"),
    ("pca:1.5", ValueError, r"the size R must be a positive integer; got '1.5'"),
    ("pixels:4", ValueError, r"image_basis 'pixels' takes no size"),
    (64, TypeError, r"image_basis must be a string"),
])
def test_a_bad_basis_name_is_refused_when_the_solver_is_built(spec, error, message):
  with pytest.raises(error, match=message):
    udd_jax.get_solver("pool", image_basis=spec)


def test_a_basis_that_does_not_fit_the_inputs_is_refused():
  with pytest.raises(ValueError, match=r"the size R = 65 exceeds the inputs' dimension d = 64"):
    basis_lib.check_image_basis("pca:65", 64)
  with pytest.raises(ValueError, match=r"'dct:4' needs square images \(d = s \* s\), but the inputs have d = 48"):
    basis_lib.make_image_basis("dct:4", 48)
  with pytest.raises(ValueError, match=r"is computed from the real inputs: pass basis=make_image_basis"):
    basis_lib.make_image_basis("pca:4", 64)
  solver = udd_jax.get_solver("penalty", image_basis="pca:4")
  images = jnp.zeros((5, 64))
  with pytest.raises(ValueError, match=r"is computed from the real inputs"):
    solver.init_image_state(images)
  with pytest.raises(ValueError, match=r"must have shape \(64, 4\); got \(64, 3\)"):
    solver.init_image_state(images, np.eye(64)[:, :3])
  with pytest.raises(ValueError, match=r"must have orthonormal columns"):
    solver.init_image_state(images, 2 * np.eye(64)[:, :4])
  with pytest.raises(ValueError, match=r"a basis was given, but the solver's image_basis is 'pixels'"):
    udd_jax.get_solver("penalty").init_image_state(images, np.eye(64)[:, :4])


def test_distill_refuses_a_basis_larger_than_the_inputs_before_compiling():
  (x, y), _ = udd_jax.load_dataset("digits")
  with pytest.raises(ValueError, match=r"image_basis 'pca:100': the size R = 100 exceeds the inputs' dimension d = 64"):
    udd_jax.distill(x, y, n_distill=5, n_hidden=4, image_basis="pca:100")
  with pytest.raises(ValueError, match=r"unknown image_basis 'fourier:8'"):
    udd_jax.distill(x, y, n_distill=5, n_hidden=4, image_basis="fourier:8")


@SLOW
def test_distill_on_digits_in_a_pca_basis(tmp_path):
  (x, y), _ = udd_jax.load_dataset("digits")
  options = dict(n_distill=10, n_hidden=8, batch_size=64, progress=False, log_every=2, checkpoint_every=2,
                 pool_size=2, inner_steps=2, image_basis="pca:16")
  result = udd_jax.distill(x, y, steps=4, workdir=tmp_path, **options)
  assert result.images.shape == (10, 8, 8) and np.isfinite(result.images).all()
  assert result.config["solver_options"]["image_basis"] == "pca:16"
  # D - D0 is in the span of the real inputs' top 16 principal directions (float32 run).
  (x0, _), = driver_arguments.tasks_from_inputs(x, y)
  u = basis_lib.pca_basis(16, x0.reshape(len(x0), -1))
  d0 = np.asarray(driver_build.initial_images("real", jax.random.split(jax.random.key(0), 3)[0], x0.reshape(len(x0), -1),
                                             10))
  delta = result.images.reshape(10, -1) - d0
  assert np.linalg.norm(delta) > 1e-2 and span_residual(jnp.asarray(delta, jnp.float64), jnp.asarray(u)) < 1e-4
  # The basis travels in the checkpoint: two more steps resume from it.
  longer = udd_jax.distill(x, y, steps=6, workdir=tmp_path, **options)
  assert np.isfinite(longer.images).all() and [h["step"] for h in longer.history][-1] == 6


def test_the_option_comes_through_opt_as_a_plain_string():
  options = experiment.parse_options(["image_basis=pca:64"])
  assert options == {"image_basis": "pca:64"}
  experiment.check_options("implicit", options)
  with pytest.raises(ValueError, match=r"image_basis 'dct' needs its size"):
    experiment.check_options("pool", experiment.parse_options(["image_basis=dct"]))
