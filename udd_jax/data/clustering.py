"""Clustering of real data: k-means centroids (an initial D and an evaluation baseline)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray


def kmeans(key: PRNGKeyArray, x: Float[Array, "n d"], k: int, *, iterations: int = 50) -> Float[Array, "k d"]:
  """Lloyd's k-means from k distinct random data points; empty clusters keep their centre.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> x = jnp.array([[0.0], [0.1], [10.0], [10.1]])
    >>> sorted(round(float(c), 2) for c in kmeans(jax.random.key(0), x, 2)[:, 0])
    [0.05, 10.05]
  """
  centres = x[jax.random.choice(key, x.shape[0], (k,), replace=False)]

  def body(c, _):
    d2 = jnp.sum(x**2, 1)[:, None] - 2 * x @ c.T + jnp.sum(c**2, 1)[None, :]
    assign = jax.nn.one_hot(jnp.argmin(d2, axis=1), k, dtype=x.dtype)
    counts = assign.sum(0)
    new = (assign.T @ x) / jnp.maximum(counts, 1.0)[:, None]
    return jnp.where(counts[:, None] > 0, new, c), None

  return jax.lax.scan(body, centres, None, length=iterations)[0]
