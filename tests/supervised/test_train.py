"""DC-BENCH evaluation: training from scratch on a small set, vmapped runs, the schedule, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from udd_jax import training
from udd_jax.supervised import networks, train

from .images import blob_images

CENTERS = ((2, 2), (2, 5), (5, 4))  # one blob per class on an 8x8 image


def blobs(n_per_class, seed, noise=0.3):
  """3 classes of 8x8 grey images: a Gaussian blob at a class-specific place, plus noise."""
  x, y = blob_images(CENTERS, n_per_class, seed, noise)
  return x.astype(np.float64), y


@pytest.fixture(scope="module")
def data():
  return blobs(5, seed=0), blobs(30, seed=1)


SMALL_CONVNET = networks.get_network("convnet", 3, width=8, depth=1)
MLP = networks.get_network("mlp", 3, width=16)
# Tests share this configuration so that they share compiled functions (compiling dominates).
SHARED = dict(epochs=5, lr=0.05, batch_size=4)


@pytest.mark.slow
def test_train_network_learns_blobs(data):
  (x, y), (xt, yt) = data
  params = train.train_network(SMALL_CONVNET, x, y, jax.random.key(0), epochs=100, lr=0.05, batch_size=8)
  acc = float(train.accuracy(SMALL_CONVNET, jax.tree.map(lambda p: p[None], params), xt, yt)[0])
  assert acc >= 0.95  # chance is 1/3


def test_soft_labels_train_with_mean_squared_error(data):
  (x, y), (xt, yt) = data
  targets = np.eye(3)[y]
  params = train.train_network(MLP, x, targets, jax.random.key(1), epochs=300, lr=0.5, batch_size=8)
  logits = MLP.apply({"params": params}, xt)
  assert float(jnp.mean(jnp.argmax(logits, -1) == yt)) >= 0.95
  # Regression, not classification: the logits approach the one-hot targets themselves.
  train_logits = MLP.apply({"params": params}, x)
  assert float(jnp.mean((train_logits - targets) ** 2)) < 1e-3


def _reference_training(module, x, y, key, *, epochs, lr, momentum, weight_decay, batch_size, augment):
  """The schedule written out with Python loops and torch-style SGD (no optax, no padding)."""
  n = x.shape[0]
  steps_per_epoch = -(-n // batch_size)
  k_init, k_data = jax.random.split(key)
  params = jax.tree.map(np.asarray, jax.jit(module.init)(k_init, x[:1])["params"])
  buf = jax.tree.map(np.zeros_like, params)
  augment = jax.jit(augment)

  @jax.jit
  @jax.grad
  def grad(p, xb, yb):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(module.apply({"params": p}, xb), yb))

  t = 0
  for e in range(epochs):
    k_perm, k_aug = jax.random.split(jax.random.fold_in(k_data, e))
    perm = np.asarray(jax.random.permutation(k_perm, n))
    aug_keys = jax.random.split(k_aug, steps_per_epoch)
    for s in range(steps_per_epoch):
      idx = perm[s * batch_size:(s + 1) * batch_size]
      xb = augment(x[idx], aug_keys[s])
      g = jax.tree.map(np.asarray, grad(params, xb, y[idx]))
      step_lr = lr if t < (epochs // 2) * steps_per_epoch else 0.1 * lr
      buf = jax.tree.map(lambda b, gi, p: momentum * b + gi + weight_decay * p, buf, g, params)
      params = jax.tree.map(lambda p, b: p - step_lr * b, params, buf)
      t += 1
  return params


@pytest.mark.slow
def test_training_matches_python_reference_with_short_last_batch_and_augment(data):
  (x, y), _ = data  # 15 images in batches of 4: the last batch of every epoch has 3

  def augment(xb, key):  # a key-dependent shift, cheaper to compile than random sampling
    return xb + 0.02 * (jax.random.key_data(key)[-1] % 11).astype(xb.dtype)

  options = SHARED | dict(momentum=0.9, weight_decay=5e-4, augment=augment)
  got = train.train_network(MLP, x, y, jax.random.key(3), **options)
  want = _reference_training(MLP, x, y, jax.random.key(3), **options)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
  without_augment = train.train_network(MLP, x, y, jax.random.key(3), **SHARED)
  assert not np.allclose(without_augment["classifier"]["kernel"], got["classifier"]["kernel"])


@pytest.mark.parametrize("labels", ["integer", "soft"])
def test_host_and_scan_loops_take_the_same_steps(data, labels):
  (x, y), (xt, yt) = data  # float64; 15 images in batches of 4: a padded last batch every epoch
  if labels == "soft":
    y = np.eye(3)[y]

  def augment(xb, key):
    return xb + 0.02 * (jax.random.key_data(key)[-1] % 11).astype(xb.dtype)

  options = dict(epochs=3, lr=0.05, batch_size=4, momentum=0.9, weight_decay=5e-4, augment=augment)
  host = train.train_network(MLP, x, y, jax.random.key(7), loop="host", **options)
  scan = train.train_network(MLP, x, y, jax.random.key(7), loop="scan", **options)
  assert jax.tree.structure(host) == jax.tree.structure(scan)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12), host, scan)
  start = train.train_network(MLP, x, y, jax.random.key(7), loop="scan", **(options | dict(epochs=1)))
  assert not np.allclose(start["classifier"]["kernel"], scan["classifier"]["kernel"])  # the epochs did train
  if labels == "integer":
    reports = [train.evaluate_synset(x, y, (xt, yt), seed=1, network=MLP, runs=2, loop=loop, **options)
               for loop in ("host", "scan")]
    assert reports[0]["accuracies"] == reports[1]["accuracies"]


def test_auto_loop_is_the_host_loop_on_the_cpu():
  assert training.resolve_loop("auto") == ("host" if jax.default_backend() == "cpu" else "scan")
  assert [training.resolve_loop(loop) for loop in ("host", "scan")] == ["host", "scan"]


def test_vmapped_runs_equal_separate_runs(data):
  (x, y), _ = data
  keys = jax.random.split(jax.random.key(5), 2)
  stacked = jax.tree.map(np.asarray, train.train_networks(MLP, x, y, keys, **SHARED))
  for r in range(2):
    single = jax.tree.map(np.asarray, train.train_network(MLP, x, y, keys[r], **SHARED))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[r], b, rtol=1e-6, atol=1e-7), stacked, single)
  kernels = stacked["classifier"]["kernel"]
  assert not np.allclose(kernels[0], kernels[1])  # different keys, different inits


def test_lr_schedule_decays_tenfold_half_way():
  schedule = train.eval_lr_schedule(0.01, epochs=300, steps_per_epoch=2)
  assert float(schedule(0)) == pytest.approx(0.01)
  assert float(schedule(299)) == pytest.approx(0.01)
  assert float(schedule(300)) == pytest.approx(0.001)
  assert float(schedule(599)) == pytest.approx(0.001)


def test_eval_optimizer_is_sgd_with_decay_before_momentum():
  tx = train.eval_optimizer(lr=0.1, momentum=0.5, weight_decay=0.2, epochs=2, steps_per_epoch=1)
  p, g = jnp.array([1.0]), jnp.array([3.0])
  state = tx.init(p)
  u1, state = tx.update(g, state, p)
  u2, _ = tx.update(g, state, p)
  d = 3.0 + 0.2 * 1.0  # gradient plus weight decay
  assert float(u1[0]) == pytest.approx(-0.1 * d)
  assert float(u2[0]) == pytest.approx(-0.01 * (0.5 * d + d))  # decayed lr, momentum buffer kept


def test_no_recompilation_for_new_key_or_hyperparameters(data):
  (x, y), _ = data
  steps = (train._init, train._epoch_batches, train._train_step)
  train.train_network(MLP, x, y, jax.random.key(0), **SHARED)
  sizes = [f._cache_size() for f in steps]
  train.train_network(MLP, x, y, jax.random.key(1), **(SHARED | dict(lr=0.2)), momentum=0.5, weight_decay=0.0)
  train.train_networks(MLP, x, y, jax.random.split(jax.random.key(2), 3), **SHARED)
  assert [f._cache_size() for f in steps] == sizes


@pytest.mark.slow
def test_evaluate_synset_matches_separate_runs_and_chunked_test(data):
  (x, y), (xt, yt) = data
  xt, yt = xt[:31], yt[:31]  # 31 test images in chunks of 8: a padded last chunk
  report = train.evaluate_synset(x, y, (xt, yt), seed=7, network=MLP, runs=2, test_chunk=8, **SHARED)
  keys = jax.random.split(jax.random.key(7), 2)
  for r in range(2):
    params = train.train_network(MLP, x, y, keys[r], **SHARED)
    want = float(jnp.mean(jnp.argmax(MLP.apply({"params": params}, xt), -1) == yt))
    assert report["accuracies"][r] == pytest.approx(want)
  assert report["mean"] == pytest.approx(np.mean(report["accuracies"]))
  assert report["std"] == pytest.approx(np.std(report["accuracies"]))
  assert (report["runs"], report["epochs"], report["network"], report["augment"]) == (2, 5, "MLP", False)
  assert report["seconds"] > 0


def test_network_outputs_cover_labels_and_test_labels():
  labels = np.array([0, 1, 1])
  assert train._resolve_network("mlp", labels, None).n_classes == 2
  assert train._resolve_network("mlp", labels, 5).n_classes == 5
  assert train._resolve_network("lenet", np.zeros((3, 4)), None).n_classes == 4
  # A set that lacks the test set's last class still gets an output for it.
  assert train._resolve_network("convnet", labels, None, extra_max_label=9).n_classes == 10


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(network="resnet"), ValueError, "unknown network 'resnet'"),
        (dict(network=3), TypeError, "network must be one of .* or a flax module; got int"),
        (dict(images=np.zeros((15, 8, 8))), ValueError, "as_images"),
        (dict(images=np.full((15, 8, 8, 1), np.nan)), ValueError, "images contains 960 non-finite"),
        (dict(labels=np.zeros(14, np.int32)), ValueError, "labels has 14 labels but the inputs have 15 rows"),
        (dict(labels=np.full(15, 3)), ValueError, "the network has 3 outputs but the labels need 4 classes"),
        (dict(labels=np.full(15, -1)), ValueError, "non-negative class labels"),
        (dict(labels=np.zeros((15, 4))), ValueError, "4-dimensional target vectors but the network has 3 outputs"),
        (dict(labels=np.zeros((14, 3))), ValueError, "labels has 14 rows but images has 15"),
        (dict(labels=np.zeros((15, 3), np.int32)), TypeError, "must be float target vectors"),
        (dict(epochs=0), ValueError, "epochs must be a positive integer"),
        (dict(batch_size=2.5), TypeError, "batch_size must be a positive integer"),
        (dict(lr=-0.1), ValueError, "lr must be a finite positive number"),
        (dict(momentum=1.0), ValueError, r"momentum must be in \[0, 1\)"),
        (dict(weight_decay=float("nan")), ValueError, "weight_decay must be a finite non-negative"),
        (dict(augment="dsa"), TypeError, "augment must be a function"),
        (dict(seed="seed"), TypeError, "seed must be a PRNG key"),
        (dict(network="mlp", n_classes=2), ValueError, "n_classes=2 but the labels need at least 3 classes"),
        (dict(loop="gpu"), ValueError, r"unknown loop 'gpu'; valid options are \['auto', 'host', 'scan'\]"),
    ],
)
def test_train_network_errors(data, kwargs, error, match):
  (x, y), _ = data
  args = dict(network=MLP, images=x, labels=y, seed=jax.random.key(0)) | kwargs
  network, images, labels, seed = (args.pop(k) for k in ("network", "images", "labels", "seed"))
  with pytest.raises(error, match=match):
    train.train_network(network, images, labels, seed, epochs=args.pop("epochs", 1), **args)


def test_evaluate_synset_errors(data):
  (x, y), (xt, yt) = data
  with pytest.raises(TypeError, match=r"test must be a pair \(x_test, y_test\)"):
    train.evaluate_synset(x, y, xt, seed=0)
  with pytest.raises(ValueError, match=r"test x has images of shape \(7, 7, 1\) but images are \(8, 8, 1\)"):
    train.evaluate_synset(x, y, (xt[:, :7, :7], yt), seed=0)
  with pytest.raises(ValueError, match="test y has 89 labels but the inputs have 90 rows"):
    train.evaluate_synset(x, y, (xt, yt[:89]), seed=0)
  with pytest.raises(ValueError, match="runs must be a positive integer"):
    train.evaluate_synset(x, y, (xt, yt), seed=0, runs=0)
  with pytest.raises(ValueError, match="the network has 3 outputs but the labels need 5 classes"):
    train.evaluate_synset(x, y, (xt, np.full(90, 4)), seed=0, network=MLP)
  with pytest.raises(ValueError, match=r"unknown loop 'python'; valid options are \['auto', 'host', 'scan'\]"):
    train.evaluate_synset(x, y, (xt, yt), seed=0, loop="python")
  with pytest.raises(ValueError, match="keys must be a 1-d array"):
    train.train_networks(MLP, x, y, jax.random.key(0))


def test_lenet_rejects_images_too_small_for_its_poolings():
  net = networks.get_network("lenet", 10)
  with pytest.raises(ValueError, match="LeNet needs images of at least 12x12"):
    net.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  assert net.init(jax.random.key(0), jnp.zeros((1, 12, 12, 1)))["params"]["classifier"]["kernel"].shape == (84, 10)


def test_derived_key_keeps_int_seeds_and_folds_keys():
  from udd_jax.supervised import base as base_lib

  assert base_lib.derived_key(5, 1000) == 1005  # int seeds give the streams they always gave
  key = jax.random.key(5)
  derived = base_lib.derived_key(key, 1000)
  assert jax.random.key_data(derived).tolist() == jax.random.key_data(jax.random.fold_in(key, 1000)).tolist()
  with pytest.raises(TypeError, match="seed must be a PRNG key"):
    base_lib.derived_key("5", 1000)
