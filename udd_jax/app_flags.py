"""absl flag helpers shared by the apps in ``experiments/``: enum lists, defaults in the help, flags as arguments,
and bad values reported as one line instead of a traceback."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags

from udd_jax.driver.arguments import DRIVER_OPTIONS, PROBLEM_OPTIONS
from udd_jax.experiment import SOLVERS, default_steps
from udd_jax.sharding import ENV, initialize_distributed

# The exceptions a bad flag value or a missing file raises in the library: reported in one line.
USER_ERRORS = (ValueError, TypeError, OSError)
DATA_LOADER = "udd_jax.data.loading"  # its FileNotFoundError means a dataset was not found


def steps_help() -> str:
  """The ``--steps`` help: the default of each solver, e.g. ``pool 500, unrolled 300, ...``."""
  return "Outer steps (default by solver: " + ", ".join(f"{s} {default_steps(s)}" for s in sorted(SOLVERS)) + ")."


def opt_help(solvers: Sequence[str] | None = None) -> str:
  """The ``--opt`` help: the problem options, then each solver's option names (its dataclass fields).

  Examples:
    >>> text = opt_help(["unrolled"])
    >>> "head_l2" in text and "unrolled: " in text and "unroll_steps" in text and "pool:" not in text
    True
  """
  names = sorted(SOLVERS) if solvers is None else list(solvers)
  per_solver = "; ".join(f"{s}: {', '.join(sorted(f.name for f in dataclasses.fields(SOLVERS[s])))}" for s in names)
  return (f"Solver or problem option key=value (repeatable). Problem options: "
          f"{', '.join(sorted(PROBLEM_OPTIONS + DRIVER_OPTIONS))}. Solver options: {per_solver}")


def _raised_in(error: BaseException, module: str) -> bool:
  """Whether ``error`` was raised by code of ``module`` (its innermost traceback frame)."""
  tb = error.__traceback__
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  return tb is not None and tb.tb_frame.f_globals.get("__name__") == module


def _path_flag(path: str, flag_values: flags.FlagValues) -> str | None:
  """``--name=value`` of the string flag whose value is ``path`` or one of its parents (the longest), if any."""
  target = pathlib.PurePath(path)
  best = None
  for name in flag_values:
    value = flag_values[name].value
    if isinstance(value, str) and value and (target == pathlib.PurePath(value) or pathlib.PurePath(value) in target.parents):
      if best is None or len(value) > len(best[1]):
        best = (name, value)
  return None if best is None else f"--{best[0]}={best[1]}"


def error_line(error: BaseException, flag_values: flags.FlagValues = flags.FLAGS) -> str:
  """The one-line report of a bad value: the exception's type and message, with the flag to change.

  A dataset the loader could not find gets the flag that provides it (``--data_dir``, or
  ``$UDD_DATA_DIR``); an ``OSError`` on a path given by a flag names that flag.
  """
  message = " ".join(str(error).split())
  if isinstance(error, FileNotFoundError) and _raised_in(error, DATA_LOADER):
    message += " From the apps: pass --data_dir=DIR (a directory holding <dataset>.npz) or set $UDD_DATA_DIR."
  elif isinstance(error, OSError) and error.filename is not None:
    flag = _path_flag(str(error.filename), flag_values)
    if flag is not None:
      message = f"{flag}: {message}"
  return f"{type(error).__name__}: {message}"


def one_line_errors(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
  """Wraps an app's ``main``: a bad value (:data:`USER_ERRORS`) exits with status 1 and one line, no traceback.

  absl reports a bad flag syntax in one line; this does the same for the values that only
  the library can judge (``--n_distill=0``, an unwritable ``--workdir``, a missing dataset).
  """

  @functools.wraps(main)
  def wrapped(argv: list[str]) -> Any:
    try:
      return main(argv)
    except USER_ERRORS as error:
      sys.exit(error_line(error))

  return wrapped


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


def define_devices() -> None:
  """``--devices`` and the three multi-process flags; :func:`start_distributed` reads the latter."""
  flags.DEFINE_integer("devices", None, "Devices to split the work over: N (the first N), 0 (all JAX sees) or unset "
                       "(one, or all when several processes run); docs/SCALING.md.")
  flags.DEFINE_string("coordinator_address", None, f"host:port of process 0 of a multi-process run (or ${ENV['coordinator_address']}).")
  flags.DEFINE_integer("num_processes", None, f"Number of processes of a multi-process run (or ${ENV['num_processes']}).")
  flags.DEFINE_integer("process_id", None, f"This process's index in [0, num_processes) (or ${ENV['process_id']}).")


def start_distributed(flag_values: flags.FlagValues = flags.FLAGS) -> bool:
  """Starts ``jax.distributed`` when the flags or the environment ask for a multi-process run (before any JAX work)."""
  return initialize_distributed(flag_values.coordinator_address, flag_values.num_processes, flag_values.process_id)


def define_workdir() -> None:
  """The required ``--workdir`` flag every app writes its run into."""
  flags.DEFINE_string("workdir", None, "(required) Where everything is written.", required=True)


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
