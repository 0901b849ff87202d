"""DD, the unrolled SGD it shares with MTT and GTN (udd_jax.training.unroll) and the outer loop, on tiny settings (float64)."""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from udd_jax.supervised import base, dd, labelled
from udd_jax.supervised.networks import cross_entropy, init_params, set_loss
from udd_jax.supervised.networks import MLP, get_network
from udd_jax.supervised.result import SupervisedResult
from udd_jax.training import unroll


@pytest.fixture(scope="module")
def tiny():
  """An MLP with float64 params and a 6-image set, for exact comparisons."""
  net = MLP(n_classes=3, width=8)
  images = jax.random.normal(jax.random.key(1), (6, 8, 8, 1), dtype=jnp.float64)
  labels = jnp.array([0, 0, 1, 1, 2, 2])
  params0 = init_params(net, jax.random.key(2), (8, 8, 1))
  return net, params0, images, labels


@functools.partial(jax.jit, static_argnums=0)
def _hand_sgd(net, params, images, labels, step_sizes, batches):
  # A Python loop of hand-written SGD steps (jitted only to keep the test fast).
  for t in range(step_sizes.shape[0]):
    idx = np.arange(labels.shape[0]) if batches is None else batches[t]
    grads = jax.grad(lambda p: cross_entropy(net, p, images[idx], labels[idx]))(params)
    params = jax.tree.map(lambda p, g: p - step_sizes[t] * g, params, grads)
  return params


@pytest.mark.slow
@pytest.mark.parametrize("with_batches", [True, False])
def test_unroll_sgd_equals_a_python_loop_of_sgd_steps(tiny, with_batches):
  net, params0, images, labels = tiny
  assert all(p.dtype == jnp.float64 for p in jax.tree.leaves(params0))
  step_sizes = jnp.array([0.3, 0.1, 0.5, 0.2])
  batches = jnp.array([[0, 2, 4], [1, 3, 5], [0, 1, 2], [3, 4, 5]]) if with_batches else None
  got = unroll(set_loss(net), params0, (images, labels), step_sizes, xs=batches)
  want = _hand_sgd(net, params0, images, labels, step_sizes, batches)
  for g, w, p in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(params0)):
    np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)
    assert g.dtype == p.dtype
  # The steps did something: the loss on the set went down.
  assert cross_entropy(net, got, images, labels) < cross_entropy(net, params0, images, labels) - 0.05


@pytest.mark.slow
def test_unroll_sgd_gradient_matches_finite_differences_and_remat_changes_nothing(tiny):
  net, params0, images, labels = tiny
  x_real = jax.random.normal(jax.random.key(3), (9, 8, 8, 1), dtype=jnp.float64)
  y_real = jnp.arange(9) % 3
  batches = jnp.array([[0, 2, 4], [1, 3, 5], [5, 0, 3]])

  @functools.partial(jax.jit, static_argnames="remat")
  def outer(images, step_sizes, remat=False):
    params = unroll(set_loss(net), params0, (images, labels), step_sizes, xs=batches, remat=remat)
    return cross_entropy(net, params, x_real, y_real)

  step_sizes = jnp.array([0.4, 0.2, 0.3])
  check_grads(outer, (images, step_sizes), order=1, modes=("rev",), eps=1e-5, atol=1e-6, rtol=1e-6)
  plain = jax.grad(outer, argnums=(0, 1))(images, step_sizes)
  remat = jax.grad(lambda i, s: outer(i, s, remat=True), argnums=(0, 1))(images, step_sizes)
  np.testing.assert_allclose(remat[0], plain[0], rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(remat[1], plain[1], rtol=1e-12, atol=1e-14)
  assert np.abs(plain[1]).min() > 0  # every step size matters to the outer loss


def test_step_batches_lays_out_the_paper_setting_and_uses_every_image():
  # ipc = steps = 10 (DD on MNIST): each step one image of each class, each image once per epoch.
  b = dd.step_batches(n_classes=3, ipc=10, steps=10)
  assert b.shape == (10, 3)
  labels = labelled.synthetic_labels(3, 10)
  assert (labels[b] == np.arange(3)).all()
  assert sorted(b.ravel().tolist()) == list(range(30))
  # ipc = 1: the whole set at every step.
  assert (dd.step_batches(n_classes=3, ipc=1, steps=4) == np.arange(3)).all()
  # steps does not divide ipc: equal batches, every image used at least once.
  b = dd.step_batches(n_classes=2, ipc=15, steps=10)
  assert b.shape == (10, 4) and set(b.ravel().tolist()) == set(range(30))
  assert (labelled.synthetic_labels(2, 15)[b] == [0, 0, 1, 1]).all()


class _CompileCounter(logging.Handler):
  def __init__(self):
    super().__init__()
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def dd_run(digits3):
  x, y = digits3
  counter = _CompileCounter()
  logger = logging.getLogger("jax._src.interpreters.pxla")
  logger.addHandler(counter)
  records = []
  try:
    with jax.log_compiles():
      result = dd.distill_dd(
          x, y, ipc=2, seed=0, network="mlp", width=16, steps=2, epochs=2, n_inits=4, iterations=40,
          image_lr=0.05, step_size_lr=0.05, init_lr=0.1, batch_real=128,
          callback=lambda i, r: records.append((i, r["loss"])),
      )
  finally:
    logger.removeHandler(counter)
  return result, counter.messages, records


@pytest.mark.slow
def test_distill_dd_reduces_its_outer_loss_and_learns_step_sizes(dd_run):
  result, _, records = dd_run
  losses = np.array([h["loss"] for h in result.history])
  assert len(losses) == 40 and records == [(h["iteration"], h["loss"]) for h in result.history]
  assert losses[-5:].mean() < losses[:5].mean() - 0.2, (losses[:5], losses[-5:])
  assert result.step_sizes.shape == (4,)
  assert np.all(result.step_sizes > 0) and np.abs(result.step_sizes - 0.1).max() > 0.01


def test_distill_dd_result_and_config(dd_run):
  result, _, _ = dd_run
  assert isinstance(result, SupervisedResult)
  assert result.images.shape == (6, 8, 8, 1) and result.images.dtype == np.float32
  assert result.labels.tolist() == [0, 0, 1, 1, 2, 2]
  c = result.config
  assert c["method"] == "dd" and c["ipc"] == 2 and c["network"] == "mlp" and c["seed"] == 0
  assert c["iterations"] == 40 and c["stopped"] == "iterations" and c["steps"] == 2 and c["epochs"] == 2
  assert c["seconds"] > 0 and c["init_lr"] == 0.1


def test_distill_dd_defaults_follow_the_reference_schedule(digits3):
  x, y = digits3
  n = x.shape[0]
  result = dd.distill_dd(x, y, ipc=1, seed=0, network="mlp", width=4, steps=2, epochs=1, max_seconds=1e-9)
  c = result.config
  # 400 epochs of the real data in batches of 1024 (all n < 1024 images here: one iteration per epoch), the step
  # sizes halved every 40 epochs, one fresh init per iteration, initial step sizes 0.02, Adam's b1 0.5.
  assert n < 1024 and c["batch_real"] == n
  assert c["max_iterations"] == 400 and c["decay"] == {"every_iterations": 40, "factor": 0.5}
  assert (c["n_inits"], c["init_lr"], c["adam_b1"], c["iterations"], c["stopped"]) == (1, 0.02, 0.5, 1, "max_seconds")
  big = np.concatenate([x] * (2048 // n + 1))[:2049]
  c = dd.distill_dd(big, np.resize(y, 2049), ipc=1, seed=0, network="mlp", width=4, steps=2, epochs=1,
                    max_seconds=1e-9).config
  assert c["max_iterations"] == 400 * 3 and c["decay"]["every_iterations"] == 40 * 3  # ceil(2049 / 1024) = 3


def test_distill_dd_compiles_its_step_once(dd_run):
  _, messages, _ = dd_run
  assert sum("Compiling jit(dd_step)" in m for m in messages) == 1


def test_retrain_dd_follows_the_learned_recipe_and_beats_chance(dd_run, digits3):
  result, _, _ = dd_run
  key = jax.random.key(7)
  got = dd.retrain_dd(result, key)
  net = get_network("mlp", 3, width=16)
  batches = np.tile(dd.step_batches(3, 2, 2), (2, 1))
  want = _hand_sgd(net, init_params(net, key, (8, 8, 1)), jnp.asarray(result.images, jnp.float64),
                   jnp.asarray(result.labels), jnp.asarray(result.step_sizes, jnp.float64), batches)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-10)
  x, y = digits3
  accuracy = float((net.apply({"params": got}, jnp.asarray(x)).argmax(-1) == y).mean())
  assert accuracy > 0.6  # chance is 1/3; 6 images trained 4 steps


def test_outer_loop_stops_at_max_seconds_and_keeps_the_last_finite_state():
  def step(state, key):
    return state + 1, {"loss": np.inf if state == 3 else 1.0 / (3 - state)}

  state, log = base.run_outer_loop(step, 0, jax.random.key(0), base.Budget(100, max_seconds=1e-9))
  assert (state, log.iterations, log.stopped, len(log.history)) == (1, 1, "max_seconds", 1)
  state, log = base.run_outer_loop(step, 0, jax.random.key(0), base.Budget(100))
  # State 3 has an infinite loss: the update that made it diverged, so the state before it is kept.
  assert (state, log.iterations, log.stopped) == (2, 2, "non_finite_loss")
  assert [h["loss"] for h in log.history] == [1 / 3, 1 / 2, 1.0]


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(ipc=0), ValueError, "ipc"),
        (dict(ipc=1.5), TypeError, "ipc"),
        (dict(network="resnet"), ValueError, "network"),
        (dict(steps=0), ValueError, "steps"),
        (dict(init_lr=-0.1), ValueError, "init_lr"),
        (dict(iterations=0), ValueError, "iterations"),
        (dict(n_classes=2), ValueError, "out of range"),
        (dict(seed="seed"), TypeError, "seed must be"),
        (dict(callback=3), TypeError, "callback"),
    ],
)
def test_distill_dd_rejects_bad_arguments(digits3, change, error, match):
  x, y = digits3
  args = dict(ipc=1, seed=0, network="mlp", iterations=1) | change
  with pytest.raises(error, match=match):
    dd.distill_dd(x, y, **args)


def test_distill_dd_rejects_bad_data(digits3):
  x, y = digits3
  bad = x.copy()
  bad[0, 0, 0, 0] = np.nan
  with pytest.raises(ValueError, match="x contains 1 non-finite"):
    dd.distill_dd(bad, y, ipc=1, seed=0)
  with pytest.raises(ValueError, match="y has"):
    dd.distill_dd(x, y[:-1], ipc=1, seed=0)
  with pytest.raises(ValueError, match="rank"):
    dd.distill_dd(x[:, :, 0, 0], y, ipc=1, seed=0)


def test_retrain_dd_needs_a_dd_result(dd_run):
  result, _, _ = dd_run
  other = SupervisedResult(result.images, result.labels, dict(result.config, method="dm"))
  with pytest.raises(TypeError, match="distill_dd"):
    dd.retrain_dd(other, 0)
