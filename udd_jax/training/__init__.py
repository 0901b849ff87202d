"""Training an inner learner: differentiable unrolls, warm-started solves, and the recipes that re-train on D."""

from udd_jax.training.loops import LOOPS as LOOPS
from udd_jax.training.loops import resolve_loop as resolve_loop
from udd_jax.training.optimizers import OPTIMIZERS as OPTIMIZERS
from udd_jax.training.optimizers import optimizer as optimizer
from udd_jax.training.recipes import CONVERGENCE_CHUNK as CONVERGENCE_CHUNK
from udd_jax.training.recipes import CONVERGENCE_DROP as CONVERGENCE_DROP
from udd_jax.training.recipes import STANDARD_RECIPE as STANDARD_RECIPE
from udd_jax.training.recipes import Recipe as Recipe
from udd_jax.training.recipes import retrain as retrain
from udd_jax.training.recipes import retrain_many as retrain_many
from udd_jax.training.recipes import retrain_with_step_sizes as retrain_with_step_sizes
from udd_jax.training.recipes import train_until_converged as train_until_converged
from udd_jax.training.unroll import InnerSolveResult as InnerSolveResult
from udd_jax.training.unroll import advance as advance
from udd_jax.training.unroll import inner_solve as inner_solve
from udd_jax.training.unroll import unroll as unroll
