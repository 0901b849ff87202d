"""Inner learners by name, behind one signature ``loss(params, x, key) -> scalar``.

The solvers need every proper scoring rule to look the same: the denoising loss
takes a PRNG key, the others ignore it. Within one outer step the key is fixed,
so the inner objective the solvers differentiate is deterministic.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

from jaxtyping import Array, Float, PRNGKeyArray, Scalar

from udd_jax import _validation
from udd_jax.inner import grbm


@dataclasses.dataclass(frozen=True)
class InnerLearner:
  """A shallow unsupervised learner: its proper scoring rule and its features.

  Attributes:
    name: registry name.
    loss: ``loss(params, x, key) -> scalar``, the inner objective on data ``x`` (n, d).
    features: ``features(params, x) -> (n, K)``, what task heads see.
    init: ``init(key, n_visible, n_hidden, init_scale) -> params``.
  """

  name: str
  loss: Callable[[grbm.GRBMParams, Float[Array, "n d"], PRNGKeyArray], Scalar]
  features: Callable[[grbm.GRBMParams, Float[Array, "n d"]], Float[Array, "n K"]] = grbm.features
  init: Callable[..., grbm.GRBMParams] = grbm.init_params


def _ignore_key(loss: Callable[..., Scalar], params, x, key, *, sigma2: float) -> Scalar:
  del key
  return loss(params, x, sigma2=sigma2)


def _denoising(params, x, key, *, sigma2: float, noise_std: float) -> Scalar:
  return grbm.denoising_score_matching_loss(params, x, key, sigma2=sigma2, noise_std=noise_std)


INNER_LOSSES = ("ae", "score_matching", "denoising_score_matching")


def get_inner_learner(name: str | InnerLearner, *, sigma2: float = 1.0, noise_std: float = 0.1) -> InnerLearner:
  """Returns the :class:`InnerLearner` called ``name`` (an ``InnerLearner`` passes through).

  Args:
    name: ``"ae"`` (the seed's tied autoencoder), ``"score_matching"`` or
      ``"denoising_score_matching"``.
    sigma2: visible variance of the GRBM.
    noise_std: corruption level of denoising score matching.

  Examples:
    >>> learner = get_inner_learner("ae")
    >>> learner.name
    'ae'
  """
  if isinstance(name, InnerLearner):
    return name
  _validation.check_choice(name, "inner loss", INNER_LOSSES)
  sigma2 = _validation.check_positive_float(sigma2, "sigma2")
  if name == "ae":
    loss = functools.partial(_ignore_key, grbm.ae_loss, sigma2=sigma2)
  elif name == "score_matching":
    loss = functools.partial(_ignore_key, grbm.score_matching_loss, sigma2=sigma2)
  else:
    noise_std = _validation.check_positive_float(noise_std, "noise_std")
    loss = functools.partial(_denoising, sigma2=sigma2, noise_std=noise_std)
  return InnerLearner(name=name, loss=loss)
