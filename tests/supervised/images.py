"""Tiny synthetic image sets the supervised tests share."""

import numpy as np


def blob_images(centers, n_per_class, seed, noise=0.3):
  """One class per center: 8x8 grey images of a Gaussian blob at the class's center, plus noise, as (n, 8, 8, 1)."""
  rng = np.random.default_rng(seed)
  grid = np.stack(np.meshgrid(np.arange(8), np.arange(8), indexing="ij"), -1)
  templates = np.stack([np.exp(-np.sum((grid - c) ** 2, -1) / 2.0) for c in centers])
  y = np.repeat(np.arange(len(centers)), n_per_class)
  x = templates[y] + noise * rng.standard_normal((y.size, 8, 8))
  return x[..., None], y.astype(np.int32)
