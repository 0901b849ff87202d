"""Inner learners: pure losses ``loss(params, x, **hparams) -> scalar`` and their gradients."""

from udd_jax.inner.closed_form import ae_grad_closed_form as ae_grad_closed_form
from udd_jax.inner.closed_form import ae_penalty_closed_form as ae_penalty_closed_form
from udd_jax.inner.closed_form import score_matching_grad_closed_form as score_matching_grad_closed_form
from udd_jax.inner.closed_form import score_matching_penalty_closed_form as score_matching_penalty_closed_form
from udd_jax.inner.grbm import GRBMParams as GRBMParams
from udd_jax.inner.grbm import ae_loss as ae_loss
from udd_jax.inner.grbm import denoising_score_matching_loss as denoising_score_matching_loss
from udd_jax.inner.grbm import features as features
from udd_jax.inner.grbm import init_params as init_params
from udd_jax.inner.grbm import score as score
from udd_jax.inner.grbm import score_matching_loss as score_matching_loss
from udd_jax.inner.linear import LinearAEParams as LinearAEParams
from udd_jax.inner.linear import linear_ae_grad_closed_form as linear_ae_grad_closed_form
from udd_jax.inner.linear import linear_ae_loss as linear_ae_loss
from udd_jax.inner.linear import linear_ae_solution as linear_ae_solution
from udd_jax.inner.grbm import sliced_score_matching_loss as sliced_score_matching_loss
from udd_jax.inner.penalty import gradient_penalty as gradient_penalty
from udd_jax.inner.learners import INNER_LOSSES as INNER_LOSSES
from udd_jax.inner.learners import LEARNERS as LEARNERS
from udd_jax.inner.learners import LinearAELearner as LinearAELearner
from udd_jax.inner.learners import GRBMLearner as GRBMLearner
from udd_jax.inner.learners import InnerLearner as InnerLearner
from udd_jax.inner.learners import LeastSquares as LeastSquares
from udd_jax.inner.learners import get_inner_learner as get_inner_learner
