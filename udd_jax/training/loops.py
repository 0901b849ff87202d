"""Which loop runs a training run's steps: a host loop over one jitted step, or one ``lax.scan``.

XLA:CPU runs convolutions inside ``scan``/``while`` bodies an order of magnitude slower
than as a jitted computation of their own (jax-ml/jax#12868; docs/BENCHMARKS.md (g)), so
on the CPU a host loop around one jitted step is the fast choice. On GPU and TPU a
convolution in a loop body costs what it costs outside, and the host loop's dispatch of
every step (and its synchronisation on the step's inputs) is what is slow: one
``lax.scan`` over the steps is the fast choice there. Both loops take the same steps.
"""

from __future__ import annotations

import jax

from udd_jax import _validation

LOOPS = ("auto", "host", "scan")


def resolve_loop(loop: str, name: str = "loop") -> str:
  """``"host"`` or ``"scan"``: ``loop`` itself, or for ``"auto"`` the fast one on the default backend.

  Args:
    loop: ``"auto"`` (``"host"`` when ``jax.default_backend()`` is the CPU, ``"scan"``
      otherwise), ``"host"`` or ``"scan"``.
    name: the option's name in the error message.

  Returns:
    ``"host"`` or ``"scan"``.

  Raises:
    ValueError: ``loop`` is not one of :data:`LOOPS` (the message names the option and the
      choices).

  Examples:
    >>> resolve_loop("scan")
    'scan'
    >>> resolve_loop("auto") == ("host" if jax.default_backend() == "cpu" else "scan")
    True
  """
  loop = _validation.check_choice(loop, name, LOOPS)
  if loop == "auto":
    return "host" if jax.default_backend() == "cpu" else "scan"
  return loop
