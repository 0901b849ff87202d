"""The inner-learner interface, and the GRBM / tied autoencoder learners by name.

Everything above ``udd_jax.inner`` (solvers, recipes, evaluation, the driver, reports)
sees a learner only through :class:`InnerLearner`: a parameter pytree it never looks
inside, made by ``init``, fitted through ``loss``, probed through ``features``, checked
by ``check_params``, saved through ``to_arrays`` / ``from_arrays``, and drawn or
measured through the optional ``filters`` and ``residual``; a loss that is a sum of
squares says so through the optional ``least_squares`` (the Gauss-Newton curvature of
the implicit hypergradient needs it). A new learner subclasses
:class:`InnerLearner` as a frozen dataclass (it is a static argument of ``jit``, so it
must be hashable) and is passed as ``inner=`` to ``distill``, ``evaluate`` and
``make_problem``.

The solvers need every proper scoring rule to look the same, ``loss(params, x, key)``:
the denoising loss uses the PRNG key, the others ignore it. Within one outer step the
key is fixed, so the inner objective the solvers differentiate is deterministic.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, Scalar

from udd_jax import _validation
from udd_jax.inner import grbm, linear


class LeastSquares(NamedTuple):
  """A loss written as ``scale * 1/2 ||residuals||^2`` (:meth:`InnerLearner.least_squares`).

  Attributes:
    residuals: any array (or pytree of arrays) ``r`` of the parameters and data.
    scale: a constant (it does not depend on the parameters), e.g. ``1/n`` for a mean over ``n`` rows.
  """

  residuals: Any
  scale: float | Scalar


class InnerLearner(abc.ABC):
  """A shallow unsupervised learner, as the generic layers use it.

  Subclasses are frozen dataclasses with a ``name`` field (the registry name, recorded
  in a distilled set's config) and implement the abstract methods. ``params`` is any
  pytree of arrays of the learner's own making.
  """

  name: str

  @abc.abstractmethod
  def init(self, key: PRNGKeyArray, n_visible: int, n_hidden: int, *, init_scale: float | Array = 0.01,
           dtype: Any = jnp.float32) -> Any:
    """A fresh random init; ``init_scale`` (the recipe's) may be a traced array."""

  @abc.abstractmethod
  def loss(self, params: Any, x: Float[Array, "n d"], key: PRNGKeyArray) -> Scalar:
    """The inner objective on data ``x`` (n, d); ``key`` is fixed within one outer step."""

  @abc.abstractmethod
  def features(self, params: Any, x: Float[Array, "n d"]) -> Float[Array, "n K"]:
    """What the task heads see: ``n_hidden`` features per row of ``x``."""

  def check_params(self, params: Any, x: Any, name: str = "x") -> None:
    """Raises ValueError / TypeError if ``params`` and data ``x`` (n, d) do not fit; works under ``jit``.

    The default only checks ``x``: a floating array of rank 2.
    """
    del params
    _validation.check_static_inputs(x, name)

  @abc.abstractmethod
  def to_arrays(self, params: Any) -> dict[str, np.ndarray]:
    """``params`` as named numpy arrays: what a distilled set saves (``params/<name>`` keys)."""

  @abc.abstractmethod
  def from_arrays(self, arrays: Mapping[str, np.ndarray]) -> Any:
    """The inverse of :meth:`to_arrays`."""

  def filters(self, params: Any) -> np.ndarray | None:
    """One row per hidden unit, (n_hidden, n_visible), for a figure of filters; None if it has none."""
    del params
    return None

  def residual(self, params: Any, x: Float[Array, "n d"]) -> Float[Array, "n d"] | None:
    """The reconstruction residual of each row of ``x`` (the ``d_minus_ae_d`` metric); None if it has none."""
    del params, x
    return None

  def least_squares(self, params: Any, x: Float[Array, "n d"], key: PRNGKeyArray) -> LeastSquares | None:
    """The loss as a sum of squares, ``loss(params, x, key) = scale * 1/2 ||r||^2``; None if it is not one.

    The Gauss-Newton curvature of the implicit hypergradient (``curvature="gauss_newton"``)
    needs it: ``scale * J^T J`` with ``J = dr/dparams`` is positive semi-definite where
    the Hessian need not be. The default says the loss is not a sum of squares.
    """
    del params, x, key
    return None


def _named_arrays(params: NamedTuple) -> dict[str, np.ndarray]:
  return {field: np.asarray(value) for field, value in params._asdict().items()}


def _from_named_arrays(cls: type, arrays: Mapping[str, np.ndarray], learner: str) -> Any:
  missing = [f for f in cls._fields if f not in arrays]
  if missing:
    raise ValueError(f"the {learner} learner's parameters lack {missing}.")
  return cls(*(arrays[f] for f in cls._fields))


@dataclasses.dataclass(frozen=True)
class GRBMLearner(InnerLearner):
  """The GRBM / tied autoencoder (:mod:`udd_jax.inner.grbm`) with one of its proper scoring rules.

  Attributes:
    name: the scoring rule, one of :data:`INNER_LOSSES`.
    sigma2: visible variance.
    noise_std: corruption level of denoising score matching (unused by the others).
  """

  name: str = "ae"
  sigma2: float = 1.0
  noise_std: float = 0.1

  def __post_init__(self):
    _validation.check_choice(self.name, "inner loss", INNER_LOSSES)
    object.__setattr__(self, "sigma2", _validation.check_positive_float(self.sigma2, "sigma2"))
    if self.name == "denoising_score_matching":
      object.__setattr__(self, "noise_std", _validation.check_positive_float(self.noise_std, "noise_std"))

  def init(self, key, n_visible, n_hidden, *, init_scale=0.01, dtype=jnp.float32) -> grbm.GRBMParams:
    return grbm.init_params(key, n_visible, n_hidden, init_scale=init_scale, dtype=dtype)

  def loss(self, params: grbm.GRBMParams, x: Float[Array, "n d"], key: PRNGKeyArray) -> Scalar:
    if self.name == "ae":
      return grbm.ae_loss(params, x, sigma2=self.sigma2)
    if self.name == "score_matching":
      return grbm.score_matching_loss(params, x, sigma2=self.sigma2)
    if self.name == "sliced_score_matching":
      return grbm.sliced_score_matching_loss(params, x, key, sigma2=self.sigma2)
    return grbm.denoising_score_matching_loss(params, x, key, sigma2=self.sigma2, noise_std=self.noise_std)

  def features(self, params: grbm.GRBMParams, x: Float[Array, "n d"]) -> Float[Array, "n K"]:
    return grbm.features(params, x)

  def check_params(self, params: Any, x: Any, name: str = "x") -> None:
    grbm.check_params(params, x, name, sigma2=self.sigma2)

  def to_arrays(self, params: grbm.GRBMParams) -> dict[str, np.ndarray]:
    return _named_arrays(params)

  def from_arrays(self, arrays: Mapping[str, np.ndarray]) -> grbm.GRBMParams:
    return _from_named_arrays(grbm.GRBMParams, arrays, self.name)

  def filters(self, params: grbm.GRBMParams) -> np.ndarray:
    return np.asarray(params.W).T

  def least_squares(self, params: grbm.GRBMParams, x: Float[Array, "n d"], key: PRNGKeyArray) -> LeastSquares | None:
    """The AE and DSM losses as ``(1/n) * 1/2 ||r||^2``; None for (sliced) score matching.

    The AE's residuals are the GRBM score ``(a - x_i)/sigma2 + W h(x_i)`` of each row, the
    denoising loss's are ``s(x~_i) + eps_i / noise_std`` (the same noise as :meth:`loss`
    for the same ``key``). Score matching is not a sum of squares: its loss adds the
    Laplacian ``tr(grad_x s(x_i))`` (sliced: its projection ``v^T grad_x s v``), a term
    linear in ``W^2`` with no square to take, so it has no Gauss-Newton matrix.
    """
    n = x.shape[0]
    if self.name == "ae":
      return LeastSquares(grbm.score(params, x, sigma2=self.sigma2), 1.0 / n)
    if self.name == "denoising_score_matching":
      r = grbm.denoising_score_matching_residuals(params, x, key, sigma2=self.sigma2, noise_std=self.noise_std)
      return LeastSquares(r, 1.0 / n)
    return None

  def residual(self, params: grbm.GRBMParams, x: Float[Array, "n d"]) -> Float[Array, "n d"]:
    """The GRBM score ``(a - x) / sigma2 + W h(x)``: with ``sigma2 = 1``, ``a + W h(x) - x``."""
    return grbm.score(params, x, sigma2=self.sigma2)


@dataclasses.dataclass(frozen=True)
class LinearAELearner(InnerLearner):
  """The tied linear autoencoder with ordered ridge penalties (registered as ``"linear_ae"``).

  Its argmin has a closed form (:func:`udd_jax.inner.linear.linear_ae_solution`), so it is the learner on which every
  solver's hypergradient is checked exactly. The registered learner has ``reg = 0.01``;
  another ``reg`` is named ``"linear_ae(reg=...)"``, which a saved set's config records and
  ``load_distilled(path, learner=...)`` must be given.

  Attributes:
    reg: the largest ridge penalty ``lambda_K`` (the penalties are ``reg * (k + 1) / K``).
  """

  reg: float = 1e-2
  name: str = dataclasses.field(default="linear_ae", init=False)

  def __post_init__(self):
    object.__setattr__(self, "reg", _validation.check_positive_float(self.reg, "reg"))
    object.__setattr__(self, "name", "linear_ae" if self.reg == 1e-2 else f"linear_ae(reg={self.reg!r})")

  def init(self, key, n_visible, n_hidden, *, init_scale=0.01, dtype=jnp.float32) -> linear.LinearAEParams:
    W = init_scale * jax.random.normal(key, (n_visible, n_hidden), dtype)
    return linear.LinearAEParams(W=W, a=jnp.zeros((n_visible,), dtype))

  def loss(self, params: linear.LinearAEParams, x: Float[Array, "n d"], key: PRNGKeyArray) -> Scalar:
    del key
    return linear.linear_ae_loss(params, x, reg=self.reg)

  def features(self, params: linear.LinearAEParams, x: Float[Array, "n d"]) -> Float[Array, "n K"]:
    return (x - params.a) @ params.W

  def check_params(self, params: Any, x: Any, name: str = "x") -> None:
    linear.check_params(params, x, name)

  def to_arrays(self, params: linear.LinearAEParams) -> dict[str, np.ndarray]:
    return _named_arrays(params)

  def from_arrays(self, arrays: Mapping[str, np.ndarray]) -> linear.LinearAEParams:
    return _from_named_arrays(linear.LinearAEParams, arrays, self.name)

  def filters(self, params: linear.LinearAEParams) -> np.ndarray:
    return np.asarray(params.W).T

  def residual(self, params: linear.LinearAEParams, x: Float[Array, "n d"]) -> Float[Array, "n d"]:
    y = x - params.a
    return (y @ params.W) @ params.W.T - y

  def solution(self, x: Float[Array, "n d"], n_hidden: int, signs_like: Any = None) -> linear.LinearAEParams:
    """The exact minimiser of :meth:`loss` on ``x`` (:func:`linear_ae_solution`)."""
    return linear.linear_ae_solution(x, n_hidden, reg=self.reg, signs_like=signs_like)


INNER_LOSSES = ("ae", "score_matching", "denoising_score_matching", "sliced_score_matching")  # the GRBM's scoring rules
LEARNERS = INNER_LOSSES + ("linear_ae",)  # every registered learner by name


def get_inner_learner(name: str | InnerLearner, *, sigma2: float = 1.0, noise_std: float = 0.1) -> InnerLearner:
  """Returns the :class:`InnerLearner` called ``name`` (an ``InnerLearner`` passes through).

  Args:
    name: ``"ae"`` (the seed's tied autoencoder), ``"score_matching"``,
      ``"denoising_score_matching"``, ``"sliced_score_matching"`` (the GRBM's scoring rules)
      or ``"linear_ae"`` (:class:`LinearAELearner`, whose argmin has a closed form).
    sigma2: visible variance of the GRBM.
    noise_std: corruption level of denoising score matching.

  Examples:
    >>> learner = get_inner_learner("ae")
    >>> learner.name
    'ae'
    >>> import jax
    >>> params = learner.init(jax.random.key(0), 64, 16, init_scale=0.01)
    >>> {k: v.shape for k, v in learner.to_arrays(params).items()}
    {'W': (64, 16), 'b': (16,), 'a': (64,)}
  """
  if isinstance(name, InnerLearner):
    return name
  if _validation.check_choice(name, "inner loss", LEARNERS) == "linear_ae":
    return LinearAELearner()
  return GRBMLearner(name=name, sigma2=sigma2, noise_std=noise_std)  # which checks every setting
