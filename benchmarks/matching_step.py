"""One image update of DC and DM at MNIST size: the classes unrolled, ``lax.map``-ped or ``vmap``-ped.

Issue 18, item 2. The image update of DC (gradient matching) and DM (distribution matching)
sums a per-class loss over the 10 classes (``udd_jax.supervised.image_updates.sum_over_classes``).
This script times the jitted ``value_and_grad`` in the images of the per-class losses of
``gradient_matching.dc_loss`` and ``dm.dm_loss`` summed three ways:

* ``unroll``: ``sum_over_classes(loop="unroll")``, a Python loop unrolled under ``jit`` (DC's);
* ``map``: ``sum_over_classes(loop="map")``, ``jax.lax.map`` (DM's). XLA counts a loop body
  once, so its FLOP count (and GFLOP/s) is a tenth of the true one;
* ``vmap``: the per-class loss ``vmap``-ped over classes (what the library did before
  2026-12-07), defined here.

For each: compile time (first call), median step time, the gradient's largest difference
from the first variant's, and XLA's FLOP count of the compiled step (``cost_analysis``),
hence the achieved GFLOP/s. Inputs are random: MNIST shapes (28x28x1), ``--batch_real``
real images per class, 1 synthetic image per class, a fresh ConvNet init; DM with DSA
(main_DM.py's strategy string) as main_DM.py runs it (``--no_dm_dsa``: without). The
library's choice per method is marked in the table.

  python benchmarks/matching_step.py --widths 32                  # ~4 min on 2 idle cores
  python benchmarks/matching_step.py --widths 128 --methods dm
"""

from __future__ import annotations

import functools
import pathlib
import time

import jax
import jax.numpy as jnp

import _common
from udd_jax.supervised import augment, gradient_matching, image_updates, networks
from udd_jax.supervised.networks import cross_entropy

N_CLASSES = 10
DM_DSA = "color_crop_cutout_flip_scale_rotate"
LIBRARY = {"dc": "unroll", "dm": "map"}  # the loop each method's loss uses


def _vmapped(one_class, real, syn, aug_keys, strategy):
  """The pre-2026-12-07 ``sum_over_classes``: the per-class loss ``vmap``-ped over classes."""

  def augmented(real_c, syn_c, key, label):
    if key is not None:
      real_c, syn_c = augment.dsa(real_c, key, strategy), augment.dsa(syn_c, key, strategy)
    return one_class(real_c, syn_c, label)

  labels = jnp.arange(real.shape[0])
  if aug_keys is None:
    return jnp.sum(jax.vmap(lambda r, s, c: augmented(r, s, None, c))(real, syn, labels))
  return jnp.sum(jax.vmap(augmented)(real, syn, aug_keys, labels))


def losses(network, method, aug_keys, strategy, sum_fn):
  """``(syn, params, real) -> loss`` for ``method``, the per-class losses of ``dc_loss`` / ``dm_loss`` summed by
  ``sum_fn``."""
  if method == "dc":
    grad_fn = jax.grad(cross_entropy, argnums=1)

    def dc_fn(syn, params, real):
      def one_class(real_c, syn_c, label):
        g_real = jax.lax.stop_gradient(grad_fn(network, params, real_c, jnp.full(real_c.shape[0], label)))
        return gradient_matching.match_distance(g_real, grad_fn(network, params, syn_c, jnp.full(syn_c.shape[0], label)))
      return sum_fn(one_class, real, syn, None, strategy)
    return dc_fn
  def dm_fn(syn, params, real):
    def embed(x):
      return network.apply({"params": params}, x, method="embed")

    def one_class(real_c, syn_c, label):
      del label
      mean_real = jax.lax.stop_gradient(jnp.mean(embed(real_c), axis=0))
      return jnp.sum(jnp.square(mean_real - jnp.mean(embed(syn_c), axis=0)))
    return sum_fn(one_class, real, syn, aug_keys, strategy)
  return dm_fn


def measure(fn, args, repeats):
  step = jax.jit(jax.value_and_grad(fn))
  t0 = time.perf_counter()
  compiled = step.lower(*args).compile()
  lower_s = time.perf_counter() - t0
  out, first_s, median_s = _common.first_and_median(compiled, *args, repeats=repeats)
  return out, lower_s + first_s, median_s, _common.xla_flops(compiled)


def main():
  parser = _common.argument_parser(__doc__)
  parser.add_argument("--widths", default="32")
  parser.add_argument("--methods", default="dc,dm")
  parser.add_argument("--batch_real", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--no_dm_dsa", action="store_true", help="DM without DSA")
  parser.add_argument("--out", default=str(_common.RESULTS / "matching_step.json"))
  args = parser.parse_args()
  meta = _common.machine()
  print(_common.header(meta), flush=True)
  variants = {"unroll": functools.partial(image_updates.sum_over_classes, loop="unroll"),
              "map": functools.partial(image_updates.sum_over_classes, loop="map"), "vmap": _vmapped}
  key = jax.random.key(0)
  real = jax.random.normal(key, (N_CLASSES, args.batch_real, 28, 28, 1))
  syn = jax.random.normal(jax.random.key(1), (N_CLASSES, 1, 28, 28, 1))
  rows = []
  for width in [int(w) for w in args.widths.split(",")]:
    network = networks.get_network("convnet", N_CLASSES, width=width)
    params = networks.init_params(network, jax.random.key(2), (28, 28, 1))
    for method in args.methods.split(","):
      dsa = method == "dm" and not args.no_dm_dsa
      aug_keys = jax.random.split(jax.random.key(3), N_CLASSES) if dsa else None
      reference = None
      for name, sum_fn in variants.items():
        (loss, grad), compile_s, step_s, flops = measure(
            losses(network, method, aug_keys, DM_DSA, sum_fn), (syn, params, real), args.repeats)
        reference = grad if reference is None else reference
        rows.append(dict(width=width, method=method, dsa=dsa, classes=name, library=name == LIBRARY[method],
                         compile_s=compile_s, step_s=step_s, flops=flops, gflops_per_s=flops / step_s / 1e9, loss=float(loss),
                         grad_max_diff=float(jnp.max(jnp.abs(grad - reference)))))
        print(f"  width {width} {method}{' + DSA' if dsa else ''} {name}: compile {compile_s:.1f} s, step "
              f"{step_s:.3f} s, {flops / 1e9:.1f} GFLOP, {flops / step_s / 1e9:.1f} GFLOP/s", flush=True)
        _common.write_json(pathlib.Path(args.out), meta, rows, config=vars(args))
  table = _common.markdown_table(
      ["width", "method", "classes", "compile (s)", "step (s)", "GFLOP (XLA)", "GFLOP/s", "max |grad - unroll's|"],
      [[r["width"], r["method"] + (" + DSA" if r["dsa"] else ""), r["classes"] + (" (library)" if r["library"] else ""),
        f"{r['compile_s']:.1f}", f"{r['step_s']:.3f}", f"{r['flops'] / 1e9:.1f}", f"{r['gflops_per_s']:.1f}", f"{r['grad_max_diff']:.1e}"]
       for r in rows])
  print(table)
  _common.write_json(pathlib.Path(args.out), meta, rows, config=vars(args), table=table)


if __name__ == "__main__":
  main()
