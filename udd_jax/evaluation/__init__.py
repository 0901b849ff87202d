"""The honest evaluation protocol: re-train on D alone, probe with a converged logistic head."""

from udd_jax.evaluation.baselines import BASELINES as BASELINES
from udd_jax.evaluation.cache import BaselineCache as BaselineCache
from udd_jax.evaluation.cache import default_cache_dir as default_cache_dir
from udd_jax.evaluation.evaluate import evaluate as evaluate
from udd_jax.evaluation.logistic import LogisticHead as LogisticHead
from udd_jax.evaluation.logistic import accuracy as accuracy
from udd_jax.evaluation.logistic import fit_logistic as fit_logistic
from udd_jax.evaluation.report import EvaluationReport as EvaluationReport
from udd_jax.evaluation.report import Row as Row
