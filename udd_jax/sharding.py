"""Placing a run on several devices: a one-axis mesh, and which arrays are split across it.

JAX's own engine does the work (``jax.jit`` over ``NamedSharding``-placed arrays; XLA's
partitioner inserts the collectives). The library splits exactly one axis of independent
work over the mesh's single axis, ``"devices"``, and replicates everything else
(docs/SCALING.md):

* ``distill`` with the pool solver: the pool's learners (the solver's ``member_fields``,
  leading axis ``pool_size``); D, its optimiser state and the real data are replicated.
* ``distill`` with every other solver: the real batch of every task (axis ``batch_size``).
* ``evaluate``: the fresh seeds of every row (axis ``n_seeds``).

The split axis must be a multiple of the device count. One device, or ``devices=None``
(the default), places nothing and runs the single-device code unchanged.

On several processes (``jax.distributed``, see :func:`initialize_distributed`) the mesh
spans every process's devices; each process builds the same host values and
:meth:`Layout.put` makes them global arrays.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["AXIS", "ENV", "Layout", "make_layout", "initialize_distributed", "is_primary"]

AXIS = "devices"


@dataclasses.dataclass(frozen=True)
class Layout:
  """A one-axis mesh and the two placements the library uses on it.

  Attributes:
    mesh: a :class:`jax.sharding.Mesh` with the single axis :data:`AXIS`.
  """

  mesh: Mesh

  @property
  def size(self) -> int:
    """The number of devices."""
    return int(self.mesh.size)

  @property
  def replicated(self) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(self.mesh, PartitionSpec())

  def split(self, axis: int = 0) -> NamedSharding:
    """Axis ``axis`` of the array is split in equal parts across the devices."""
    return NamedSharding(self.mesh, PartitionSpec(*([None] * axis), AXIS))

  def check_divides(self, length: int, what: str) -> None:
    """Raises a ValueError naming ``what`` unless ``length`` is a multiple of the device count."""
    if length % self.size:
      raise ValueError(f"{what} ({length}) must be a multiple of the number of devices ({self.size}): it is the axis "
                       "split across them (docs/SCALING.md).")

  def put(self, tree: Any, shardings: Any = None) -> Any:
    """``tree`` placed on the mesh (replicated unless ``shardings``, a matching tree, says otherwise).

    Typed PRNG keys travel as their key data. Every process must pass the same values.
    """
    if shardings is None:
      shardings = jax.tree.map(lambda _: self.replicated, tree)

    def one(leaf, sharding):
      if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(jax.device_put(jax.random.key_data(leaf), sharding),
                                        impl=jax.random.key_impl(leaf))
      return jax.device_put(leaf, sharding)

    return jax.tree.map(one, tree, shardings)

  def leading_split(self, tree: Any, length: int) -> Any:
    """Shardings for ``tree``: leaves whose leading axis has ``length`` are split on it, the rest replicated."""
    return jax.tree.map(lambda a: self.split() if np.ndim(a) and np.shape(a)[0] == length else self.replicated, tree)


def make_layout(devices: Any = None) -> Layout | None:
  """The layout of ``devices``: None (one device: no placement), a device count, a list of devices or a Mesh.

  Raises:
    ValueError: a count above the devices JAX sees (with the flag that simulates more on a
      CPU), an empty list, or a mesh with more than one axis.
    TypeError: anything else.

  Examples:
    >>> make_layout(None) is None
    True
    >>> make_layout(1).size
    1
  """
  if devices is None:
    return None
  if isinstance(devices, Mesh):
    if len(devices.axis_names) != 1:
      raise ValueError(f"the mesh must have one axis; got axes {devices.axis_names} (docs/SCALING.md).")
    return Layout(Mesh(devices.devices, (AXIS,)))
  if isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
    available = jax.devices()
    if not 1 <= devices <= len(available):
      raise ValueError(
          f"devices={devices}, but JAX sees {len(available)} device(s) ({jax.default_backend()}). On a CPU, "
          "XLA_FLAGS=--xla_force_host_platform_device_count=N (set before JAX starts) simulates N devices.")
    return Layout(Mesh(np.array(available[:devices]), (AXIS,)))
  if isinstance(devices, Sequence) and not isinstance(devices, str):
    if not devices or not all(isinstance(d, jax.Device) for d in devices):
      raise ValueError("devices must be a non-empty list of jax devices (e.g. jax.devices()[:4]).")
    return Layout(Mesh(np.array(list(devices)), (AXIS,)))
  raise TypeError(f"devices must be None, a device count, a list of jax devices or a jax.sharding.Mesh; "
                  f"got {type(devices).__name__}.")


def is_primary() -> bool:
  """Whether this process writes files: process 0 of a multi-process run, or the only process."""
  return jax.process_index() == 0


# The environment variables :func:`initialize_distributed` reads when no flag is given.
ENV = {"coordinator_address": "UDD_COORDINATOR_ADDRESS", "num_processes": "UDD_NUM_PROCESSES",
       "process_id": "UDD_PROCESS_ID"}


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Starts ``jax.distributed`` from the arguments or the ``UDD_*`` environment; False when neither asks for it.

  Every process calls it before any other JAX call, with the same coordinator address
  (``host:port`` of process 0) and process count and its own id. On CPUs the processes'
  collectives go through gloo. On managed clusters (SLURM, TPU pods, ...) where JAX
  finds these itself, pass nothing and set ``UDD_NUM_PROCESSES=auto``.

  Raises:
    ValueError: some of the three settings given and not the others, or a process id
      outside ``[0, num_processes)``.
  """
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
  given = {k: (v if v is not None else os.environ.get(ENV[k]) or None) for k, v in given.items()}
  if given["num_processes"] == "auto":
    jax.distributed.initialize()
    return True
  if all(v is None for v in given.values()):
    return False
  missing = [k for k, v in given.items() if v is None]
  if missing:
    raise ValueError(f"a multi-process run needs coordinator_address, num_processes and process_id; missing "
                     f"{', '.join(missing)} (flags --{' --'.join(missing)} or ${', $'.join(ENV[k] for k in missing)}).")
  n, i = int(given["num_processes"]), int(given["process_id"])
  if not 0 <= i < n:
    raise ValueError(f"process_id ({i}) must lie in [0, num_processes) = [0, {n}).")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # used only by CPU devices
  jax.distributed.initialize(given["coordinator_address"], num_processes=n, process_id=i)
  return True
