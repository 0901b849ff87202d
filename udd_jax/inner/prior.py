"""A learned image prior log p_psi(x): a GRBM fitted to real inputs by score matching.

The seed asks to "pre-train a prior log p_psi(x) to represent a desired image statistics and
add to loss", so that D looks like data rather than drifting outside the range of real
images. The prior is this library's own GRBM (:mod:`udd_jax.inner.grbm`), fitted to real
inputs with exact score matching, whose unnormalised log-density and score have closed forms:

    log p(x) = -||x - a||^2 / (2 sigma2) + sum_k softplus(x . w_k + b_k)   (+ const)
    s(x)     = (a - x) / sigma2 + W sigmoid(W^T x + b)

``distill(..., prior=..., prior_weight=lam)`` adds ``-lam * mean_i log p(d_i)`` to the outer
objective of every solver: D's gradient gets ``-lam / N * s(d_i)`` per row
(:func:`udd_jax.bilevel.solvers.add_prior`). The constant is the same for every x, so mean
log-densities of D and of held-out real images compare (:func:`naturalness`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray

from udd_jax import _validation, io
from udd_jax.inner import grbm


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ImagePrior:
  """A GRBM density over flattened inputs (d,), fitted by :func:`fit_prior`.

  Attributes:
    params: the GRBM's ``W`` (d, K), ``b`` (K,), ``a`` (d,).
    sigma2: its visible variance (static).
  """

  params: grbm.GRBMParams
  sigma2: float = dataclasses.field(default=1.0, metadata=dict(static=True))

  @property
  def dim(self) -> int:
    return int(self.params.W.shape[0])

  def log_density(self, x: Float[Array, "n d"]) -> Float[Array, " n"]:
    """The unnormalised log-density of each row of ``x``."""
    W, b, a = self.params
    return -jnp.sum((x - a) ** 2, axis=-1) / (2 * self.sigma2) + jnp.sum(jax.nn.softplus(x @ W + b), axis=-1)

  def score(self, x: Float[Array, "n d"]) -> Float[Array, "n d"]:
    """``grad_x log p(x)`` of each row (closed form; equal to ``jax.grad`` of :meth:`log_density`)."""
    return grbm.score(self.params, x, sigma2=self.sigma2)

  def record(self) -> dict[str, Any]:
    """What a run's config records of the prior: its size, ``sigma2`` and a SHA-256 of its parameters.

    A resumed run whose prior differs is refused by the fingerprint, as for any other setting.
    """
    digest = hashlib.sha256()
    for p in self.params:
      digest.update(np.ascontiguousarray(p, np.float32).tobytes())
    return {"n_hidden": int(self.params.W.shape[1]), "sigma2": self.sigma2, "sha256": digest.hexdigest()}

  def save(self, path: str | os.PathLike) -> pathlib.Path:
    """Writes the prior to ``path`` (``.npz``), atomically."""
    arrays = {f"params/{k}": np.asarray(v) for k, v in self.params._asdict().items()}
    return io.atomic_savez(path, arrays | {"sigma2": np.asarray(self.sigma2)})


def load_prior(path: str | os.PathLike) -> ImagePrior:
  """The :class:`ImagePrior` saved by :meth:`ImagePrior.save` at ``path``."""
  arrays = io.read_npz(path, "an image prior")
  missing = [f"params/{k}" for k in grbm.GRBMParams._fields if f"params/{k}" not in arrays] + \
      ([] if "sigma2" in arrays else ["sigma2"])
  if missing:
    raise ValueError(f"{path} is not an image prior: it lacks {missing}.")
  params = grbm.GRBMParams(*(jnp.asarray(arrays[f"params/{k}"]) for k in grbm.GRBMParams._fields))
  return ImagePrior(params, float(arrays["sigma2"]))


def check_prior(prior: Any, dim: int) -> ImagePrior:
  """``prior`` (an :class:`ImagePrior` or a path to one) checked against inputs of ``dim`` features."""
  if isinstance(prior, (str, os.PathLike)):
    prior = load_prior(prior)
  if not isinstance(prior, ImagePrior):
    raise TypeError(f"prior must be an ImagePrior or the path of a saved one; got {type(prior).__name__}.")
  if prior.dim != dim:
    raise ValueError(f"the prior is a density over {prior.dim} features, but D has {dim}.")
  if not all(bool(jnp.all(jnp.isfinite(p))) for p in prior.params):
    raise ValueError("the prior's parameters are not all finite.")
  return prior


def fit_prior(x: Float[Array, "n d"], *, n_hidden: int = 256, sigma2: float = 1.0, steps: int = 2000,
              batch_size: int = 512, lr: float = 1e-3, seed: int | PRNGKeyArray = 0,
              init_scale: float = 0.01) -> ImagePrior:
  """Fits a GRBM prior to real inputs ``x`` by exact score matching (Adam on minibatches).

  Args:
    x: real inputs, flattened, in the space D is optimised in (``distill``'s inputs when
      ``preprocessing="none"``).
    n_hidden: the GRBM's hidden units.
    sigma2: its visible variance (fixed).
    steps: Adam steps.
    batch_size: rows per step, drawn with replacement.
    lr: Adam's step size.
    seed: int seed or PRNG key of the init and the batches.
    init_scale: the weights' init scale.

  Returns:
    The fitted :class:`ImagePrior`; its ``a`` starts at the data's mean.
  """
  x = jnp.asarray(x)
  _validation.check_static_inputs(x, "x")
  n_hidden, steps = _validation.check_positive_int(n_hidden, "n_hidden"), _validation.check_positive_int(steps, "steps")
  batch_size = _validation.check_positive_int(batch_size, "batch_size")
  sigma2 = _validation.check_positive_float(sigma2, "sigma2")
  key, _ = _validation.as_key(seed, "seed")
  k_init, k_batches = jax.random.split(key)
  params = grbm.init_params(k_init, x.shape[1], n_hidden, init_scale=init_scale, dtype=x.dtype)
  params = params._replace(a=jnp.mean(x, axis=0))
  optimizer = optax.adam(lr)

  def step(carry, k):
    p, s = carry
    batch = x[jax.random.randint(k, (batch_size,), 0, x.shape[0])]
    loss, g = jax.value_and_grad(grbm.score_matching_loss)(p, batch, sigma2=sigma2)
    updates, s = optimizer.update(g, s, p)
    return (optax.apply_updates(p, updates), s), loss

  (params, _), _ = jax.jit(lambda p: jax.lax.scan(step, (p, optimizer.init(p)), jax.random.split(k_batches, steps)))(params)
  return ImagePrior(params, sigma2)


def naturalness(images: Float[Array, "N d"], prior: ImagePrior, real: Float[Array, "n d"]) -> dict[str, float]:
  """How much D looks like the real images ``real`` (held out from the prior's fit).

  Returns:
    ``mean_log_p``: D's mean log-density; ``real_log_p_q25`` / ``_q50`` / ``_q75``: the quartiles
    of the real images' log-densities; ``nearest_real_distance``: the mean Euclidean distance
    from each image of D to its nearest real image; ``real_nearest_distance``: the same from
    each of (up to) 1000 real images to its nearest other real image, for scale.
  """
  images, real = jnp.asarray(images), jnp.asarray(real)
  real_log_p = np.asarray(prior.log_density(real))

  def nearest(a, b, exclude_self=False):
    d2 = jnp.sum(a**2, 1)[:, None] - 2 * a @ b.T + jnp.sum(b**2, 1)[None, :]
    if exclude_self:
      d2 = d2.at[jnp.arange(a.shape[0]), jnp.arange(a.shape[0])].set(jnp.inf)
    return float(jnp.mean(jnp.sqrt(jnp.maximum(jnp.min(d2, axis=1), 0.0))))

  q25, q50, q75 = np.percentile(real_log_p, [25, 50, 75])
  return {"mean_log_p": float(jnp.mean(prior.log_density(images))), "real_log_p_q25": float(q25),
          "real_log_p_q50": float(q50), "real_log_p_q75": float(q75),
          "nearest_real_distance": nearest(images, real),
          "real_nearest_distance": nearest(real[:1000], real, exclude_self=True)}
