"""Coreset baselines: random, herding and k-center against NumPy reference loops."""

import numpy as np
import pytest

from udd_jax.supervised.coresets import coreset


@pytest.fixture(scope="module")
def data():
  """Three classes of unequal sizes (9, 12, 7) of random 3x3 grey images, labels 1, 4, 6."""
  rng = np.random.default_rng(0)
  y = rng.permutation(np.repeat(np.array([1, 4, 6]), [9, 12, 7])).astype(np.int32)
  x = rng.standard_normal((y.size, 3, 3, 1)) + y[:, None, None, None]
  return x, y


def indices_of(images, x):
  """Row indices of ``images`` in ``x`` (the rows of ``x`` are distinct)."""
  flat = x.reshape(x.shape[0], -1)
  return np.array([np.flatnonzero(np.all(flat == row, axis=1))[0] for row in images.reshape(images.shape[0], -1)])


def herding_reference(f, ipc):
  mean, total, chosen = f.mean(0), np.zeros(f.shape[1]), []
  for t in range(ipc):
    d = np.linalg.norm((t + 1) * mean - total - f, axis=1)
    d[chosen] = np.inf
    chosen.append(int(np.argmin(d)))
    total += f[chosen[-1]]
  return chosen


def kcenter_reference(f, ipc):
  chosen = [int(np.argmin(np.linalg.norm(f - f.mean(0), axis=1)))]
  for _ in range(ipc - 1):
    d = np.min(np.linalg.norm(f[:, None] - f[chosen][None], axis=-1), axis=1)
    chosen.append(int(np.argmax(d)))
  return chosen


def reference(method, x, y, ipc, features=None):
  f = x.reshape(x.shape[0], -1) if features is None else features
  select = herding_reference if method == "herding" else kcenter_reference
  out = []
  for c in np.unique(y):
    members = np.flatnonzero(y == c)
    out.extend(members[select(f[members], ipc)])
  return np.array(out)


@pytest.mark.parametrize("method", ["herding", "kcenter"])
def test_greedy_selection_matches_numpy_reference(data, method):
  x, y = data
  images, labels = coreset(x, y, 5, method=method)
  chosen = indices_of(images, x)
  np.testing.assert_array_equal(chosen, reference(method, x, y, 5))
  np.testing.assert_array_equal(labels, np.repeat([1, 4, 6], 5))
  np.testing.assert_array_equal(images, x[chosen])


@pytest.mark.parametrize("method", ["herding", "kcenter"])
def test_greedy_selection_on_given_features(data, method):
  x, y = data
  features = np.random.default_rng(1).standard_normal((y.size, 4))
  chosen = indices_of(coreset(x, y, 5, method=method, features=features)[0], x)
  np.testing.assert_array_equal(chosen, reference(method, x, y, 5, features))
  assert not np.array_equal(chosen, reference(method, x, y, 5))  # the features, not the pixels, decide


@pytest.mark.parametrize("method", ["herding", "kcenter"])
def test_first_pick_is_nearest_the_class_mean_and_smaller_ipc_is_a_prefix(data, method):
  x, y = data
  flat = x.reshape(x.shape[0], -1)
  first = indices_of(coreset(x, y, 1, method=method)[0], x)
  for c, i in zip([1, 4, 6], first):
    members = np.flatnonzero(y == c)
    assert i == members[np.argmin(np.linalg.norm(flat[members] - flat[members].mean(0), axis=1))]
  five = indices_of(coreset(x, y, 5, method=method)[0], x).reshape(3, 5)
  np.testing.assert_array_equal(five[:, 0], first)


def test_herding_chooses_the_whole_class_when_ipc_is_its_size():
  x = np.arange(8, dtype=np.float64).reshape(8, 1)
  y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
  images, _ = coreset(x, y, 4, method="herding")
  assert sorted(images[:4, 0]) == [0, 1, 2, 3] and sorted(images[4:, 0]) == [4, 5, 6, 7]


def test_random_picks_ipc_distinct_samples_per_class(data):
  x, y = data
  images, labels = coreset(x, y, 4, method="random", seed=0)
  chosen = indices_of(images, x)
  np.testing.assert_array_equal(labels, np.repeat([1, 4, 6], 4))
  np.testing.assert_array_equal(y[chosen], labels)
  assert len(set(chosen.tolist())) == 12
  np.testing.assert_array_equal(coreset(x, y, 4, method="random", seed=0)[0], images)  # same key, same set
  assert not np.array_equal(coreset(x, y, 4, method="random", seed=1)[0], images)


def test_random_is_uniform_within_each_class(data):
  x, y = data
  counts = np.zeros(y.size)
  draws = 300
  for seed in range(draws):
    counts[indices_of(coreset(x, y, 3, method="random", seed=seed)[0], x)] += 1
  for c, size in zip([1, 4, 6], [9, 12, 7]):
    frequency = counts[y == c] / draws
    expected = 3 / size
    # Binomial standard deviation over 300 draws is at most 0.029; 5 sigma.
    np.testing.assert_allclose(frequency, expected, atol=0.15)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(method="forgetting"), ValueError, "unknown method 'forgetting'"),
        (dict(ipc=8), ValueError, "ipc=8 exceeds the 7 samples of class 6, the smallest class"),
        (dict(ipc=0), ValueError, "ipc must be a positive integer"),
        (dict(ipc=2.0), TypeError, "ipc must be a positive integer"),
        (dict(y=np.zeros(27, np.int32)), ValueError, "y has 27 labels but the inputs have 28 rows"),
        (dict(y=np.full(28, 0.5)), TypeError, "y must hold integer class labels"),
        (dict(x=np.full((28, 3, 3, 1), np.nan)), ValueError, "x contains 252 non-finite"),
        (dict(x=np.zeros(28)), ValueError, "x must have rank >= 2"),
        (dict(method="random"), ValueError, 'method="random" needs a seed'),
        (dict(method="random", seed="0"), TypeError, "seed must be a PRNG key"),
        (dict(features=np.zeros((27, 4))), ValueError, "features has 27 rows but x has 28"),
        (dict(features=np.zeros(28)), ValueError, "features must have rank 2"),
        (dict(features=np.full((28, 4), np.inf)), ValueError, "features contains 112 non-finite"),
    ],
)
def test_errors(data, kwargs, error, match):
  x, y = data
  args = dict(x=x, y=y, ipc=2, method="herding") | kwargs
  with pytest.raises(error, match=match):
    coreset(args.pop("x"), args.pop("y"), args.pop("ipc"), **args)
