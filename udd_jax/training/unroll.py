"""Inner training loops: a warm-started optax solve (not differentiated) and differentiable unrolls."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Scalar


class InnerSolveResult(NamedTuple):
  """Outcome of :func:`inner_solve`: the parameters, optimiser state and diagnostics."""

  params: Any
  opt_state: Any
  num_steps: Array
  grad_norm: Array


def inner_solve(
    loss_fn: Callable[[Any], Scalar],
    params: Any,
    opt_state: Any,
    optimizer: optax.GradientTransformation,
    *,
    max_steps: int,
    tol: float = 0.0,
) -> InnerSolveResult:
  """Runs ``optimizer`` on ``loss_fn`` until the gradient norm is below ``tol`` or ``max_steps``.

  A ``lax.while_loop``: cheap to compile, stops early, and is never differentiated
  (implicit differentiation and Danskin's theorem need only the end point).

  Args:
    loss_fn: ``loss_fn(params) -> scalar``.
    params: starting point (a warm start from the previous outer step).
    opt_state: the optimiser state that goes with ``params``.
    optimizer: an optax transformation.
    max_steps: step budget.
    tol: stop when ``||grad|| <= tol`` (0 runs the whole budget).

  Returns:
    An :class:`InnerSolveResult`; ``grad_norm`` is measured at the returned params.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> opt = optax.sgd(0.5)
    >>> res = inner_solve(lambda w: jnp.sum((w - 3.0) ** 2), jnp.zeros(2), opt.init(jnp.zeros(2)), opt, max_steps=50, tol=1e-6)
    >>> res.params.tolist(), int(res.num_steps)
    ([3.0, 3.0], 1)
  """
  grad_fn = jax.grad(loss_fn)

  def cond(carry):
    _, _, i, _, gnorm = carry
    return (i < max_steps) & (gnorm > tol)

  def body(carry):
    p, s, i, g, _ = carry
    updates, s = optimizer.update(g, s, p)
    p = optax.apply_updates(p, updates)
    g = grad_fn(p)
    return p, s, i + 1, g, optax.tree.norm(g)

  g0 = grad_fn(params)
  p, s, i, _, gnorm = jax.lax.while_loop(cond, body, (params, opt_state, jnp.asarray(0), g0, optax.tree.norm(g0)))
  return InnerSolveResult(p, s, i, gnorm)


def unroll(
    loss_fn: Callable[..., Scalar],
    params: Any,
    theta: Any,
    step_sizes: Array,
    *,
    transform: optax.GradientTransformation = optax.identity(),
    truncate: int | None = None,
    xs: Any = None,
    remat: bool | str = False,
) -> Any:
  """Differentiable inner training: ``len(step_sizes)`` steps of ``transform`` with a step size each.

  ``p_{t+1} = p_t - step_sizes[t] * transform(grad_p loss_fn(p_t, theta[, xs[t]]))``, a
  ``lax.scan`` that JAX differentiates with respect to ``theta`` and
  ``step_sizes`` (as in the original dataset distillation, which learns them).

  Args:
    loss_fn: ``loss_fn(params, theta) -> scalar``, or ``loss_fn(params, theta, x_t)``
      when ``xs`` is given.
    params: initial parameters.
    theta: what the outer problem differentiates (the distilled images).
    step_sizes: shape (T,), one step size per inner step.
    transform: an optax transformation without learning rate, e.g.
      ``optax.identity()`` (gradient descent) or ``optax.scale_by_adam()``.
    truncate: if set, backpropagate only through the last ``truncate`` steps.
    xs: optional per-step data, a pytree whose leaves have leading axis T (e.g. the
      (T, b) mini-batch indices of each step); step t passes ``xs[t]`` to ``loss_fn``
      as its third argument.
    remat: what the backward pass keeps of the T steps it differentiates. ``False``: every
      step's intermediates (memory grows with T times a step's activations). ``True`` or
      ``"step"``: each step's input carry only, its intermediates recomputed
      (``jax.checkpoint`` per step: T carries). ``"segments"``: the steps in about sqrt(T)
      segments of about sqrt(T) steps; only the carries at segment boundaries are kept, and
      a segment is recomputed step by step when its turn comes (about 2 sqrt(T) carries and
      one step's intermediates: memory O(sqrt T), for one more forward pass of compute).

  Returns:
    The parameters after T steps, with the dtypes of ``params``.

  Examples:
    >>> import jax.numpy as jnp
    >>> loss = lambda w, target, i: 0.5 * (w - target[i]) ** 2
    >>> float(unroll(loss, 0.0, jnp.array([1.0, 3.0]), jnp.full(2, 0.5), xs=jnp.array([0, 1])))
    1.75
  """
  n_steps = step_sizes.shape[0]
  grad_fn = jax.grad(loss_fn)

  def step(carry, inputs):
    p, s = carry
    if xs is None:
      lr, grads = inputs, grad_fn(p, theta)
    else:
      lr, x = inputs
      grads = grad_fn(p, theta, x)
    updates, s = transform.update(grads, s, p)
    # The cast keeps the parameters' dtypes when the step sizes have a wider one.
    p = jax.tree.map(lambda w, u: (w - lr * u).astype(jnp.asarray(w).dtype), p, updates)
    return (p, s), None

  if remat not in REMAT_MODES:
    raise ValueError(f"unknown remat {remat!r}; valid options are {list(REMAT_MODES)}.")
  if remat:
    step = jax.checkpoint(step)
  # Without per-step data the scan runs over the step sizes alone, as it always did.
  per_step = step_sizes if xs is None else (step_sizes, xs)
  carry = (params, transform.init(params))
  cut = 0 if truncate is None else max(n_steps - truncate, 0)
  if cut:
    carry, _ = jax.lax.scan(step, carry, jax.tree.map(lambda a: a[:cut], per_step))
    carry = jax.lax.stop_gradient(carry)
  if remat == "segments":
    return _segmented_scan(step, carry, jax.tree.map(lambda a: a[cut:], per_step), n_steps - cut)[0]
  carry, _ = jax.lax.scan(step, carry, jax.tree.map(lambda a: a[cut:], per_step))
  return carry[0]


REMAT_MODES = (False, True, "step", "segments")


def _segmented_scan(step: Callable[..., Any], carry: Any, per_step: Any, n: int) -> Any:
  """``n`` steps as floor(sqrt n) checkpointed segments of floor(sqrt n) steps, then the few left over.

  ``step`` is already checkpointed per step, so recomputing a segment in the backward pass
  keeps one carry per step of that segment and one step's intermediates at a time.
  """
  length = max(1, math.isqrt(n))
  n_segments = n // length

  def segment(c, inputs):
    return jax.lax.scan(step, c, inputs)[0], None

  whole = jax.tree.map(lambda a: a[: n_segments * length].reshape((n_segments, length) + a.shape[1:]), per_step)
  carry, _ = jax.lax.scan(jax.checkpoint(segment), carry, whole)
  carry, _ = jax.lax.scan(step, carry, jax.tree.map(lambda a: a[n_segments * length:], per_step))
  return carry


def advance(
    loss_fn: Callable[[Any, Any], Scalar],
    params: Any,
    opt_state: Any,
    theta: Any,
    optimizer: optax.GradientTransformation,
    steps: int,
) -> tuple[Any, Any]:
  """``steps`` differentiable steps of ``optimizer`` on ``loss_fn(., theta)`` from ``(params, opt_state)``.

  Unlike :func:`unroll`, which starts the transformation's state afresh, this continues a
  learner's training where it stopped (its Adam moments included): the pool solver
  differentiates through the last ``steps`` steps of learners that keep training across
  outer steps.

  Returns:
    ``(params, opt_state)`` after the steps.
  """
  grad_fn = jax.grad(loss_fn)

  def step(carry, _):
    p, s = carry
    updates, s = optimizer.update(grad_fn(p, theta), s, p)
    return (optax.apply_updates(p, updates), s), None

  return jax.lax.scan(step, (params, opt_state), None, length=steps)[0]
