"""Data loading (embedded, .npz, IDX, tfds) and invertible preprocessing."""

import gzip
import os

import numpy as np
import pytest

import udd_jax
from udd_jax.data import loading


def in_ci() -> bool:
  return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def write_idx(path, array):
  """Writes ``array`` (uint8) in the IDX format, gzipped when the name ends in .gz."""
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
  payload = header + array.astype(np.uint8).tobytes()
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(payload)


def make_split(rng, n, shape=(6, 5)):
  return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8), rng.integers(0, 10, size=n, dtype=np.uint8)


@pytest.fixture
def no_env_data_dir(monkeypatch):
  monkeypatch.delenv(loading.DATA_DIR_ENV, raising=False)


def test_digits_needs_no_files(no_env_data_dir):
  (x_train, y_train), (x_test, y_test) = udd_jax.load_dataset("digits")
  assert x_train.shape == (1437, 8, 8) and x_test.shape == (360, 8, 8)
  assert x_train.dtype == np.float32 and y_train.dtype == np.int32
  assert 0.0 == x_train.min() and x_train.max() == 1.0
  assert set(np.unique(y_train)) == set(range(10)) == set(np.unique(y_test))
  # 0..16 grey levels scaled by 1/16.
  assert np.allclose(x_train * 16, np.round(x_train * 16))


def test_embedded_mnist_10k_is_the_documented_part_of_mnist(no_env_data_dir, real_data_dir):
  """mnist_10k ships in the package: MNIST's first 10,000 training images and every fifth test image."""
  (x, y), (xt, yt) = udd_jax.load_dataset("mnist_10k")
  assert x.shape == (10000, 28, 28) and xt.shape == (2000, 28, 28) and x.dtype == np.float32 and y.dtype == np.int32
  assert set(np.unique(y)) == set(range(10)) == set(np.unique(yt))
  (fx, fy), (fxt, fyt) = udd_jax.load_dataset("mnist", data_dir=real_data_dir)
  np.testing.assert_array_equal(x, fx[:10000])
  np.testing.assert_array_equal(y, fy[:10000])
  np.testing.assert_array_equal(xt, fxt[::5])
  np.testing.assert_array_equal(yt, fyt[::5])


@pytest.mark.parametrize(
    "name, n_train, n_test, image_shape, train_counts",
    [
        ("mnist", 60000, 10000, (28, 28), [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]),
        ("fashion_mnist", 60000, 10000, (28, 28), [6000] * 10),
        ("usps", 7291, 2007, (16, 16), [1194, 1005, 731, 658, 652, 556, 664, 645, 542, 644]),
    ],
)
def test_real_datasets_from_shared_data(real_data_dir, name, n_train, n_test, image_shape, train_counts):
  (x_train, y_train), (x_test, y_test) = udd_jax.load_dataset(name, data_dir=real_data_dir)
  assert x_train.shape == (n_train, *image_shape) and x_test.shape == (n_test, *image_shape)
  assert x_train.dtype == np.float32 and y_test.dtype == np.int32
  assert 0.0 <= x_train.min() and x_train.max() <= 1.0 and x_train.max() > 0.99
  assert np.bincount(y_train).tolist() == train_counts


def test_usps_uses_exact_float_values(real_data_dir):
  (x_train, _), _ = udd_jax.load_dataset("usps", data_dir=real_data_dir)
  # The float copy sits on a grid of 1/2000 (ESL values in [-1, 1] with 3 decimals, mapped by (v+1)/2),
  # finer than the 1/255 of the uint8 images.
  assert len(np.unique(x_train)) > 256


def test_data_dir_from_environment(real_data_dir, monkeypatch):
  monkeypatch.setenv(loading.DATA_DIR_ENV, str(real_data_dir))
  (x_train, _), (x_test, _) = udd_jax.load_dataset("mnist")
  assert x_train.shape[0] == 60000 and x_test.shape[0] == 10000


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files(tmp_path, gz, no_env_data_dir):
  rng = np.random.default_rng(0)
  (xa, ya), (xb, yb) = make_split(rng, 12), make_split(rng, 4)
  folder = tmp_path / "mnist"
  folder.mkdir()
  suffix = ".gz" if gz else ""
  for stem, arr in zip(loading._IDX_FILES.values(), (xa, ya, xb, yb)):
    write_idx(folder / f"{stem}{suffix}", arr)
  (x_train, y_train), (x_test, y_test) = udd_jax.load_dataset("mnist", data_dir=tmp_path)
  np.testing.assert_allclose(x_train, xa / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(y_test, yb)
  assert x_test.shape == (4, 6, 5)


def test_truncated_and_corrupt_idx(tmp_path):
  arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
  path = tmp_path / "images-idx3-ubyte"
  write_idx(path, arr)
  np.testing.assert_array_equal(loading.read_idx(path), arr)
  path.write_bytes(path.read_bytes()[:-5])
  with pytest.raises(ValueError, match="truncated"):
    loading.read_idx(path)
  path.write_bytes(b"\x12\x34\x08\x03" + b"\x00" * 20)
  with pytest.raises(ValueError, match="magic"):
    loading.read_idx(path)


def test_npz_file(tmp_path):
  rng = np.random.default_rng(1)
  (xa, ya), (xb, yb) = make_split(rng, 10), make_split(rng, 3)
  np.savez(tmp_path / "toy.npz", x_train=xa, y_train=ya, x_test=xb, y_test=yb)
  (x_train, y_train), (x_test, y_test) = udd_jax.load_dataset("toy", data_dir=tmp_path)
  np.testing.assert_allclose(x_test, xb / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(y_train, ya)
  assert y_train.dtype == np.int32


@pytest.mark.parametrize(
    "arrays, error, match",
    [
        (dict(x_train=np.zeros((3, 2, 2), np.uint8), y_train=np.zeros(3)), ValueError, "lacks the array"),
        (dict(x_train=np.zeros((3, 2, 2), np.uint8), y_train=np.zeros(2)), ValueError, "2 labels but the inputs have 3"),
        (dict(x_train=np.full((3, 2, 2), np.nan), y_train=np.zeros(3)), ValueError, "non-finite"),
        (dict(x_train=np.zeros((3, 2, 2), np.uint8), y_train=-np.ones(3)), ValueError, "non-negative"),
        (dict(x_train=np.zeros((3, 2, 2), np.uint8), y_train=np.full(3, 0.5)), TypeError, "integer class labels"),
        (dict(x_train=np.full((3, 2, 2), 3.0), y_train=np.zeros(3)), ValueError, r"\[0, 1\]"),
        (dict(x_train=np.zeros((0, 2, 2), np.uint8), y_train=np.zeros(0)), ValueError, "empty"),
        (dict(x_train=np.zeros((3, 4), np.uint8), y_train=np.zeros(3)), ValueError, "rank >= 3"),
    ],
)
def test_malformed_npz(tmp_path, arrays, error, match):
  good = dict(x_test=np.zeros((2, 2, 2), np.uint8), y_test=np.zeros(2, np.uint8))
  if "lacks" in match:
    good.pop("y_test")
  np.savez(tmp_path / "bad.npz", **good, **arrays)
  with pytest.raises(error, match=match):
    udd_jax.load_dataset("bad", data_dir=tmp_path)


def test_corrupt_npz(tmp_path):
  (tmp_path / "broken.npz").write_bytes(b"not a zip archive at all")
  with pytest.raises(ValueError, match="could not be read"):
    udd_jax.load_dataset("broken", data_dir=tmp_path)


def test_missing_data_names_what_was_looked_for(tmp_path):
  with pytest.raises(FileNotFoundError) as info:
    udd_jax.load_dataset("usps", data_dir=tmp_path)
  message = str(info.value)
  assert str(tmp_path / "usps.npz") in message and "UDD_DATA_DIR" in message


def test_missing_data_without_any_directory(no_env_data_dir):
  with pytest.raises(FileNotFoundError, match="UDD_DATA_DIR is unset"):
    udd_jax.load_dataset("usps")


def test_data_dir_must_exist(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match="not an existing directory"):
    udd_jax.load_dataset("mnist", data_dir=tmp_path / "nope")
  monkeypatch.setenv(loading.DATA_DIR_ENV, str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match=r"\$UDD_DATA_DIR"):
    udd_jax.load_dataset("mnist")


def test_unknown_dataset_name_lists_valid_ones(tmp_path):
  with pytest.raises(ValueError, match="unknown dataset 'mnistt'.*'fashion_mnist'"):
    udd_jax.load_dataset("mnistt", data_dir=tmp_path)
  with pytest.raises(TypeError, match="name"):
    udd_jax.load_dataset(3)


def tfds_or_fail():
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    if in_ci():
      pytest.fail("tensorflow-datasets must be installed in CI (the tfds extra)")
    pytest.skip("tensorflow-datasets not installed")
  return tfds


def test_tfds_path_with_mock_data(tmp_path):
  tfds = tfds_or_fail()
  with tfds.testing.mock_data(num_examples=5):
    (x_train, y_train), (x_test, y_test) = udd_jax.load_dataset("mnist", data_dir=tmp_path)
  assert x_train.shape == (5, 28, 28) and x_test.shape == (5, 28, 28)
  assert x_train.dtype == np.float32 and 0 <= x_train.min() and x_train.max() <= 1
  assert y_train.dtype == np.int32 and np.all((0 <= y_train) & (y_train < 10))


def test_tfds_is_never_downloaded(tmp_path, monkeypatch):
  tfds_or_fail()
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  with pytest.raises(FileNotFoundError, match="never downloaded"):
    udd_jax.load_dataset("kmnist", data_dir=tmp_path)


# Preprocessing.


@pytest.fixture(scope="module")
def digits_train():
  return udd_jax.load_dataset("digits")[0][0]


@pytest.mark.parametrize("method", udd_jax.PREPROCESSING_METHODS)
def test_preprocessing_is_invertible_and_saves(digits_train, tmp_path, method):
  prep = udd_jax.fit_preprocessing(digits_train, method=method)
  z = prep.apply(digits_train)
  assert z.shape == (1437, 64) and z.dtype == np.float32
  np.testing.assert_allclose(prep.invert(z), digits_train, atol=2e-5)
  np.savez(tmp_path / "prep.npz", **prep.to_dict())
  with np.load(tmp_path / "prep.npz") as f:
    restored = udd_jax.Preprocessing.from_dict(dict(f))
  np.testing.assert_array_equal(restored.apply(digits_train), z)
  assert restored.method == method and restored.image_shape == (8, 8)


def test_standardize_statistics(digits_train):
  z = udd_jax.fit_preprocessing(digits_train, method="standardize").apply(digits_train)
  std = digits_train.reshape(len(digits_train), -1).std(0)
  varying = std > 1e-8
  assert (~varying).any()  # digits has constant border pixels: they keep scale 1
  np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(z.std(0)[varying], 1.0, rtol=1e-4)


def test_zca_whitens(digits_train):
  rng = np.random.default_rng(0)
  mixing = rng.normal(size=(10, 10))
  x = rng.normal(size=(5000, 10)) @ mixing
  z = udd_jax.fit_preprocessing(x, method="zca", zca_reg=1e-6).apply(x)
  np.testing.assert_allclose(np.cov(z.T, bias=True), np.eye(10), atol=1e-3)
  # ZCA is the symmetric whitening: of all whitening maps it keeps z closest to x.
  prep = udd_jax.fit_preprocessing(digits_train, method="zca", zca_reg=0.1)
  np.testing.assert_allclose(prep.matrix, prep.matrix.T, atol=1e-10)
  eig = np.linalg.eigvalsh(np.cov(prep.apply(digits_train).T, bias=True))
  # Regularised: variances shrunk below 1, never amplified past it (constant pixels stay at 0).
  assert eig.max() < 1.0 and eig.min() > -1e-10 and eig.max() > 0.9


def test_preprocessing_errors(digits_train):
  with pytest.raises(ValueError, match="unknown method 'pca'"):
    udd_jax.fit_preprocessing(digits_train, method="pca")
  prep = udd_jax.fit_preprocessing(digits_train, method="standardize")
  with pytest.raises(ValueError, match=r"x must have shape \(n, 8, 8\)"):
    prep.apply(np.zeros((3, 64)))
  with pytest.raises(ValueError, match=r"z must have shape \(n, 64\)"):
    prep.invert(np.zeros((3, 63)))
  with pytest.raises(ValueError, match="lacks"):
    udd_jax.Preprocessing.from_dict({"method": "zca", "image_shape": [8, 8], "mean": np.zeros(64), "zca_reg": 0.1})


def test_resize_images():
  x = np.random.default_rng(0).uniform(size=(3, 16, 16)).astype(np.float32)
  y = udd_jax.resize_images(x, (28, 28))
  assert y.shape == (3, 28, 28) and y.dtype == np.float32
  assert 0.0 <= y.min() and y.max() <= 1.0
  np.testing.assert_allclose(y.mean(axis=(1, 2)), x.mean(axis=(1, 2)), atol=0.02)
  np.testing.assert_allclose(udd_jax.resize_images(x, (16, 16)), x, atol=1e-6)
  with pytest.raises(ValueError, match="shape must be two positive integers"):
    udd_jax.resize_images(x, (28,))
