"""The honest evaluation protocol: re-train on D alone, probe with a converged logistic head."""

from udd_jax.data.clustering import kmeans as kmeans
from udd_jax.evaluation.baselines import BASELINES as BASELINES
from udd_jax.evaluation.evaluate import evaluate as evaluate
from udd_jax.evaluation.logistic import LogisticHead as LogisticHead
from udd_jax.evaluation.logistic import accuracy as accuracy
from udd_jax.evaluation.logistic import fit_logistic as fit_logistic
from udd_jax.evaluation.report import EvaluationReport as EvaluationReport
from udd_jax.evaluation.report import Row as Row
from udd_jax.training.recipes import STANDARD_RECIPE as STANDARD_RECIPE
from udd_jax.training.recipes import Recipe as Recipe
from udd_jax.training.recipes import retrain as retrain
from udd_jax.training.recipes import train_until_converged as train_until_converged
