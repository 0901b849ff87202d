"""Unrolled differentiation through T inner steps from a fresh random init (the original dataset distillation)."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from udd_jax import _validation
from udd_jax.bilevel.problem import TaskBatch
from udd_jax.bilevel.solvers.base import FreshHeadsBase, Metrics, Problem, apply_updates, init_common
from udd_jax.training import optimizers
from udd_jax.training.recipes import Recipe
from udd_jax.training.unroll import REMAT_MODES, unroll


class UnrolledState(NamedTuple):
  """The state of :class:`Unrolled`.

  Attributes:
    params: the first fresh init of the last step, after its T inner steps (w_T).
    heads: the heads fitted at it.
    log_step_sizes: the log of the T inner step sizes (learned when ``learn_step_size``).
    opt_state: the state of D's chain over the pair (D, log step sizes).
  """

  step: Array
  images: Float[Array, "N d"]
  params: PyTree
  heads: PyTree
  log_step_sizes: Float[Array, " T"]
  opt_state: optax.OptState
  key: PRNGKeyArray


@dataclasses.dataclass(frozen=True)
class Unrolled(FreshHeadsBase):
  """Unrolled differentiation through ``unroll_steps`` inner steps from a fresh random init.

  As in the original dataset distillation: each outer step samples a new init w0,
  trains it on D for T steps (``inner_optimizer`` ``"sgd"`` or ``"adam"`` with one
  step size per step, starting at ``inner_lr`` and learned when ``learn_step_size``),
  fits the heads at w_T (Danskin), and backpropagates the task losses through the T
  steps (or only the last ``truncate`` of them).

  Because every step starts from a new init, the features of w_T change from step
  to step (hidden units come out in any order), so heads are fitted afresh each
  step: ``head_steps`` steps of ``head_optimizer`` from zero for softmax heads;
  a ridge head (``make_problem(head="ridge")``) is fitted in closed form and is
  the better match for this solver.

  Memory: the backward pass keeps every inner step's intermediates unless ``remat`` says
  otherwise (``"step"``: one carry per step; ``"segments"``: about 2 sqrt(T) carries,
  :func:`~udd_jax.training.unroll.unroll`), for one more forward pass of compute.

  With ``n_inits > 1`` each step trains that many fresh inits (vmapped) and averages
  their task losses: a lower-variance hypergradient of the expected loss over inits,
  at ``n_inits`` times the cost.

  The learned step sizes are updated with D, by D's chain (``image_optimizer``,
  ``image_lr``, ``lr_schedule``; the diversity term, ``image_basis`` and the projection touch D only: the
  step sizes stay in their own coordinates).

  Examples:
    >>> solver = Unrolled()
    >>> solver.unroll_steps, solver.inner_optimizer, solver.inner_lr, Unrolled.default_steps
    (200, 'sgd', 0.02, 300)
  """

  # Plain gradient steps, as in the original dataset distillation: D steers the size of every
  # update, where Adam would normalise it away (docs/RESULTS.md compares the two).
  unroll_steps: int = 200
  inner_optimizer: str = "sgd"
  inner_lr: float = 0.02
  learn_step_size: bool = True
  truncate: int | None = None
  n_inits: int = 1
  remat: bool | str = False
  name = "unrolled"
  default_steps = 300

  def __post_init__(self):
    super().__post_init__()
    _validation.check_choice(self.inner_optimizer, "inner_optimizer", optimizers.OPTIMIZERS)
    _validation.check_positive_int(self.unroll_steps, "unroll_steps")
    _validation.check_positive_int(self.n_inits, "n_inits")
    _validation.check_positive_float(self.inner_lr, "inner_lr")
    if self.truncate is not None:
      _validation.check_positive_int(self.truncate, "truncate")
    if self.remat not in REMAT_MODES:
      raise ValueError(f"unknown remat {self.remat!r}; valid options are {list(REMAT_MODES)}.")

  def recipe(self, state: UnrolledState, init_scale: float, given: Recipe | None = None) -> Recipe:
    """The unroll itself, with the step sizes it learned: D is made for exactly this training (``given`` is ignored)."""
    lrs = tuple(float(v) for v in np.exp(np.asarray(state.log_step_sizes)))
    return Recipe(self.inner_optimizer, lrs, self.unroll_steps, init_scale)

  def init(self, problem: Problem, key: PRNGKeyArray, images: Array, basis: jax.typing.ArrayLike | None = None,
           prior: Any = None) -> UnrolledState:
    params, heads, key = init_common(problem, key, images)
    log_lr = jnp.full((self.unroll_steps,), jnp.log(self.inner_lr), images.dtype)
    opt_state = self.init_image_state((images, log_lr), basis, paired=True, prior=prior)
    return UnrolledState(jnp.asarray(0), images, params, heads, log_lr, opt_state, key)

  def step(self, problem: Problem, state: UnrolledState, batch: TaskBatch) -> tuple[UnrolledState, Metrics]:
    key, k_init, k_inner, k_heads = jax.random.split(state.key, 4)
    inner = lambda p, images: problem.inner_loss(p, images, k_inner)
    dtype = state.images.dtype
    w0s = jax.vmap(lambda k: problem.init_params(k, dtype))(jax.random.split(k_init, self.n_inits))
    transform = optimizers.direction(self.inner_optimizer)

    def train(images, log_lr):
      train_one = lambda w0: unroll(inner, w0, images, jnp.exp(log_lr), transform=transform, truncate=self.truncate,
                                    remat=self.remat)
      return jax.vmap(train_one)(w0s)

    def fit_and_score(w_final, k):
      heads = self.fit_fresh_heads(problem, w_final, batch, k, dtype)
      outer, v = jax.value_and_grad(lambda p: problem.outer_loss(p, heads, batch)[0])(w_final)
      return heads, outer, jax.tree.map(lambda g: g / self.n_inits, v)

    w_finals, vjp = jax.vjp(train, state.images, state.log_step_sizes)
    all_heads, outers, v = jax.vmap(fit_and_score)(w_finals, jax.random.split(k_heads, self.n_inits))
    outer = jnp.mean(outers)
    w_final, heads = jax.tree.map(lambda a: a[0], (w_finals, all_heads))
    g_images, g_log_lr = vjp(v)
    if not self.learn_step_size:
      g_log_lr = jnp.zeros_like(g_log_lr)
    (images, log_lr), opt_state = apply_updates(self.image_transform(paired=True), (g_images, g_log_lr),
                                                state.opt_state, (state.images, state.log_step_sizes))
    metrics = {
        "outer_loss": outer,
        "inner_value": inner(w_final, state.images),
        "inner_grad_norm": optax.tree.norm(jax.grad(inner)(w_final, state.images)),
        "mean_step_size": jnp.mean(jnp.exp(log_lr)),
        "image_grad_norm": optax.tree.norm(g_images),
    }
    return UnrolledState(state.step + 1, images, w_final, heads, log_lr, opt_state, key), metrics
