"""Marks for the doctests of udd_jax/ (tests/conftest.py holds the tests' own fixtures).

The fast tier, ``pytest -m "not slow"``, leaves out the tests marked slow (each took five
seconds or more on 2 cores) and these doctests, which run whole distillations.
"""

import pytest

SLOW_DOCTESTS = (
    "udd_jax/bilevel/solvers/__init__.py::udd_jax.bilevel.solvers",
    "udd_jax/driver/arguments.py::udd_jax.driver.arguments.distill_arguments",
    "udd_jax/driver/api.py::udd_jax.driver.api.distill",
)


def pytest_collection_modifyitems(config, items):
  for item in items:
    if item.nodeid in SLOW_DOCTESTS:
      item.add_marker(pytest.mark.slow)
