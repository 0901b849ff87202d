"""A supervised distillation stopped midway resumes from its checkpoint and ends where an uninterrupted run ends."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from udd_jax.supervised import base, dm, kip


class _Stop(Exception):
  pass


def _data():
  rng = np.random.default_rng(0)
  return rng.normal(size=(40, 8, 8, 1)).astype(np.float32), np.arange(40) % 2


def _distil(checkpoint=None, *, iterations=6, ipc=2, callback=None):
  x, y = _data()
  return dm.distill_dm(x, y, ipc=ipc, seed=0, network="mlp", width=4, iterations=iterations, batch_real=8,
                       dsa_strategy="crop", checkpoint=checkpoint, callback=callback)


def _stop_at(iteration):
  def callback(i, record):
    if i == iteration:
      raise _Stop
  return callback


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path):
  whole = _distil()
  ckpt = base.Checkpoint(tmp_path / "ckpt.npz", every_seconds=0.0, tag="dm test")
  with pytest.raises(_Stop):
    _distil(ckpt, callback=_stop_at(4))  # iteration 4 is logged before its update lands: 3 updates saved
  assert ckpt.path.is_file()
  resumed = _distil(ckpt)
  np.testing.assert_array_equal(resumed.images, whole.images)
  assert resumed.config["iterations"] == 6
  assert [r["iteration"] for r in resumed.history] == [r["iteration"] for r in whole.history] == list(range(1, 7))
  np.testing.assert_array_equal([r["loss"] for r in resumed.history], [r["loss"] for r in whole.history])
  # A finished checkpoint resumes to the same set without another step.
  np.testing.assert_array_equal(_distil(ckpt).images, whole.images)


def test_sigterm_saves_and_the_run_resumes_to_the_uninterrupted_result(tmp_path):
  whole = _distil()
  ckpt = base.Checkpoint(tmp_path / "ckpt.npz", every_seconds=1e9, tag="dm test")  # no periodic save

  def terminate(i, record):
    if i == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  previous = signal.getsignal(signal.SIGTERM)
  with pytest.raises(SystemExit) as stopped:
    _distil(ckpt, callback=terminate)
  assert stopped.value.code == 128 + signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) is previous  # the handler is put back
  assert ckpt.path.is_file()
  resumed = _distil(ckpt)
  np.testing.assert_array_equal(resumed.images, whole.images)
  np.testing.assert_array_equal([r["loss"] for r in resumed.history], [r["loss"] for r in whole.history])


def test_a_diverged_state_is_never_saved(tmp_path):
  def step(x, key):  # the update after x = 3 diverges; the loss is the entering state's
    return jnp.where(x < 3, x + 1, jnp.nan), {"loss": x}

  ckpt = base.Checkpoint(tmp_path / "ckpt.npz", every_seconds=0.0)
  budget = base.Budget.check(10, checkpoint=ckpt)
  state, log = base.run_outer_loop(step, jnp.float32(0.0), jax.random.key(0), budget)
  assert (float(state), log.iterations, log.stopped) == (3.0, 3, "non_finite_loss")
  with np.load(ckpt.path) as saved:
    states = [saved[k] for k in saved.files if k.startswith("state/") and saved[k].dtype == np.float32]
    assert states and all(np.isfinite(x).all() for x in states)
    assert '"done": 3' in str(saved["meta"])


def test_kip_resumes_to_the_uninterrupted_result(tmp_path):
  x, y = _data()
  run = lambda **kw: kip.distill_kip(x.reshape(40, -1, 1, 1)[:, :16], y, ipc=2, seed=0, iterations=6, log_every=1,
                                     batch_target=8, **kw)
  whole = run()
  ckpt = base.Checkpoint(tmp_path / "kip.npz", every_seconds=0.0)
  with pytest.raises(_Stop):
    run(checkpoint=ckpt, callback=_stop_at(3))
  resumed = run(checkpoint=ckpt)
  np.testing.assert_array_equal(resumed.images, whole.images)
  np.testing.assert_array_equal(resumed.labels, whole.labels)
  assert [r["iteration"] for r in resumed.history] == list(range(6))


def test_a_longer_budget_continues_from_the_checkpoint(tmp_path):
  ckpt = base.Checkpoint(tmp_path / "ckpt.npz", tag="dm test")
  _distil(ckpt, iterations=3)
  continued = _distil(ckpt, iterations=6)
  np.testing.assert_array_equal(continued.images, _distil(iterations=6).images)


def test_checkpoint_of_another_run_is_refused(tmp_path):
  path = tmp_path / "ckpt.npz"
  _distil(base.Checkpoint(path, tag="run a"), iterations=2)
  with pytest.raises(ValueError, match="another run: its tag is 'run a'"):
    _distil(base.Checkpoint(path, tag="run b"), iterations=2)
  with pytest.raises(ValueError, match="another structure or shapes"):
    _distil(base.Checkpoint(path, tag="run a"), iterations=2, ipc=3)
  flags = tmp_path / "flags.npz"  # a tag that is a JSON object: the message names the fields that differ
  _distil(base.Checkpoint(flags, tag='{"seed": 0, "width": 4, "ipc": 2}'), iterations=2)
  with pytest.raises(ValueError, match=r"seed is 0 there, 1 here; width is 4 there, 5 here\. Delete it"):
    _distil(base.Checkpoint(flags, tag='{"seed": 1, "width": 5, "ipc": 2}'), iterations=2)
  path.write_bytes(b"not a checkpoint")
  with pytest.raises(ValueError, match="Delete it to start over"):
    _distil(base.Checkpoint(path, tag="run a"), iterations=2)


@pytest.mark.parametrize("bad, error", [(3, TypeError), (base.Checkpoint("x.npz", every_seconds=-1.0), ValueError),
                                        (base.Checkpoint("x.npz", tag=1), TypeError)])
def test_bad_checkpoint_is_refused_before_any_work(bad, error):
  with pytest.raises(error, match="checkpoint"):
    _distil(bad)
