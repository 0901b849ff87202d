"""udd_jax: unsupervised dataset distillation by bilevel optimisation, in JAX.

The public surface is re-exported here; implementation modules live in the
sub-packages ``udd_jax.inner`` (inner learners and their losses), ``udd_jax.heads``
(task heads), ``udd_jax.training`` (unrolls and re-training recipes), ``udd_jax.bilevel``
(the problem and its solvers) and ``udd_jax.data`` (loading, preprocessing, clustering).
"""

from udd_jax.bilevel import Implicit as Implicit
from udd_jax.bilevel import Penalty as Penalty
from udd_jax.bilevel import Pool as Pool
from udd_jax.bilevel import SolverState as SolverState
from udd_jax.bilevel import TaskBatch as TaskBatch
from udd_jax.bilevel import Unrolled as Unrolled
from udd_jax.bilevel import ValueFunction as ValueFunction
from udd_jax.bilevel import get_solver as get_solver
from udd_jax.bilevel import make_problem as make_problem
from udd_jax.bilevel import mu_schedule as mu_schedule
from udd_jax.bilevel import sample_batch as sample_batch
from udd_jax.data import BUILTIN_DATASETS as BUILTIN_DATASETS
from udd_jax.data import PREPROCESSING_METHODS as PREPROCESSING_METHODS
from udd_jax.data import Preprocessing as Preprocessing
from udd_jax.data import fit_preprocessing as fit_preprocessing
from udd_jax.data import load_dataset as load_dataset
from udd_jax.data import resize_images as resize_images
from udd_jax.driver import DistillResult as DistillResult
from udd_jax.driver import distill as distill
from udd_jax.driver import ProblemConfig as ProblemConfig
from udd_jax.driver import RunConfig as RunConfig
from udd_jax.driver import distill_arguments as distill_arguments
from udd_jax.driver import load_distilled as load_distilled
from udd_jax.evaluation import EvaluationReport as EvaluationReport
from udd_jax.evaluation import evaluate as evaluate
from udd_jax.inner import INNER_LOSSES as INNER_LOSSES
from udd_jax.inner import LEARNERS as LEARNERS
from udd_jax.inner import GRBMParams as GRBMParams
from udd_jax.inner import ae_grad_closed_form as ae_grad_closed_form
from udd_jax.inner import ae_loss as ae_loss
from udd_jax.inner import ae_penalty_closed_form as ae_penalty_closed_form
from udd_jax.inner import denoising_score_matching_loss as denoising_score_matching_loss
from udd_jax.inner import features as features
from udd_jax.inner import get_inner_learner as get_inner_learner
from udd_jax.inner import gradient_penalty as gradient_penalty
from udd_jax.inner import ImagePrior as ImagePrior
from udd_jax.inner import fit_prior as fit_prior
from udd_jax.inner import init_params as init_params
from udd_jax.inner import load_prior as load_prior
from udd_jax.inner import naturalness as naturalness
from udd_jax.inner import linear_ae_loss as linear_ae_loss
from udd_jax.inner import linear_ae_solution as linear_ae_solution
from udd_jax.inner import score as score
from udd_jax.inner import score_matching_grad_closed_form as score_matching_grad_closed_form
from udd_jax.inner import score_matching_loss as score_matching_loss
from udd_jax.inner import score_matching_penalty_closed_form as score_matching_penalty_closed_form
from udd_jax.inner import sliced_score_matching_loss as sliced_score_matching_loss
from udd_jax.training import STANDARD_RECIPE as STANDARD_RECIPE
from udd_jax.training import Recipe as Recipe

from udd_jax._version import __version__ as __version__
