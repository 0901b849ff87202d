"""From checked settings to what the loop runs: the problem, the solver's state, the jitted chunk."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from udd_jax import io
from udd_jax.bilevel import problem as problem_lib
from udd_jax.bilevel.basis import make_image_basis
from udd_jax.data.clustering import kmeans
from udd_jax.data.preprocessing import Preprocessing, fit_preprocessing
from udd_jax.driver.arguments import Settings
from udd_jax.driver.result import DistillResult
from udd_jax.sharding import Layout


@dataclasses.dataclass(frozen=True)
class Run:
  """A built run: the problem on preprocessed data, the initial state and the jitted chunk of steps."""

  settings: Settings
  problem: Any
  prep: Preprocessing
  n_classes: list[int]
  config: dict[str, Any]
  state: Any
  run_chunk: Callable[[Any, jax.Array], tuple[Any, dict[str, jax.Array], dict[str, Any]]]
  layout: Layout | None = None

  def place(self, state: Any) -> Any:
    """``state`` (e.g. restored from a checkpoint on the host) on the run's devices, as the chunk expects it."""
    return state if self.layout is None else self.layout.put(state, state_shardings(self.layout, self.settings.solver, state))

  def result(self, state: Any, history: list[dict[str, float]]) -> DistillResult:
    """The distilled set of ``state``, in the input's value space, with the recipe it ships."""
    s = self.settings
    state = io.host_tree(state)
    config = dict(self.config)
    config["recipe"] = s.solver.recipe(state, s.init_scale, s.recipe).to_config()
    return DistillResult(
        images=self.prep.invert(np.asarray(state.images)),
        params=jax.tree.map(np.asarray, s.solver.learner_params(state)),
        history=history,
        config=config,
        preprocessing=self.prep,
        learner=self.problem.learner,
    )


def initial_images(init: str, key: jax.Array, z: np.ndarray, n: int) -> jnp.ndarray:
  """D at step 0: ``n`` random real inputs, ``n`` k-means centroids, or uniform noise in z's range."""
  if init == "real":
    return jnp.asarray(z[np.asarray(jax.random.choice(key, z.shape[0], (n,), replace=False))])
  if init == "kmeans":
    return kmeans(key, jnp.asarray(z[:20000]), n)
  return jax.random.uniform(key, (n, z.shape[1]), jnp.float32, z.min(), z.max())


def _config(s: Settings, n_classes: list[int], image_shape: tuple[int, ...]) -> dict[str, Any]:
  solver = s.solver
  return dict(
      solver=solver.name, inner=getattr(s.inner, "name", s.inner), n_distill=s.n_distill, n_hidden=s.n_hidden,
      steps=s.steps, seed=s.seed,
      batch_size=s.batch_size, init=s.init, preprocessing=s.preprocessing, n_classes=n_classes,
      image_shape=list(image_shape), problem_options=dict(s.problem_options), solver_options=solver.to_config(),
      given_recipe=s.recipe.to_config() if s.recipe is not None else None,
  ) | ({"clip_images": True} if s.clip_images else {}) | ({"prior": s.prior.record()} if s.prior is not None else {})


def state_shardings(layout: Layout, solver: Any, state: Any) -> Any:
  """Where each leaf of a solver's state lives: its ``member_fields`` split on their leading axis, the rest replicated."""
  shardings = jax.tree.map(lambda _: layout.replicated, state)
  return shardings._replace(**{f: jax.tree.map(lambda _: layout.split(), getattr(state, f)) for f in solver.member_fields})


def _check_layout(layout: Layout, solver: Any, batch_size: int) -> None:
  """Raises a ValueError, before anything is compiled, unless the axis the run splits fits the devices."""
  if solver.member_fields:
    layout.check_divides(solver.n_members, f"the {solver.name} solver's {solver.member_axis}")
  else:
    layout.check_divides(batch_size, "batch_size")


def _chunk_fn(s: Settings, problem: Any, layout: Layout | None, state: Any):
  """``log_every`` solver steps in one ``lax.scan``, with their mean metrics and finiteness flags.

  The chunk takes the batches' key and the real tasks as arguments (placed once, replicated on a mesh). On a
  mesh its state keeps :func:`state_shardings`, and a solver without a pool has its real
  batch split across the devices.
  """
  solver = s.solver
  split_batch = layout is not None and not solver.member_fields

  def chunk(state, start, k_batches, device_tasks):
    def body(st, i):
      batch = problem_lib.sample_batch(jax.random.fold_in(k_batches, i), device_tasks, s.batch_size)
      if split_batch:
        batch = jax.lax.with_sharding_constraint(batch, problem_lib.TaskBatch(layout.split(1), layout.split(1)))
      return solver.step(problem, st, batch)

    state, per_step = jax.lax.scan(body, state, start + jnp.arange(s.log_every))
    metrics = jax.tree.map(jnp.mean, per_step)
    # The seed's "||X - AE(X)||" column: mean reconstruction residual of D under the current w.
    residual = problem.learner.residual(solver.learner_params(state), state.images)
    if residual is not None:
      metrics["d_minus_ae_d"] = jnp.mean(jnp.linalg.norm(residual, axis=1))
    # Per step and per part of the state, so that a divergence names its first step and quantity.
    finite = dict(
        steps={k: jnp.isfinite(v) for k, v in per_step.items()},
        state=solver.finite(state),
    )
    return state, metrics, finite

  if layout is None:
    return jax.jit(chunk, donate_argnums=0)
  shardings = state_shardings(layout, solver, state)
  return jax.jit(chunk, donate_argnums=0, in_shardings=(shardings, layout.replicated, layout.replicated, layout.replicated),
                 out_shardings=(shardings, layout.replicated, layout.replicated))


def build(s: Settings, layout: Layout | None = None) -> Run:
  """Preprocesses the tasks, makes the problem, initialises D, its basis and the solver's state, jits the chunk.

  With a ``layout``, the state and the real tasks are placed on its devices (every
  process of a multi-process run builds the same values); a layout that cannot split the
  run's axis is refused first (:func:`_check_layout`), before anything is computed.
  """
  if layout is not None:
    _check_layout(layout, s.solver, s.batch_size)
  image_shape = s.tasks[0][0].shape[1:]
  prep = fit_preprocessing(s.tasks[0][0], method=s.preprocessing)
  z_tasks = [(prep.apply(xj), yj) for xj, yj in s.tasks]
  n_classes = [int(yj.max()) + 1 for _, yj in s.tasks]
  problem = problem_lib.make_problem(n_visible=prep.dim, n_hidden=s.n_hidden, n_classes=n_classes, inner=s.inner,
                                     **s.problem_options)
  if s.clip_images:
    # Projected steps that keep the distilled pixels within the values real pixels take.
    image_range = (float(min(zj.min() for zj, _ in z_tasks)), float(max(zj.max() for zj, _ in z_tasks)))
    s = dataclasses.replace(s, solver=dataclasses.replace(s.solver, image_bounds=image_range))
  k_init_images, k_state, k_batches = jax.random.split(s.key, 3)
  images0 = initial_images(s.init, k_init_images, z_tasks[0][0], s.n_distill)
  # The basis D is optimised in is data (a PCA of the real inputs, in the space the learner
  # sees): computed here, once, and kept in the solver's state, so the solver stays plain values.
  basis = make_image_basis(s.solver.image_basis, prep.dim, data=z_tasks[0][0])
  state = s.solver.init(problem, k_state, images0, basis=basis, **({} if s.prior is None else {"prior": s.prior}))
  device_tasks = tuple((jnp.asarray(zj), jnp.asarray(yj)) for zj, yj in z_tasks)
  if layout is not None:
    state = layout.put(state, state_shardings(layout, s.solver, state))
    k_batches, device_tasks = layout.put((k_batches, device_tasks))
  chunk = _chunk_fn(s, problem, layout, state)

  def run_chunk(st, start):
    return chunk(st, start if layout is None else layout.put(start), k_batches, device_tasks)

  return Run(settings=s, problem=problem, prep=prep, n_classes=n_classes, config=_config(s, n_classes, image_shape),
             state=state, run_chunk=run_chunk, layout=layout)
