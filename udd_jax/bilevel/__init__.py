"""Bilevel solvers and the problem they solve."""

from udd_jax.bilevel.implicit_diff import LinearSolveStats as LinearSolveStats
from udd_jax.bilevel.implicit_diff import hvp as hvp
from udd_jax.bilevel.implicit_diff import implicit_argmin as implicit_argmin
from udd_jax.bilevel.implicit_diff import implicit_hypergradient as implicit_hypergradient
from udd_jax.bilevel.problem import BilevelProblem as BilevelProblem
from udd_jax.bilevel.problem import TaskBatch as TaskBatch
from udd_jax.bilevel.problem import make_problem as make_problem
from udd_jax.bilevel.problem import sample_batch as sample_batch
from udd_jax.bilevel.solvers import SOLVERS as SOLVERS
from udd_jax.bilevel.solvers import Implicit as Implicit
from udd_jax.bilevel.solvers import MuSchedule as MuSchedule
from udd_jax.bilevel.solvers import Penalty as Penalty
from udd_jax.bilevel.solvers import Pool as Pool
from udd_jax.bilevel.solvers import PoolState as PoolState
from udd_jax.bilevel.solvers import Problem as Problem
from udd_jax.bilevel.solvers import SolverState as SolverState
from udd_jax.bilevel.solvers import Unrolled as Unrolled
from udd_jax.bilevel.solvers import ValueFunction as ValueFunction
from udd_jax.bilevel.solvers import diversity as diversity
from udd_jax.bilevel.solvers import get_solver as get_solver
from udd_jax.bilevel.solvers import mu_schedule as mu_schedule
