"""D written in a basis: ``D = D0 + C U^T``, optimised in the coefficients ``C`` (N, r) of an orthonormal ``U`` (d, r).

A linear reparameterisation of D is a transform of D's update, so it is one link of
D's optax chain (:meth:`~udd_jax.bilevel.solvers.SolverBase.image_transform`):
:func:`in_basis` projects D's gradient onto the basis (``g -> g U``, the gradient in
``C`` by the chain rule), runs D's optimiser on the coefficients (Adam's moments have
shape (N, r)) and maps its update back (``u -> u U^T``). Started at ``C = 0``, D starts at
its usual init D0 and stays in ``D0 + span(U)`` (docs/SOLVERS.md, "D in a basis").

Bases are named by a plain string (a solver's ``image_basis``), so a solver stays
rebuildable from its ``config.json``:

* ``"pixels"``: no reparameterisation (the chain is unchanged);
* ``"pca:R"``: the top R principal directions of the real inputs (:func:`pca_basis`), data
  that :func:`make_image_basis` computes from the real inputs the run is given;
* ``"dct:R"``: the R lowest frequencies of the orthonormal 2-D DCT-II of square images
  (:func:`dct_basis`), data-free.

The basis is an array in the chain's state (:class:`InBasisState`): given once at the
solver's ``init`` and read by every step from the state, it keeps ``step`` a pure function
of (state, batch), travels in checkpoints (a resumed run uses the very basis it started
with), and leaves each solver's own state fields as they were.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, Float

IMAGE_BASES = ("pixels", "pca", "dct")
_FORMS = "'pixels', 'pca:R' or 'dct:R' (R a positive integer, the basis' size)"


def parse_image_basis(spec: Any) -> tuple[str, int | None]:
  """``"pixels"`` -> ``("pixels", None)``; ``"pca:64"`` -> ``("pca", 64)``; a clear error otherwise.

  Examples:
    >>> parse_image_basis("dct:16")
    ('dct', 16)
    >>> parse_image_basis("pca")
    Traceback (most recent call last):
    ...
    ValueError: image_basis 'pca' needs its size: 'pca:R' with R a positive integer (e.g. 'pca:64').
  """
  if not isinstance(spec, str):
    raise TypeError(f"image_basis must be a string, {_FORMS}; got {spec!r} of type {type(spec).__name__}.")
  name, sep, rank = spec.partition(":")
  if name not in IMAGE_BASES:
    raise ValueError(f"unknown image_basis {spec!r}; valid forms are {_FORMS}.")
  if name == "pixels":
    if sep:
      raise ValueError(f"image_basis 'pixels' takes no size; got {spec!r}.")
    return name, None
  if not sep:
    raise ValueError(f"image_basis {spec!r} needs its size: '{name}:R' with R a positive integer (e.g. '{name}:64').")
  if not rank.strip().isdigit() or int(rank) <= 0:
    raise ValueError(f"image_basis {spec!r}: the size R must be a positive integer; got {rank!r}.")
  return name, int(rank)


def check_image_basis(spec: Any, d: int) -> tuple[str, int | None]:
  """:func:`parse_image_basis`, and the checks that need the input dimension ``d``: R <= d, square images for DCT.

  Examples:
    >>> check_image_basis("dct:8", 64)
    ('dct', 8)
    >>> check_image_basis("dct:8", 48)
    Traceback (most recent call last):
    ...
    ValueError: image_basis 'dct:8' needs square images (d = s * s), but the inputs have d = 48 values.
  """
  name, rank = parse_image_basis(spec)
  if rank is not None and rank > d:
    raise ValueError(f"image_basis {spec!r}: the size R = {rank} exceeds the inputs' dimension d = {d}.")
  if name == "dct" and math.isqrt(d) ** 2 != d:
    raise ValueError(f"image_basis {spec!r} needs square images (d = s * s), but the inputs have d = {d} values.")
  return name, rank


def dct_basis(rank: int, d: int) -> np.ndarray:
  """The R lowest-frequency functions of the orthonormal 2-D DCT-II on s x s images (d = s * s), as columns (d, R).

  Column ``(k1, k2)`` is ``phi_k1 (x) phi_k2`` flattened row-major (as ``reshape(n, s, s)``
  reads an image), with ``phi_k[n] = a_k cos(pi (2n + 1) k / (2 s))``, ``a_0 = sqrt(1/s)``,
  ``a_k = sqrt(2/s)``; frequencies in order of ``k1 + k2``, then ``k1``. The first column is
  the constant image.

  Examples:
    >>> u = dct_basis(6, 64)
    >>> u.shape, bool(np.allclose(u.T @ u, np.eye(6))), bool(np.allclose(u[:, 0], 1 / 8))
    ((64, 6), True, True)
  """
  check_image_basis(f"dct:{rank}", d)
  s = math.isqrt(d)
  n = np.arange(s)
  phi = np.cos(np.pi * (2 * n[None, :] + 1) * n[:, None] / (2 * s)) * np.sqrt(2.0 / s)
  phi[0] /= np.sqrt(2.0)
  order = sorted(((k1, k2) for k1 in range(s) for k2 in range(s)), key=lambda k: (k[0] + k[1], k[0]))[:rank]
  return np.stack([np.outer(phi[k1], phi[k2]).reshape(d) for k1, k2 in order], axis=1)


def pca_basis(rank: int, x: ArrayLike) -> np.ndarray:
  """The top R principal directions of ``x`` (n, d), as orthonormal columns (d, R), in float64.

  Eigenvectors of the centred scatter matrix ``(x - mean)^T (x - mean)`` (the right singular
  vectors of the centred data) by decreasing variance, each signed so that its
  largest-magnitude entry is positive (the same data gives the same basis).

  Examples:
    >>> x = np.random.default_rng(0).normal(size=(200, 5)) * np.array([5.0, 1, 1, 1, 1])
    >>> u = pca_basis(2, x)
    >>> u.shape, bool(abs(u[0, 0]) > 0.99)
    ((5, 2), True)
  """
  x = np.asarray(x, np.float64)
  if x.ndim != 2:
    raise ValueError(f"pca_basis needs the real inputs as (n, d); got shape {x.shape}.")
  check_image_basis(f"pca:{rank}", x.shape[1])
  centred = x - x.mean(axis=0)
  _, vectors = np.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
  top = vectors[:, ::-1][:, :rank]
  signs = np.sign(top[np.argmax(np.abs(top), axis=0), np.arange(rank)])
  return top * signs


def make_image_basis(spec: str, d: int, data: ArrayLike | None = None) -> np.ndarray | None:
  """The basis named by ``spec`` for inputs of dimension ``d``: None for ``"pixels"``, else (d, R) orthonormal.

  Args:
    spec: ``"pixels"``, ``"pca:R"`` or ``"dct:R"``.
    d: the input dimension (of the space the learner sees, after preprocessing).
    data: the real inputs (n, d) in that space, which ``"pca:R"`` needs (``distill`` passes
      the first task's preprocessed training inputs); the other bases ignore it.

  Examples:
    >>> make_image_basis("pixels", 64) is None
    True
    >>> make_image_basis("dct:4", 64).shape
    (64, 4)
  """
  name, rank = check_image_basis(spec, d)
  if name == "pixels":
    return None
  if name == "dct":
    return dct_basis(rank, d)
  if data is None:
    raise ValueError(f"image_basis {spec!r} is computed from the real inputs: pass basis=make_image_basis({spec!r}, d, "
                     "data=x) to the solver's init (distill does this).")
  data = np.asarray(data)
  if data.ndim != 2 or data.shape[1] != d:
    raise ValueError(f"image_basis {spec!r}: the real inputs must have shape (n, {d}); got {data.shape}.")
  return pca_basis(rank, data)


def check_basis(spec: str, basis: ArrayLike, d: int) -> Array:
  """``basis`` as an array if it has the shape (d, R) that ``spec`` names and orthonormal columns; else a ValueError."""
  _, rank = check_image_basis(spec, d)
  shape = tuple(np.shape(basis))
  if shape != (d, rank):
    raise ValueError(f"the basis for image_basis {spec!r} must have shape ({d}, {rank}); got {shape}.")
  if not isinstance(basis, jax.core.Tracer):
    u = np.asarray(basis, np.float64)
    error = float(np.max(np.abs(u.T @ u - np.eye(rank))))
    if not error < 1e-4:
      raise ValueError(f"the basis for image_basis {spec!r} must have orthonormal columns; max |U^T U - I| = {error:.3g}.")
  return basis


class InBasisState(NamedTuple):
  """The state of :func:`in_basis`: the basis and the wrapped optimiser's state over the coefficients.

  Attributes:
    basis: U (d, r), orthonormal columns.
    inner: the optimiser's state on C (N, r) (on the pair (C, other) when paired).
  """

  basis: Float[Array, "d r"]
  inner: optax.OptState


def in_basis(inner: optax.GradientTransformation, basis: ArrayLike | None = None, paired: bool = False
             ) -> optax.GradientTransformation:
  """Runs ``inner`` (D's optimiser) on the coefficients of D in an orthonormal basis U: the step of ``D0 + C U^T`` in C.

  ``update`` maps D's gradient g (N, d) to ``g U`` (N, r), which is the gradient in C of
  ``f(D0 + C U^T)``; lets ``inner`` turn it into a step of C; and returns that step in D,
  ``u U^T``. So D moves within ``D0 + span(U)`` and every step equals ``inner``'s step on
  the reparameterised problem (with Adam, per coefficient: its scaling is per direction of
  U, not per pixel). The coefficients themselves are not kept: ``inner`` gets no params
  (Adam and SGD need none).

  Args:
    inner: the optimiser (e.g. ``optax.adam(lr)``).
    basis: U (d, r); only ``init`` reads it (``update`` takes U from the state), so the
      chain a step builds may leave it out.
    paired: the updates are a pair ``(D, other)``; only D is written in the basis, ``other``
      goes to ``inner`` as it is.

  Examples:
    >>> u = jnp.eye(4)[:, :2]
    >>> tx = in_basis(optax.sgd(1.0), u)
    >>> step, _ = tx.update(jnp.ones((3, 4)), tx.init(jnp.zeros((3, 4))))
    >>> step[0].tolist()
    [-1.0, -1.0, 0.0, 0.0]
  """

  def first(tree):
    return tree[0] if paired else tree

  def with_first(tree, value):
    return (value, *tree[1:]) if paired else value

  def init(params):
    if basis is None:
      raise ValueError("in_basis needs the basis U at init (its update reads U from the state).")
    images = first(params)
    u = jnp.asarray(basis, images.dtype)
    coefficients = jnp.zeros((images.shape[0], u.shape[1]), images.dtype)
    return InBasisState(u, inner.init(with_first(params, coefficients)))

  def update(updates, state, params=None):
    del params  # the coefficients are not kept (see above)
    u = state.basis
    # HIGHEST: a TF32 product on a GPU would take D out of span(U) by ~1e-3 per step.
    grads = with_first(updates, jnp.matmul(first(updates), u, precision=jax.lax.Precision.HIGHEST))
    steps, inner_state = inner.update(grads, state.inner)
    return with_first(steps, jnp.matmul(first(steps), u.T, precision=jax.lax.Precision.HIGHEST)), InBasisState(u, inner_state)

  return optax.GradientTransformation(init, update)
