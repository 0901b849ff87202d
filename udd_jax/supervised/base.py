"""What every supervised distillation method shares: keys, the common options, the outer loop.

A ``distill_*`` function takes the real data, ``ipc`` and ``seed`` (an int or a PRNG key) and its own options; the
options every method shares (the network, the budget, the callback) go through
:func:`setup`, which checks them once into a :class:`Setup`. :func:`run_outer_loop` is the
one outer-loop driver: it runs a method's jitted step for the budget, logs, and stops on a
non-finite loss, returning the last state whose loss was finite (one behaviour for every
method). Given a :class:`Checkpoint`, it saves its progress every few minutes (and when
interrupted), and a later call with the same checkpoint resumes where it stopped.

Examples:
  >>> import numpy as np
  >>> s = setup(np.zeros((4, 3, 3)), np.array([0, 1, 0, 1]), ipc=1, seed=0, network="mlp", iterations=3)
  >>> s.data.n_classes, s.budget.iterations, s.seed, s.network_record
  (2, 3, 0, {'network': 'mlp', 'width': 128, 'depth': 3})
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple, TypedDict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, PRNGKeyArray

from udd_jax import _validation, io
from udd_jax.driver.loop import StopOnSignal
from udd_jax.supervised import networks as networks_lib
from udd_jax.supervised.labelled import LabelledData, prepare_data, synthetic_labels

Callback = Callable[[int, dict[str, float]], None]
Step = Callable[[Any, PRNGKeyArray], tuple[Any, dict[str, Array]]]

INITS = ("real", "random")
"""How a method may start its set: ``"real"``, random real images of each class, or ``"random"``,
random images (N(0, 1) noise here, the space of standardised inputs; KIP's noise has the data's
per-pixel mean and std). The unsupervised half's ``init="random"`` is random images too, drawn
uniformly in the data's range."""


def check_init(init: Any) -> str:
  """``init`` if it is one of :data:`INITS`; the former ``"noise"`` is refused with its new name."""
  if init == "noise":
    raise ValueError("init='noise' is now called init='random' (random images, as in udd_jax.distill).")
  return _validation.check_choice(init, "init", INITS)


def as_key(key: Any, name: str = "seed") -> tuple[PRNGKeyArray, Any]:
  """A typed PRNG key from an int seed or a key, and its JSON record (``_validation.as_key``)."""
  try:
    return _validation.as_key(key, name)
  except TypeError:
    got = type(key).__name__
    raise TypeError(f"{name} must be a PRNG key (jax.random.key(seed)) or an integer seed; got {got}.") from None


def as_keys(keys: Any, name: str = "keys") -> PRNGKeyArray:
  """Typed PRNG keys of any shape from typed keys, raw ``uint32`` key data ``(..., 2)`` or an int seed."""
  if isinstance(keys, jax.Array) and jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
    return keys
  if isinstance(keys, (jax.Array, np.ndarray)) and keys.dtype == np.uint32 and keys.shape[-1:] == (2,):
    return jax.random.wrap_key_data(jnp.asarray(keys))
  return as_key(keys, name)[0]


def derived_key(seed: Any, offset: int) -> PRNGKeyArray | int:
  """A stream of its own for another use of a run's seed: ``seed + offset`` for an int seed
  (so that int seeds give the numbers they always gave), ``fold_in(key, offset)`` for a key."""
  key, record = as_key(seed, "seed")
  return record + offset if isinstance(record, int) else jax.random.fold_in(key, offset)


def key_data(key: PRNGKeyArray) -> list[int]:
  """A key's raw data as a flat list (KIP records its key so, whatever it was given)."""
  return np.asarray(jax.random.key_data(key)).ravel().tolist()


def meta_step(
    loss_fn: Callable[..., Array], params: Any, opt_state: optax.OptState, optimizer: optax.GradientTransformation,
    key: PRNGKeyArray, x: Array, y: Array, *, n_inits: int, batch_real: int,
) -> tuple[Any, optax.OptState, Array]:
  """DD's and GTN's outer step: ``n_inits`` fresh init keys, a real batch, one optimiser step.

  ``loss_fn(params, init_keys, x_batch, y_batch)`` is the meta-loss (the cross-entropy on the
  real batch of networks trained from those inits); returns the updated ``params``, the
  optimiser state and the loss before the update.
  """
  k_init, k_real = jax.random.split(key)
  idx = jax.random.choice(k_real, x.shape[0], (batch_real,), replace=False)
  loss, grads = jax.value_and_grad(loss_fn)(params, jax.random.split(k_init, n_inits), x[idx], y[idx])
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


class Checkpoint(NamedTuple):
  """Where :func:`run_outer_loop` saves its progress, how often, and what identifies the run.

  The file holds the method's state, the run's PRNG key, the iterations done, the seconds
  spent and the history. A call whose checkpoint file exists resumes from it: the state's
  structure and shapes and ``tag`` must match (a ``ValueError`` says what differs); the
  method's other options are not checked, so one checkpoint file belongs to one run. The
  same steps follow as in an uninterrupted run (the key is saved with the state), so on the
  same machine the result is the same.

  Attributes:
    path: the ``.npz`` file.
    every_seconds: save after the first iteration that ends this long after the last save
      (and at the end, and when the loop is interrupted by an exception, e.g. Ctrl-C).
    tag: a string that names the run (``experiment.run`` puts its flags there).
  """

  path: pathlib.Path
  every_seconds: float = 300.0
  tag: str = ""

  @classmethod
  def check(cls, checkpoint: Any) -> Checkpoint | None:
    """None, a :class:`Checkpoint`, or a path (saved every 300 s, empty tag)."""
    if checkpoint is None:
      return None
    if isinstance(checkpoint, (str, os.PathLike)):
      checkpoint = cls(pathlib.Path(checkpoint))
    if not isinstance(checkpoint, Checkpoint):
      raise TypeError(f"checkpoint must be a path or a base.Checkpoint; got {type(checkpoint).__name__}.")
    every = _validation.check_positive_float(checkpoint.every_seconds, "checkpoint.every_seconds", allow_zero=True)
    if not isinstance(checkpoint.tag, str):
      raise TypeError(f"checkpoint.tag must be a string; got {type(checkpoint.tag).__name__}.")
    return cls(pathlib.Path(checkpoint.path), every, checkpoint.tag)


class Budget(NamedTuple):
  """How long a method runs, whom it tells and where it saves: ``iterations``, ``max_seconds``,
  ``callback``, ``checkpoint``."""

  iterations: int
  max_seconds: float | None = None
  callback: Callback | None = None
  checkpoint: Checkpoint | None = None

  @classmethod
  def check(cls, iterations: Any, max_seconds: Any = None, callback: Any = None, checkpoint: Any = None) -> Budget:
    iterations = _validation.check_positive_int(iterations, "iterations")
    if max_seconds is not None:
      max_seconds = _validation.check_positive_float(max_seconds, "max_seconds")
    if callback is not None and not callable(callback):
      raise TypeError(f"callback must be callable as callback(iteration, record); got {type(callback).__name__}.")
    return cls(iterations, max_seconds, callback, Checkpoint.check(checkpoint))


class RunLog(NamedTuple):
  """What :func:`run_outer_loop` hands back besides the final state."""

  history: list[dict[str, float]]
  iterations: int
  seconds: float
  stopped: str  # "iterations", "max_seconds" or "non_finite_loss"


def run_outer_loop(
    step: Step,
    state: Any,
    key: PRNGKeyArray,
    budget: Budget,
    *,
    log_every: int = 1,
    fold_in: bool = False,
    first: int = 1,
) -> tuple[Any, RunLog]:
  """Runs ``state, metrics = step(state, key_i)`` for the budget, logging every ``log_every`` iterations.

  ``metrics`` must hold ``"loss"``, the outer loss at the state *entering* the step. A
  non-finite logged loss condemns that state (an update before it diverged), so the loop
  stops and returns the last state seen with a finite loss rather than losing the run.
  Iteration ``i`` (0-based) logs when ``i % log_every == 0``, at the last iteration and when
  the time is up; the record's ``iteration`` is ``i + first``. With ``budget.checkpoint``
  the loop resumes from its file when there is one, and saves to it (:class:`Checkpoint`);
  ``max_seconds`` and the records' ``seconds`` then count the time of the earlier calls too.
  A save during the run holds the last state whose loss was logged finite (so that a state
  that diverged is never resumed from), and with a checkpoint SIGTERM and SIGINT stop the
  run after the current iteration, save, and raise ``SystemExit(143)`` / ``KeyboardInterrupt``.

  Args:
    step: the method's step, ``(state, key) -> (state, metrics)``.
    state: the initial state (with a checkpoint to resume: any state of the same structure).
    key: the run's key: split once per iteration, or folded with ``i`` when ``fold_in``.
    budget: iterations, wall-time limit, callback and checkpoint (``callback(iteration, record)``).
    log_every: log (and check the loss) every this many iterations; in between the
      steps are dispatched without waiting for them.
    fold_in: iteration ``i`` gets ``fold_in(key, i)`` instead of the next split of ``key``.
    first: the number the first logged iteration gets (KIP counts from 0).

  Returns:
    The state and a :class:`RunLog`; ``RunLog.iterations`` counts the updates in the state.

  Raises:
    ValueError: the checkpoint file is unreadable or was written by another run.
  """
  history: list[dict[str, float]] = []
  done, spent = 0, 0.0
  checkpoint = budget.checkpoint
  if checkpoint is not None and checkpoint.path.exists():
    state, key, done, spent, history = _load_checkpoint(checkpoint, state, key)
  start = time.perf_counter() - spent
  saved_at = time.perf_counter()
  stopped = "iterations"
  # ``done_key`` follows ``state`` (the key entering iteration ``done``); ``finite_*`` are the
  # last state whose logged loss was finite, its update count and its key.
  finite_state, finite_done, finite_key, done_key, resumed = state, done, key, key, done

  def save(state, key, done):  # the records of the iterations in ``state`` (not one logged before a failed update)
    if checkpoint is not None and done > resumed:
      kept = [r for r in history if r["iteration"] < done + first]
      _save_checkpoint(checkpoint, state, key, done, time.perf_counter() - start, kept)

  stop = StopOnSignal().install() if checkpoint is not None else None
  try:
    for i in range(done, budget.iterations):
      if fold_in:
        sub = jax.random.fold_in(key, i)
      else:
        key, sub = jax.random.split(key)
      new_state, metrics = step(state, sub)
      if budget.max_seconds is not None:
        jax.block_until_ready(metrics)  # so that the clock measures the work, not its dispatch
      out_of_time = budget.max_seconds is not None and time.perf_counter() - start >= budget.max_seconds
      if i % log_every == 0 or i + 1 == budget.iterations or out_of_time:
        record = {"iteration": i + first, **{k: float(v) for k, v in metrics.items()}}
        record["seconds"] = time.perf_counter() - start
        if not math.isfinite(record["loss"]):
          stopped, state, done = "non_finite_loss", finite_state, finite_done
          break
        finite_state, finite_done, finite_key = state, done, done_key
        history.append(record)
        if budget.callback is not None:
          budget.callback(record["iteration"], record)
      state, done, done_key = new_state, i + 1, key
      if out_of_time:
        stopped = "max_seconds"
        break
      if stop is not None and stop.signum is not None:
        save(finite_state, finite_key, finite_done)
        print(f"stopped by {signal.Signals(stop.signum).name} after {finite_done} iterations; the checkpoint is "
              f"{checkpoint.path}. Call again with it (the same command) to resume.", file=sys.stderr, flush=True)
        stop.exit()
      if checkpoint is not None and time.perf_counter() - saved_at >= checkpoint.every_seconds:
        save(finite_state, finite_key, finite_done)
        saved_at = time.perf_counter()
  except BaseException:  # e.g. Ctrl-C twice, or an error in the step or the callback
    save(finite_state, finite_key, finite_done)
    raise
  finally:
    if stop is not None:
      stop.restore()
  if stopped != "non_finite_loss":
    save(state, key, done)
  return state, RunLog(history, done, time.perf_counter() - start, stopped)


def _state_signature(tree: Any) -> str:
  return json.dumps([str(jax.tree.structure(tree)), [[list(np.shape(x)), str(x.dtype)] for x in jax.tree.leaves(tree)]])


def _save_checkpoint(checkpoint: Checkpoint, state: Any, key: PRNGKeyArray, done: int, seconds: float,
                     history: list[dict[str, float]]) -> None:
  names = sorted({k for record in history for k in record})
  arrays = io.pytree_arrays((state, key), "state/")
  arrays |= {f"history/{k}": np.asarray([r.get(k, np.nan) for r in history], np.float64) for k in names}
  meta = dict(done=done, seconds=seconds, tag=checkpoint.tag, signature=_state_signature((state, key)), history=names,
              library_version=io.library_version())
  arrays["meta"] = np.asarray(json.dumps(meta))
  checkpoint.path.parent.mkdir(parents=True, exist_ok=True)
  io.atomic_savez(checkpoint.path, arrays)


def _tag_difference(saved: str, wanted: str) -> str:
  """The fields that differ when both tags are JSON objects, else both tags."""
  try:
    a, b = json.loads(saved), json.loads(wanted)
  except json.JSONDecodeError:
    a = b = None
  if not (isinstance(a, dict) and isinstance(b, dict)):
    return f"its tag is {saved!r}, this run's {wanted!r}"
  return "; ".join(f"{k} is {a.get(k)!r} there, {b.get(k)!r} here" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def _load_checkpoint(checkpoint: Checkpoint, state: Any, key: PRNGKeyArray):
  """``(state, key, done, seconds, history)`` from ``checkpoint``'s file, checked against this run."""
  path = checkpoint.path
  try:
    arrays = io.read_npz(path, "checkpoint")
    meta = json.loads(str(arrays["meta"]))
  except (ValueError, KeyError, json.JSONDecodeError) as e:
    raise ValueError(f"{path} is not a readable checkpoint of a supervised run ({e}). Delete it to start over.") from None
  if meta["tag"] != checkpoint.tag:
    raise ValueError(f"the checkpoint {path} belongs to another run: {_tag_difference(meta['tag'], checkpoint.tag)}. "
                     "Delete it, or give this run another checkpoint path.")
  if meta["signature"] != _state_signature((state, key)):
    raise ValueError(f"the checkpoint {path} belongs to another run: its state has another structure or shapes "
                     "(another method, ipc, network or image size). Delete it, or give this run another checkpoint path.")
  state, key = io.pytree_from_arrays((state, key), arrays, "state/")
  columns = {k: arrays[f"history/{k}"] for k in meta["history"]}
  history = [{k: (int(v[j]) if k == "iteration" else float(v[j])) for k, v in columns.items() if not np.isnan(v[j])}
             for j in range(len(next(iter(columns.values()), [])))]
  return state, key, int(meta["done"]), float(meta["seconds"]), history


class CommonOptions(TypedDict, total=False):
  """The keyword options every ``distill_*`` function passes on to :func:`setup` (besides ``seed``)."""

  network: str
  width: int
  depth: int
  iterations: int
  n_classes: int | None
  max_seconds: float | None
  callback: Callback | None
  checkpoint: Checkpoint | str | os.PathLike | None


@dataclasses.dataclass(frozen=True)
class Setup:
  """The checked arguments every method shares (what :func:`setup` returns).

  Attributes:
    data: the real images and labels on the device.
    ipc: synthetic images per class.
    key: the run's PRNG key; ``seed`` its JSON record.
    network: the flax network the method trains (None for methods without one).
    network_record: ``network``, ``width``, ``depth`` for the config.
    budget: iterations, wall-time limit and callback.
  """

  data: LabelledData
  ipc: int
  key: PRNGKeyArray
  seed: Any
  network: nn.Module | None
  network_record: dict[str, Any]
  budget: Budget

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(self.data.images.shape[1:])

  @property
  def dtype(self) -> Any:
    return self.data.images.dtype

  def labels(self) -> np.ndarray:
    """The class-major labels of the synthetic set."""
    return synthetic_labels(self.data.n_classes, self.ipc)

  def run(self, step: Step, state: Any, key: PRNGKeyArray, **options: Any) -> tuple[Any, RunLog]:
    """:func:`run_outer_loop` with this budget."""
    return run_outer_loop(step, state, key, self.budget, **options)

  def config(self, method: str, log: RunLog, **specific: Any) -> dict[str, Any]:
    """The result's ``config``: the shared record, the method's own options, the budget spent."""
    return {
        "method": method, "ipc": self.ipc, **self.network_record, "n_classes": self.data.n_classes,
        "image_shape": list(self.image_shape), **specific, "iterations": log.iterations,
        "max_iterations": self.budget.iterations, "max_seconds": self.budget.max_seconds, "stopped": log.stopped,
        "seconds": log.seconds, "seed": self.seed,
    }


@_validation.renamed(key="seed")
def setup(
    x: Any,
    y: Any,
    *,
    ipc: Any,
    seed: Any,
    iterations: Any,
    network: str | None = None,
    width: Any = 128,
    depth: Any = 3,
    n_classes: Any = None,
    max_seconds: Any = None,
    callback: Any = None,
    checkpoint: Any = None,
    min_per_class: int = 0,
) -> Setup:
  """Checks the arguments every method shares and puts the data on the device.

  Args:
    x: real images ``(n, H, W)`` or ``(n, H, W, C)``, preprocessed as the networks see them.
    y: integer labels ``(n,)``.
    ipc: synthetic images per class.
    seed: int seed or PRNG key of the run.
    iterations: outer iterations (the budget).
    network: ``"convnet"``, ``"mlp"`` or ``"lenet"`` (None: the method trains none).
    width: ConvNet channels / MLP hidden units.
    depth: ConvNet blocks.
    n_classes: number of classes; ``max(y) + 1`` when None.
    max_seconds: stop after this many seconds (checked between iterations).
    callback: called as ``callback(iteration, record)`` with every logged record.
    checkpoint: a :class:`Checkpoint` or a path: save progress there, and resume from it.
    min_per_class: every class must have at least this many real images.
  """
  data = prepare_data(x, y, n_classes=n_classes, min_per_class=min_per_class)
  ipc = _validation.check_positive_int(ipc, "ipc")
  key, seed = as_key(seed)
  budget = Budget.check(iterations, max_seconds, callback, checkpoint)
  net, record = None, {}
  if network is not None:
    net = networks_lib.get_network(network, data.n_classes, width=width, depth=depth)
    record = {"network": network, "width": width, "depth": depth}
  return Setup(data, ipc, key, seed, net, record, budget)
