"""Data the supervised tests share."""

import pytest

import udd_jax


@pytest.fixture(scope="module")
def digits3():
  """Three classes of the embedded 8x8 digits, standardised, as (n, 8, 8, 1)."""
  (x, y), _ = udd_jax.load_dataset("digits")
  keep = y < 3
  x = x[keep][..., None]
  return (x - x.mean()) / x.std(), y[keep]
