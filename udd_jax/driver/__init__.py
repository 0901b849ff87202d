"""The distillation driver: ``distill`` and the set it returns.

Modules, in the order a run goes through them: ``arguments`` (checks, before anything is
compiled), ``build`` (the layout check, problem, solver state, jitted chunk), ``loop`` (chunks, checkpoints,
resume, signals, progress), ``probe`` (the training-time honest probe), ``result``
(``DistillResult``, ``load_distilled``), ``api`` (``distill``).
"""

from udd_jax.driver.api import distill as distill
from udd_jax.driver.arguments import DEFAULT_SOLVER as DEFAULT_SOLVER
from udd_jax.driver.arguments import INITS as INITS
from udd_jax.driver.arguments import PROBLEM_OPTIONS as PROBLEM_OPTIONS
from udd_jax.driver.arguments import ProblemConfig as ProblemConfig
from udd_jax.driver.arguments import RunConfig as RunConfig
from udd_jax.driver.arguments import distill_arguments as distill_arguments
from udd_jax.driver.loop import config_differences as config_differences
from udd_jax.driver.result import FORMAT_VERSION as FORMAT_VERSION
from udd_jax.driver.result import DistillResult as DistillResult
from udd_jax.driver.result import load_distilled as load_distilled
