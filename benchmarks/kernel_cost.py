"""What one KIP iteration's kernels cost: the FC, ConvNet and pooled ConvNet kernels at MNIST size.

Issue 18, item 3. ``kernels.conv_kernel(pooling="avg")`` holds each pair's covariances at
every offset within ``2^depth - 1`` pixels (225 offsets at depth 3) where the unpooled
kernel holds one; this script measures what that costs. For each kernel it times, jitted,
the forward ``K(x_target, x_support)`` and the gradient in the support images of
``sum(K(x_target, x_support)) + sum(K(x_support, x_support))`` (the two kernels a KIP step
differentiates), on random 28 x 28 x 1 images: ``--n_support`` support and ``--n_target``
target images (KIP at 1 image per class with the conv kernel's default target batch: 10
and 100). Compile time (first call) and the median of ``--repeats`` calls after it.

  python benchmarks/kernel_cost.py                      # ~4 min on 2 idle cores
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp

import _common
from udd_jax.supervised.kernels import get_kernel

KERNELS = {
    "fc (depth 1)": ("fc", dict(depth=1)),
    "conv (3 blocks, no pooling)": ("conv", dict(depth=3)),
    "conv, pooled (3 blocks)": ("conv", dict(depth=3, pooling="avg")),
    "conv, their ConvNet (1 + 3 pooled blocks)": ("conv", dict(depth=3, pooling="avg", prepend_conv=True)),
}


def main():
  parser = _common.argument_parser(__doc__)
  parser.add_argument("--n_support", type=int, default=10)
  parser.add_argument("--n_target", type=int, default=100)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=str(_common.RESULTS / "kernel_cost.json"))
  args = parser.parse_args()
  meta = _common.machine()
  print(_common.header(meta), flush=True)
  keys = jax.random.split(jax.random.key(0))
  support = jax.random.normal(keys[0], (args.n_support, 28, 28, 1))
  target = jax.random.normal(keys[1], (args.n_target, 28, 28, 1))
  rows = []
  for label, (name, options) in KERNELS.items():
    kernel = get_kernel(name, kind="ntk", w_var=2.0, b_var=1e-4, **options)
    forward = jax.jit(kernel)
    grad = jax.jit(jax.grad(lambda s, t: jnp.sum(kernel(t, s)) + jnp.sum(kernel(s, s))))  # noqa: B023
    _, f_compile, f_step = _common.first_and_median(forward, target, support, repeats=args.repeats)
    _, g_compile, g_step = _common.first_and_median(grad, support, target, repeats=args.repeats)
    rows.append(dict(kernel=label, forward_compile_s=f_compile, forward_s=f_step, grad_compile_s=g_compile, grad_s=g_step))
    print(rows[-1], flush=True)
    _common.write_json(pathlib.Path(args.out), meta, rows, config=vars(args))
  base = next(r for r in rows if r["kernel"].startswith("conv (3"))
  table = _common.markdown_table(
      ["kernel", "forward (s)", "gradient (s)", "gradient / unpooled conv", "compile, forward + gradient (s)"],
      [[r["kernel"], f"{r['forward_s']:.3g}", f"{r['grad_s']:.3g}", f"{r['grad_s'] / base['grad_s']:.3g}x",
        f"{r['forward_compile_s'] + r['grad_compile_s']:.0f}"] for r in rows])
  print(table)
  _common.write_json(pathlib.Path(args.out), meta, rows, config=vars(args), table=table)


if __name__ == "__main__":
  main()
