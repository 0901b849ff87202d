"""From checked settings to what the loop runs: the problem, the solver's state, the jitted chunk."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from udd_jax.bilevel import problem as problem_lib
from udd_jax.data.clustering import kmeans
from udd_jax.data.preprocessing import Preprocessing, fit_preprocessing
from udd_jax.driver.arguments import Settings
from udd_jax.driver.result import DistillResult


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

  def result(self, state: Any, history: list[dict[str, float]]) -> DistillResult:
    """The distilled set of ``state``, in the input's value space, with the recipe it ships."""
    s = self.settings
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
  ) | ({"clip_images": True} if s.clip_images else {})


def _chunk_fn(s: Settings, problem: Any, device_tasks: tuple, k_batches: jax.Array):
  """``log_every`` solver steps in one ``lax.scan``, with their mean metrics and finiteness flags."""
  solver = s.solver

  def chunk(state, start):
    def body(st, i):
      batch = problem_lib.sample_batch(jax.random.fold_in(k_batches, i), device_tasks, s.batch_size)
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

  return jax.jit(chunk, donate_argnums=0)


def build(s: Settings) -> Run:
  """Preprocesses the tasks, makes the problem, initialises D and the solver's state, jits the chunk."""
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
  state = s.solver.init(problem, k_state, images0)
  device_tasks = tuple((jnp.asarray(zj), jnp.asarray(yj)) for zj, yj in z_tasks)
  return Run(settings=s, problem=problem, prep=prep, n_classes=n_classes, config=_config(s, n_classes, image_shape),
             state=state, run_chunk=_chunk_fn(s, problem, device_tasks, k_batches))
