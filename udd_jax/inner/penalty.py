"""The quadratic penalty ``||grad_w L_inner(w; D)||^2`` by automatic differentiation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax
from jaxtyping import Scalar


def gradient_penalty(loss_fn: Callable[..., Scalar], params: Any, x: Any, *args: Any, **kwargs: Any) -> Scalar:
  """Squared norm of the gradient of ``loss_fn`` with respect to its first argument.

  ``gradient_penalty(ae_loss, params, x)`` is ``||grad_params ae_loss(params, x)||^2``;
  its own gradient with respect to ``x`` or ``params`` is a plain ``jax.grad`` of
  this function (reverse over reverse), which is how the penalty solver uses it.

  Args:
    loss_fn: an inner loss ``loss_fn(params, x, *args, **kwargs) -> scalar``.
    params: the inner parameters (any pytree).
    x: the data.
    *args: further positional arguments of ``loss_fn`` (e.g. a PRNG key).
    **kwargs: keyword hyperparameters of ``loss_fn``.

  Returns:
    The scalar ``||grad_params loss_fn||^2``.

  Examples:
    >>> import jax, udd_jax
    >>> params = udd_jax.init_params(jax.random.key(0), 6, 4, init_scale=0.5)
    >>> x = jax.random.uniform(jax.random.key(1), (8, 6))
    >>> auto = gradient_penalty(udd_jax.ae_loss, params, x)
    >>> manual = udd_jax.ae_penalty_closed_form(params, x)
    >>> bool(abs(auto - manual) < 1e-5 * manual)
    True
  """
  grads = jax.grad(loss_fn)(params, x, *args, **kwargs)
  return optax.tree.norm(grads, squared=True)
