"""absl flag helpers shared by the apps in ``experiments/``: enum lists, defaults in the help, flags as arguments."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags

from udd_jax.experiment import SOLVERS, default_steps


def steps_help() -> str:
  """The ``--steps`` help: the default of each solver, e.g. ``pool 500, unrolled 300, ...``."""
  return "Outer steps (default by solver: " + ", ".join(f"{s} {default_steps(s)}" for s in sorted(SOLVERS)) + ")."


class EnumListParser(flags.ListParser):
  """A comma-separated list whose every item is one of ``choices``; an unknown item fails the parse."""

  def __init__(self, choices: Sequence[str]):
    super().__init__()
    self.choices = tuple(choices)

  def parse(self, argument: Any) -> list[str]:
    values = super().parse(argument)
    unknown = [v for v in values if v not in self.choices]
    if unknown:
      raise ValueError(f"unknown value(s) {unknown}; valid options are {list(self.choices)}")
    return values

  def flag_type(self) -> str:
    return "comma separated list of enum"


def define_enum_list(name: str, default: Sequence[str], choices: Sequence[str], help: str,  # noqa: A002 (absl's name)
                     flag_values: flags.FlagValues = flags.FLAGS) -> flags.FlagHolder:
  """``flags.DEFINE_multi_enum`` for a comma-separated list (``--baselines=raw_pixels,kmeans``), choices in the help."""
  caller = sys._getframe(1).f_globals.get("__name__", "")  # listed in --help under the app that defines it
  return flags.DEFINE(EnumListParser(choices), name, list(default), f"<{'|'.join(choices)}>,...: {help}", flag_values,
                      flags.CsvListSerializer(","), module_name=sys.argv[0] if caller == "__main__" else caller)


def app_arguments(flag_values: flags.FlagValues, function: Callable[..., Any], **overrides: Any) -> dict[str, Any]:
  """The keyword arguments of ``function`` from the absl flags of the same names, then ``overrides``."""
  names = inspect.signature(function).parameters
  return {k: v for k, v in flag_values.flag_values_dict().items() if k in names} | overrides
