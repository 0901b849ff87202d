"""Generative Teaching Networks (GTN; Such et al., 2020), smallest setting.

A generator maps (noise, class label) to images. Its inputs are a learned curriculum:
one noise vector per synthetic image, ``ipc`` per class. Each outer iteration trains
fresh learners for ``inner_steps`` unrolled SGD steps on the generated images
(:func:`udd_jax.training.unroll`); their cross-entropy on a real batch is the
meta-loss, and Adam updates the generator, the curriculum and the learners' step size
through the unrolled training. The distilled set is the generator's output for the
learned curriculum.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Unpack

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike
from jaxtyping import Array, Float, Int, PRNGKeyArray

from udd_jax import _validation
from udd_jax.supervised import base
from udd_jax.supervised.networks import cross_entropy, init_params, set_loss
from udd_jax.supervised.result import SupervisedResult
from udd_jax.training import unroll

DEFAULTS = dict(iterations=300)


class Generator(nn.Module):
  """An MLP generator ``(z, label) -> image``, weight-normalised as in GTN (which found
  weight normalisation necessary for stable meta-training).

  Attributes:
    n_classes: number of classes (the label enters one-hot).
    image_shape: ``(H, W, C)`` of the images generated.
    hidden: hidden units.
  """

  n_classes: int
  image_shape: tuple[int, ...]
  hidden: int = 128

  @nn.compact
  def __call__(self, z: Float[Array, "n d"], labels: Int[Array, " n"]) -> Float[Array, "n H W C"]:
    h = jnp.concatenate([z, jax.nn.one_hot(labels, self.n_classes, dtype=z.dtype)], axis=-1)
    h = nn.leaky_relu(nn.WeightNorm(nn.Dense(self.hidden))(h), 0.1)
    h = nn.WeightNorm(nn.Dense(math.prod(self.image_shape)))(h)
    return h.reshape((-1, *self.image_shape))


class _GTNState(NamedTuple):
  teacher: dict  # {"generator": params, "curriculum": (n, noise_dim), "log_inner_lr": ()}
  opt_state: optax.OptState


def _make_gtn_step(generator, learner, optimizer, syn_labels, *, inner_steps, n_inits, batch_real, image_shape):
  def meta_loss(teacher, init_keys, x_real, y_real):
    images = generator.apply({"params": teacher["generator"]}, teacher["curriculum"], syn_labels)
    step_sizes = jnp.full((inner_steps,), jnp.exp(teacher["log_inner_lr"]))

    def one_learner(key):
      params = unroll(set_loss(learner), init_params(learner, key, image_shape), (images, syn_labels), step_sizes)
      return cross_entropy(learner, params, x_real, y_real)

    return jax.vmap(one_learner)(init_keys).mean()

  @jax.jit
  def gtn_step(state, key, x, y):
    teacher, opt_state, loss = base.meta_step(meta_loss, state.teacher, state.opt_state, optimizer, key, x, y,
                                              n_inits=n_inits, batch_real=batch_real)
    return _GTNState(teacher, opt_state), {"loss": loss, "inner_lr": jnp.exp(state.teacher["log_inner_lr"])}

  return gtn_step


def _initial_teacher(generator, syn_labels, k_gen, k_z, noise_dim, init_inner_lr, dtype) -> dict:
  """The generator's init, the curriculum (one N(0, 1) noise vector per image) and the log step size."""
  curriculum = jax.random.normal(k_z, (syn_labels.shape[0], noise_dim), dtype=dtype)
  return {
      "generator": generator.init(k_gen, curriculum, syn_labels)["params"],
      "curriculum": curriculum,
      "log_inner_lr": jnp.asarray(math.log(init_inner_lr), dtype=dtype),
  }


@_validation.renamed(key="seed", lr_generator="generator_lr", lr_curriculum="curriculum_lr",
                     lr_inner_lr="inner_lr_lr")
def distill_gtn(
    x: Float[ArrayLike, "n H W C"], y: Int[ArrayLike, " n"], *, ipc: int, seed: PRNGKeyArray | int,
    learner: str = "mlp", inner_steps: int = 10, n_inits: int = 1, noise_dim: int = 32, hidden: int = 128,
    generator_lr: float = 1e-3, curriculum_lr: float = 1e-3, inner_lr_lr: float = 1e-2, init_inner_lr: float = 0.02,
    batch_real: int = 256, **common: Unpack[base.CommonOptions],
) -> SupervisedResult:
  """Generative Teaching Network: a generator and its input curriculum meta-learned to teach.

  The curriculum holds one noise vector (N(0, 1) at the start) per synthetic image,
  ``ipc`` per class, class-major. Each iteration generates the images, trains
  ``n_inits`` fresh learners (vmapped) by ``inner_steps`` full-batch SGD steps on them
  with the learned step size, and takes their mean cross-entropy on a real batch as the
  meta-loss; Adam updates the generator, the curriculum and the log step size
  (``inner_lr_lr = 0`` keeps the step size fixed).

  Args:
    x: real images ``(n, H, W)`` or ``(n, H, W, C)``, in the networks' input space.
    y: integer labels ``(n,)``.
    ipc: images per class of the distilled set (curriculum entries per class).
    seed: int seed or PRNG key of the run.
    learner: the learners' network: ``"mlp"`` (the smallest setting, cheap on a CPU),
      ``"lenet"`` or ``"convnet"``.
    inner_steps: unrolled SGD steps per learner.
    n_inits: fresh learners per iteration.
    noise_dim: dimension of each curriculum noise vector.
    hidden: the generator's hidden units.
    generator_lr: Adam step size on the generator's parameters.
    curriculum_lr: Adam step size on the curriculum.
    inner_lr_lr: Adam step size on the learners' log step size.
    init_inner_lr: the learners' initial step size.
    batch_real: real images per iteration (at most ``n``).
    **common: the options of :func:`udd_jax.supervised.base.setup` but ``network``
      (``width`` and ``depth`` of the learner, ``iterations``, ``n_classes``,
      ``max_seconds``, ``callback``, ``checkpoint``); GTN's default: ``iterations=300``.

  Returns:
    A :class:`SupervisedResult`: the generated images and their labels, the learned
    step size in ``step_sizes`` (shape ``(1,)``; ``config["inner_steps"]`` steps), the
    meta-loss per iteration in ``history``.
  """
  s = base.setup(x, y, ipc=ipc, seed=seed, network=learner, **(DEFAULTS | common))
  inner_steps, n_inits, noise_dim, hidden = (_validation.check_positive_int(v, name) for v, name in (
      (inner_steps, "inner_steps"), (n_inits, "n_inits"), (noise_dim, "noise_dim"), (hidden, "hidden")))
  generator_lr, curriculum_lr, inner_lr_lr = (_validation.check_positive_float(v, name, allow_zero=True) for v, name in (
      (generator_lr, "generator_lr"), (curriculum_lr, "curriculum_lr"), (inner_lr_lr, "inner_lr_lr")))
  init_inner_lr = _validation.check_positive_float(init_inner_lr, "init_inner_lr")
  batch_real = min(_validation.check_positive_int(batch_real, "batch_real"), s.data.images.shape[0])

  syn_labels = jnp.asarray(s.labels())
  generator = Generator(s.data.n_classes, s.image_shape, hidden)
  key, k_gen, k_z = jax.random.split(s.key, 3)
  teacher = _initial_teacher(generator, syn_labels, k_gen, k_z, noise_dim, init_inner_lr, s.dtype)
  optimizer = optax.partition(
      {"generator": optax.adam(generator_lr), "curriculum": optax.adam(curriculum_lr), "log_inner_lr": optax.adam(inner_lr_lr)},
      {"generator": jax.tree.map(lambda _: "generator", teacher["generator"]), "curriculum": "curriculum",
       "log_inner_lr": "log_inner_lr"})
  gtn_step = _make_gtn_step(
      generator, s.network, optimizer, syn_labels, inner_steps=inner_steps, n_inits=n_inits,
      batch_real=batch_real, image_shape=s.image_shape,
  )
  state, log = s.run(lambda st, k: gtn_step(st, k, s.data.images, s.data.labels), _GTNState(teacher, optimizer.init(teacher)), key)
  images = generator.apply({"params": state.teacher["generator"]}, state.teacher["curriculum"], syn_labels)
  config = s.config(
      "gtn", log, inner_steps=inner_steps, n_inits=n_inits, noise_dim=noise_dim, hidden=hidden, generator_lr=generator_lr,
      curriculum_lr=curriculum_lr, inner_lr_lr=inner_lr_lr, init_inner_lr=init_inner_lr, batch_real=batch_real,
      preprocessing="none",
  )
  return SupervisedResult(
      images=np.asarray(images, dtype=np.float32),
      labels=np.asarray(syn_labels),
      config=config,
      history=log.history,
      step_sizes=np.asarray(jnp.exp(state.teacher["log_inner_lr"]), dtype=np.float32).reshape(1),
  )
