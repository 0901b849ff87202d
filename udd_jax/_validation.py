"""Input checks shared by the public entry points.

Every check raises ``ValueError`` or ``TypeError`` with a message that names the
argument and the problem, so that bad input fails before any compilation or
training. Two families of checks exist:

* ``check_*`` functions on host data (numpy-convertible arrays): they may look at
  values (finiteness, label range) and are used by entry points that are never
  traced (data loading, ``distill``, ``evaluate``).
* ``check_static_*`` functions that only look at shapes and dtypes, so they also
  work on tracers inside ``jax.jit`` (used by the pure losses).
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import numpy as np


F = TypeVar("F", bound=Callable[..., Any])


def renamed(**old_to_new: str) -> Callable[[F], F]:
  """A decorator: a call that passes a keyword by its old name raises a TypeError naming the new one.

  No alias: the old name is refused, so that one spelling stays in use (issue 25).

  Examples:
    >>> @renamed(key="seed")
    ... def f(*, seed): return seed
    >>> f(key=0)
    Traceback (most recent call last):
    ...
    TypeError: f() got the keyword argument 'key', which is now called 'seed'.
  """

  def decorate(function: F) -> F:
    @functools.wraps(function)
    def checked(*args: Any, **kwargs: Any) -> Any:
      for old, new in old_to_new.items():
        if old in kwargs:
          raise TypeError(f"{function.__name__}() got the keyword argument {old!r}, which is now called {new!r}.")
      return function(*args, **kwargs)

    return checked  # type: ignore[return-value]

  return decorate


def shape_str(shape: tuple[int, ...]) -> str:
  """``(3,)``, ``(4, 3)``: a shape as messages print it."""
  return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def check_choice(value: Any, name: str, choices: Iterable[str]) -> str:
  """Returns ``value`` if it is one of ``choices``, else raises a ValueError listing them."""
  choices = tuple(choices)
  if not isinstance(value, str):
    raise TypeError(f"{name} must be a string, one of {sorted(choices)}; got {type(value).__name__}.")
  if value not in choices:
    raise ValueError(f"unknown {name} {value!r}; valid options are {sorted(choices)}.")
  return value


def check_positive_int(value: Any, name: str) -> int:
  """Returns ``value`` as an int if it is a positive integer (bools are rejected)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"{name} must be a positive integer; got {value!r} of type {type(value).__name__}.")
  if value <= 0:
    raise ValueError(f"{name} must be a positive integer; got {value}.")
  return int(value)


def check_non_negative_int(value: Any, name: str) -> int:
  """Returns ``value`` as an int if it is an integer >= 0 (bools are rejected)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"{name} must be a non-negative integer; got {value!r} of type {type(value).__name__}.")
  if value < 0:
    raise ValueError(f"{name} must be a non-negative integer; got {value}.")
  return int(value)


def check_positive_float(value: Any, name: str, *, allow_zero: bool = False) -> float:
  """Returns ``value`` as a float if it is a finite positive (or non-negative) number."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"{name} must be a real number; got {value!r} of type {type(value).__name__}.")
  value = float(value)
  if not np.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
    bound = "non-negative" if allow_zero else "positive"
    raise ValueError(f"{name} must be a finite {bound} number; got {value}.")
  return value


def check_array(
    x: Any,
    name: str,
    *,
    ndim: int | None = None,
    min_ndim: int | None = None,
    floating: bool = True,
    finite: bool = True,
) -> np.ndarray:
  """Converts ``x`` to a numpy array and checks rank, emptiness, dtype and values.

  Args:
    x: array-like input.
    name: argument name used in error messages.
    ndim: required rank, if any.
    min_ndim: minimal rank, if any.
    floating: if True the array must hold real numbers (float, int or uint; not
      bool, complex, string or object). Integer images are accepted here and
      converted by the caller where a float is needed.
    finite: if True, NaN and infinity are rejected.

  Returns:
    The input as a numpy array (no copy when possible).
  """
  try:
    arr = np.asarray(x)
  except Exception as e:  # ragged lists and the like
    raise TypeError(f"{name} could not be converted to an array: {e}") from None
  if arr.dtype == object or arr.dtype.kind in "USV":
    raise TypeError(f"{name} must be a numeric array; got dtype {arr.dtype}.")
  if floating and arr.dtype.kind not in "fiu":
    raise TypeError(f"{name} must hold real numbers (float or integer); got dtype {arr.dtype}.")
  if ndim is not None and arr.ndim != ndim:
    raise ValueError(f"{name} must have rank {ndim}; got shape {shape_str(arr.shape)}.")
  if min_ndim is not None and arr.ndim < min_ndim:
    raise ValueError(f"{name} must have rank >= {min_ndim}; got shape {shape_str(arr.shape)}.")
  if arr.size == 0:
    raise ValueError(f"{name} is empty (shape {shape_str(arr.shape)}).")
  if finite and arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
    n_bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
    raise ValueError(f"{name} contains {n_bad} non-finite value(s) (NaN or infinity).")
  return arr


def check_labels(y: Any, name: str, *, n: int | None = None) -> np.ndarray:
  """Checks integer class labels: rank 1, non-negative integers, length ``n``.

  Float arrays holding whole numbers are accepted (and converted); any other
  dtype, a fractional value or a negative value is rejected.

  Returns:
    The labels as an int32 numpy array.
  """
  arr = check_array(y, name, ndim=1, floating=True)
  if arr.dtype.kind == "f":
    if not np.all(arr == np.round(arr)):
      raise TypeError(f"{name} must hold integer class labels; got non-integer values of dtype {arr.dtype}.")
  if np.any(arr < 0):
    raise ValueError(f"{name} must hold non-negative class labels; got minimum {arr.min()}.")
  if n is not None and arr.shape[0] != n:
    raise ValueError(f"{name} has {arr.shape[0]} labels but the inputs have {n} rows.")
  return arr.astype(np.int32)


def check_labelled(pair: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
  """Checks an ``(x, y)`` pair of inputs (rank >= 2, finite) and matching integer labels.

  Errors name ``f"{name} x"`` and ``f"{name} y"``.

  Returns:
    ``(x, y)`` as numpy arrays, the labels as int32.
  """
  if not isinstance(pair, (tuple, list)) or len(pair) != 2:
    got = f"a sequence of length {len(pair)}" if isinstance(pair, (tuple, list)) else type(pair).__name__
    raise TypeError(f"{name} must be an (x, y) pair of inputs and labels; got {got}.")
  x = check_array(pair[0], f"{name} x", min_ndim=2)
  y = check_labels(pair[1], f"{name} y", n=x.shape[0])
  return x, y


def check_static_inputs(x: Any, name: str, n_features: int | None = None, expected_by: str = "") -> None:
  """Shape and dtype checks of flattened inputs ``x`` (n, n_features) that also work under ``jit``.

  ``expected_by`` names what fixes ``n_features`` (a learner's parameter), for the
  message; ``n_features=None`` accepts any number of features.
  """
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{name} must be an array; got {type(x).__name__}.")
  if x.ndim != 2:
    raise ValueError(f"{name} must have shape (n, {n_features or 'd'}) (flattened inputs); got {shape_str(x.shape)}.")
  if n_features is not None and x.shape[1] != n_features:
    raise ValueError(f"{name} has {x.shape[1]} features but {expected_by} expects {n_features}; got shape {shape_str(x.shape)}.")
  if x.shape[0] == 0:
    raise ValueError(f"{name} is empty (shape {shape_str(x.shape)}).")
  if not np.issubdtype(x.dtype, np.floating):
    raise TypeError(f"{name} must be a floating array (convert images with x.astype(float) / 255); got dtype {x.dtype}.")


def check_static_array(p: Any, name: str, rank: int) -> None:
  """``p`` is a floating array (or tracer) of rank ``rank``; works under ``jit``."""
  if not hasattr(p, "shape") or not hasattr(p, "dtype"):
    raise TypeError(f"{name} must be an array; got {type(p).__name__}.")
  if p.ndim != rank:
    raise ValueError(f"{name} must have rank {rank}; got shape {shape_str(p.shape)}.")
  if not np.issubdtype(p.dtype, np.floating):
    raise TypeError(f"{name} must be a floating array; got dtype {p.dtype}.")


def check_bool(value: Any, name: str) -> bool:
  """Returns ``value`` as a bool if it is one (numpy bools included), else raises a TypeError."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be a bool; got {value!r} of type {type(value).__name__}.")
  return bool(value)


def as_key(key: Any, name: str = "key") -> tuple[Any, Any]:
  """A typed PRNG key from an integer seed or a key (JAX convention), and its JSON record.

  Accepts a non-negative int seed, a typed key (``jax.random.key(seed)``) or a raw
  ``jax.random.PRNGKey`` (uint32, shape (2,)). Returns ``(key, record)`` where ``record`` is
  the int seed, or the key's data as a list, for configs.
  """
  import jax
  import jax.numpy as jnp

  if isinstance(key, numbers.Integral) and not isinstance(key, bool):
    if key < 0:
      raise ValueError(f"{name} must be a non-negative integer seed or a PRNG key; got {key}.")
    return jax.random.key(int(key)), int(key)
  if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ():
    return key, np.asarray(jax.random.key_data(key)).tolist()
  if isinstance(key, (jax.Array, np.ndarray)) and key.dtype == np.uint32 and key.shape == (2,):
    return jax.random.wrap_key_data(jnp.asarray(key)), np.asarray(key).tolist()
  raise TypeError(f"{name} must be an integer seed or a single PRNG key (jax.random.key(seed)); got {key!r}.")
