"""MTT: its loss, expert trajectories on disk (resumable), and distillation, on tiny settings."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from udd_jax.supervised import experts as experts_lib
from udd_jax.supervised import mtt
from udd_jax.supervised.networks import MLP, init_params, set_loss
from udd_jax.training import unroll


def test_mtt_loss_is_zero_when_the_student_reproduces_the_expert_and_positive_otherwise():
  net = MLP(n_classes=3, width=8)
  images = jax.random.normal(jax.random.key(0), (6, 8, 8, 1), dtype=jnp.float64)
  labels = jnp.array([0, 0, 1, 1, 2, 2])
  start = init_params(net, jax.random.key(1), (8, 8, 1))
  batches = jnp.array([[0, 2, 4], [1, 3, 5], [0, 1, 2], [3, 4, 5]])
  # The "expert" is the student's own unroll: the same steps on the same set.
  target = unroll(set_loss(net), start, (images, labels), jnp.full((4,), 0.3), xs=batches)
  loss = jax.jit(lambda i, lr, t: mtt.mtt_loss(net, i, labels, lr, start, t, syn_steps=4, batches=batches))
  assert float(loss(images, 0.3, target)) == 0.0
  assert float(loss(images, 0.25, target)) > 1e-6
  assert float(loss(images + 0.1, 0.3, target)) > 1e-6
  # lr 0: the student stays at the start, whose normalised distance is 1 by construction.
  assert float(loss(images, 0.0, target)) == pytest.approx(1.0, rel=1e-12)
  # Against a hand computation for another target.
  other = jax.tree.map(lambda p: p + 0.01, target)
  flat = lambda p: jnp.concatenate([a.ravel() for a in jax.tree.leaves(p)])
  want = jnp.sum((flat(target) - flat(other)) ** 2) / jnp.sum((flat(start) - flat(other)) ** 2)
  assert float(loss(images, 0.3, other)) == pytest.approx(float(want), rel=1e-10)


def test_mtt_loss_rejects_batches_of_the_wrong_length():
  net = MLP(n_classes=2, width=4)
  x = jnp.ones((2, 3, 3, 1))
  p = net.init(jax.random.key(0), x)["params"]
  with pytest.raises(ValueError, match="syn_steps"):
    mtt.mtt_loss(net, x, jnp.array([0, 1]), 0.1, p, p, syn_steps=3, batches=jnp.zeros((2, 1), int))


EXPERT_ARGS = dict(network="mlp", width=8, epochs=3, seed=0, lr=0.05, batch_size=64)


@pytest.fixture(scope="module")
def experts(digits3, tmp_path_factory):
  x, y = digits3
  workdir = tmp_path_factory.mktemp("experts")
  calls = []
  made = experts_lib.train_experts(x, y, n_experts=2, workdir=workdir, callback=lambda *a: calls.append(a), **EXPERT_ARGS)
  return workdir, made, calls


def test_train_experts_writes_one_trajectory_per_expert(experts):
  workdir, made, calls = experts
  assert made.trained == [0, 1]
  assert [p.name for p in made.paths] == ["expert_0000.npz", "expert_0001.npz"]
  assert sorted(p.name for p in workdir.iterdir()) == ["expert_0000.npz", "expert_0001.npz", "experts.json"]
  assert [(e, ep) for e, ep, _ in calls] == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
  manifest, trajectories = experts_lib.load_experts(workdir)
  n_params = 64 * 8 + 8 + 8 * 8 + 8 + 8 * 3 + 3
  assert trajectories.shape == (2, 4, n_params) and manifest["n_params"] == n_params
  assert manifest["n_experts"] == 2 and manifest["epochs"] == 3 and manifest["network"] == "mlp"
  # Distinct inits, and training moves the parameters and lowers the loss.
  assert not np.allclose(trajectories[0, 0], trajectories[1, 0])
  assert np.linalg.norm(trajectories[:, -1] - trajectories[:, 0], axis=-1).min() > 0.1
  with np.load(made.paths[0]) as f:
    losses = f["train_loss"]
  assert losses.shape == (3,) and losses[-1] < losses[0]


def test_train_experts_resumes(experts, digits3, tmp_path):
  workdir = shutil.copytree(experts[0], tmp_path / "experts")  # the module's directory stays as it is
  made = experts[1]._replace(paths=[workdir / p.name for p in experts[1].paths])
  x, y = digits3
  before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in workdir.iterdir()}
  calls = []
  again = experts_lib.train_experts(x, y, n_experts=2, workdir=workdir, callback=lambda *a: calls.append(a), **EXPERT_ARGS)
  assert again.trained == [] and calls == [] and again.paths == made.paths
  assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in workdir.iterdir()} == before
  # An expert lost (an interrupted run) is trained again, identically; more experts can be asked for.
  _, trajectories = experts_lib.load_experts(workdir)
  made.paths[1].unlink()
  more = experts_lib.train_experts(x, y, n_experts=3, workdir=workdir, **EXPERT_ARGS)
  assert more.trained == [1, 2]
  assert made.paths[0].read_bytes() == before["expert_0000.npz"][0]
  manifest, after = experts_lib.load_experts(workdir)
  assert manifest["n_experts"] == 3 and after.shape[0] == 3
  np.testing.assert_array_equal(after[:2], trajectories)
  assert more.paths[2] == workdir / "expert_0002.npz"


def test_train_experts_host_and_scan_loops_take_the_same_steps(experts, digits3, tmp_path):
  x, y = digits3  # float64 (x64 is on): 431 images in batches of 64, the last 47 dropped every epoch
  workdir, made, _ = experts  # the host loop's, when the default backend is the CPU
  scan = experts_lib.train_experts(x, y, n_experts=2, workdir=tmp_path, loop="scan", **EXPERT_ARGS)
  host = experts_lib.train_experts(x, y, n_experts=2, workdir=tmp_path / "host", loop="host", **EXPERT_ARGS)
  for h, s in zip(host.paths, scan.paths):
    with np.load(h) as a, np.load(s) as b:
      assert a["trajectory"].dtype == np.float64
      np.testing.assert_allclose(a["trajectory"], b["trajectory"], rtol=1e-12, atol=1e-12)
      np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-12)
  # The loop is not an argument a resumed directory must agree on; an unknown one is refused.
  assert experts_lib.train_experts(x, y, n_experts=2, workdir=workdir, loop="scan", **EXPERT_ARGS).trained == []
  with pytest.raises(ValueError, match=r"unknown loop 'gpu'; valid options are \['auto', 'host', 'scan'\]"):
    experts_lib.train_experts(x, y, n_experts=2, workdir=workdir, loop="gpu", **EXPERT_ARGS)


@pytest.mark.parametrize(
    "change, match",
    [(dict(lr=0.1), "lr: 0.05 on disk vs 0.1"), (dict(epochs=4), "epochs"), (dict(seed=1), "seed"),
     (dict(network="convnet", depth=1), "network")],
)
def test_train_experts_refuses_a_workdir_made_with_other_arguments(experts, digits3, change, match):
  workdir, _, _ = experts
  x, y = digits3
  with pytest.raises(ValueError, match=match):
    experts_lib.train_experts(x, y, n_experts=2, workdir=workdir, **(EXPERT_ARGS | change))


def test_train_experts_refuses_other_data(experts, digits3):
  workdir, _, _ = experts
  x, y = digits3
  with pytest.raises(ValueError, match="data_sha256"):
    experts_lib.train_experts(x[::-1], y[::-1], n_experts=2, workdir=workdir, **EXPERT_ARGS)


@pytest.fixture(scope="module")
def mtt_run(experts, digits3):
  workdir, _, _ = experts
  x, y = digits3
  return mtt.distill_mtt(x, y, ipc=2, seed=0, expert_dir=workdir, syn_steps=6, expert_epochs=1,
                         batch_syn=4, image_lr=30.0, student_lr_lr=1e-4, iterations=40)


def test_distill_mtt_reduces_the_trajectory_loss(mtt_run):
  losses = np.array([h["loss"] for h in mtt_run.history])
  assert len(losses) == 40
  assert losses[-10:].mean() < losses[:10].mean() - 0.02, (losses[:10], losses[-10:])
  experts = {h["expert"] for h in mtt_run.history}
  starts = {h["start_epoch"] for h in mtt_run.history}
  assert experts == {0.0, 1.0} and starts == {0.0, 1.0, 2.0}  # max_start_epoch = 3 - 1 + 1


def test_distill_mtt_result_and_config(mtt_run, digits3):
  r = mtt_run
  assert r.images.shape == (6, 8, 8, 1) and r.labels.tolist() == [0, 0, 1, 1, 2, 2]
  assert r.step_sizes.shape == (1,) and r.step_sizes[0] != pytest.approx(0.01)
  assert r.history[-1]["student_lr"] == pytest.approx(float(r.step_sizes[0]), rel=0.1)
  c = r.config
  assert (c["method"], c["network"], c["n_experts"], c["max_start_epoch"], c["batch_syn"], c["iterations"]) == (
      "mtt", "mlp", 2, 3, 4, 40)
  # init="real": the set starts as real images of each class and stays recognisable.
  x, y = digits3
  means = np.stack([x[y == c_].reshape(-1, 64).mean(0) for c_ in range(3)])
  nearest = ((r.images.reshape(-1, 1, 64) - means[None]) ** 2).sum(-1).argmin(-1)
  assert nearest.tolist() == r.labels.tolist()


def test_distill_mtt_rejects_bad_arguments(experts, digits3, tmp_path):
  workdir, _, _ = experts
  x, y = digits3
  with pytest.raises(ValueError, match="max_start_epoch=4 is too large"):
    mtt.distill_mtt(x, y, ipc=1, seed=0, expert_dir=workdir, max_start_epoch=4)
  with pytest.raises(ValueError, match="expert_epochs=4 exceeds"):
    mtt.distill_mtt(x, y, ipc=1, seed=0, expert_dir=workdir, expert_epochs=4)
  with pytest.raises(FileNotFoundError, match="experts.json"):
    mtt.distill_mtt(x, y, ipc=1, seed=0, expert_dir=tmp_path)
  with pytest.raises(ValueError, match="images of shape"):
    mtt.distill_mtt(x[:, :4, :4], y, ipc=1, seed=0, expert_dir=workdir)
  with pytest.raises(ValueError, match="unknown init"):
    mtt.distill_mtt(x, y, ipc=1, seed=0, expert_dir=workdir, init="kmeans")
  with pytest.raises(ValueError, match="class 0 has"):
    mtt.distill_mtt(x[y > 0], y[y > 0], ipc=1, seed=0, expert_dir=workdir)
  with pytest.raises(ValueError, match="ipc"):
    mtt.distill_mtt(x, y, ipc=0, seed=0, expert_dir=workdir)
