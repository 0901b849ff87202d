"""Bilevel solvers: small immutable strategy objects with a pure ``init`` and ``step``.

Every solver has the same interface::

    state = solver.init(problem, key, images)
    state, metrics = solver.step(problem, state, batch)   # pure; jit it once

and owns its defaults: its fields, ``default_steps``, ``default_head`` and ``recipe()``
(the recipe a distilled set ships). Each solver has a state type of its own (a
NamedTuple: :class:`PenaltyState`, :class:`ValueFunctionState`, :class:`ImplicitState`,
:class:`UnrolledState`, :class:`PoolState`); the driver reads only what every one of them
has (:class:`SolverState`: ``step``, ``images``, ``key``) and asks the solver for the rest
(``learner_params``, ``finite``, ``recipe``). Every option is a plain value, so
``get_solver(**solver.to_config())`` rebuilds the solver.

* :class:`Penalty`: jointly over (D, w, heads), task losses + (mu/2)||grad_w L_in(w; D)||^2.
* :class:`ValueFunction`: the optimal value reformulation, task losses +
  mu (L_in(w; D) - L_in(w'; D)) with w' from warm-started inner steps (Danskin).
* :class:`Implicit`: w*(D) from a warm-started inner solve; dL/dD by the implicit
  function theorem with CG on damped Hessian-vector products.
* :class:`Unrolled`: differentiate through T inner steps from a fresh random init
  (the original dataset distillation), optionally learning the step sizes.
* :class:`Pool`: a pool of persistent learners trained towards convergence on D.

Examples:
  One jitted step of every solver on the embedded digits:

  >>> import jax, jax.numpy as jnp, udd_jax
  >>> (x, y), _ = udd_jax.load_dataset("digits")
  >>> x = x.reshape(len(x), -1)
  >>> batch = udd_jax.sample_batch(jax.random.key(1), [(x, y)], 32)
  >>> small = dict(penalty=dict(mu=1.0), value_function={}, implicit=dict(cg_steps=3), unrolled=dict(unroll_steps=5),
  ...              pool=dict(pool_size=3, inner_steps=2, lifetime=6))
  >>> for name, options in small.items():
  ...   solver = get_solver(name, **options)
  ...   problem = udd_jax.make_problem(n_visible=64, n_hidden=8, n_classes=10, head=solver.default_head)
  ...   state = solver.init(problem, jax.random.key(0), x[:10])
  ...   step = jax.jit(lambda state, batch: solver.step(problem, state, batch))  # pure: jit it once
  ...   state, metrics = step(state, batch)
  ...   print(name, int(state.step), state.images.shape, bool(jnp.isfinite(metrics["outer_loss"])))
  penalty 1 (10, 64) True
  value_function 1 (10, 64) True
  implicit 1 (10, 64) True
  unrolled 1 (10, 64) True
  pool 1 (10, 64) True
"""

from __future__ import annotations

import dataclasses
from typing import Any

from udd_jax import _validation
from udd_jax.bilevel.solvers.base import Metrics as Metrics
from udd_jax.bilevel.solvers.base import Problem as Problem
from udd_jax.bilevel.solvers.base import SolverBase as SolverBase
from udd_jax.bilevel.solvers.base import SolverState as SolverState
from udd_jax.bilevel.solvers.base import PriorState as PriorState
from udd_jax.bilevel.solvers.base import add_diversity as add_diversity
from udd_jax.bilevel.solvers.base import add_prior as add_prior
from udd_jax.bilevel.solvers.base import diversity as diversity
from udd_jax.bilevel.solvers.base import project_onto_box as project_onto_box
from udd_jax.bilevel.solvers.implicit import Implicit as Implicit
from udd_jax.bilevel.solvers.implicit import ImplicitState as ImplicitState
from udd_jax.bilevel.solvers.joint import MuSchedule as MuSchedule
from udd_jax.bilevel.solvers.joint import Penalty as Penalty
from udd_jax.bilevel.solvers.joint import PenaltyState as PenaltyState
from udd_jax.bilevel.solvers.joint import ValueFunction as ValueFunction
from udd_jax.bilevel.solvers.joint import ValueFunctionState as ValueFunctionState
from udd_jax.bilevel.solvers.joint import mu_schedule as mu_schedule
from udd_jax.bilevel.solvers.pool import HYPERGRADIENTS as HYPERGRADIENTS
from udd_jax.bilevel.solvers.pool import ImplicitAtLearner as ImplicitAtLearner
from udd_jax.bilevel.solvers.pool import Pool as Pool
from udd_jax.bilevel.solvers.pool import PoolState as PoolState
from udd_jax.bilevel.solvers.pool import Truncated as Truncated
from udd_jax.bilevel.solvers.unrolled import Unrolled as Unrolled
from udd_jax.bilevel.solvers.unrolled import UnrolledState as UnrolledState

SOLVERS = {"penalty": Penalty, "value_function": ValueFunction, "implicit": Implicit, "unrolled": Unrolled, "pool": Pool}
Solver = Penalty | ValueFunction | Implicit | Unrolled | Pool


def get_solver(name: str | Solver, **options: Any) -> Solver:
  """Builds a solver by name (``penalty``, ``value_function``, ``implicit``, ``unrolled``, ``pool``) with options.

  A name and an instance with the same options are the same solver: ``get_solver("unrolled")
  == Unrolled()``, and a solver's record rebuilds it: ``get_solver(**solver.to_config()) ==
  solver``. Unknown options raise a ``TypeError`` that lists the valid ones.

  Examples:
    >>> get_solver("implicit", cg_steps=20).cg_steps
    20
    >>> get_solver("unrolled") == Unrolled()
    True
    >>> solver = get_solver("penalty", mu=mu_schedule("linear", 0.1, final=1.0, steps=5), image_lr=0.05)
    >>> get_solver(**solver.to_config()) == solver
    True
  """
  if isinstance(name, tuple(SOLVERS.values())):
    if options:
      return dataclasses.replace(name, **options)
    return name
  cls = SOLVERS[_validation.check_choice(name, "solver", SOLVERS)]
  valid = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(options) - valid)
  if unknown:
    raise TypeError(f"unknown option(s) {unknown} for solver {name!r}; valid options are {sorted(valid)}.")
  return cls(**options)
