"""ConvNet training steps as jitted steps in a host loop against the same steps inside one ``lax.scan``.

Why ``udd_jax.supervised`` trains ConvNets with host loops (evaluation, DC's inner loop,
MTT's experts): XLA:CPU runs convolutions inside loop bodies far slower than as jitted
computations of their own (jax-ml/jax#12868). One step = forward, backward and an SGD
(momentum 0.9) update of the DC ConvNet (3 blocks, instance norm) on a batch of 28x28x1
images, float32. Prints a markdown table, writes benchmarks/results/conv_loop.json.

  python benchmarks/conv_loop.py                      # widths 32 and 128, batch 100: ~2 min on 2 idle cores
  python benchmarks/conv_loop.py --quick              # width 8, batch 16
"""

import time

import jax
import jax.numpy as jnp
import optax

import _common
from udd_jax.supervised.networks import get_network


def measure(width: int, batch: int, steps: int) -> dict:
  net = get_network("convnet", 10, width=width)
  x = jax.random.normal(jax.random.key(0), (batch, 28, 28, 1))
  y = jnp.arange(batch) % 10
  params = net.init(jax.random.key(1), x[:1])["params"]
  tx = optax.sgd(0.01, momentum=0.9)

  def step(carry, _):
    p, s = carry
    loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(net.apply({"params": p}, x), y).mean()
    updates, s = tx.update(jax.grad(loss_fn)(p), s, p)
    return (optax.apply_updates(p, updates), s), None

  one = jax.jit(lambda c: step(c, None)[0])
  scanned = jax.jit(lambda c: jax.lax.scan(step, c, None, length=steps)[0])
  carry = jax.block_until_ready(one((params, tx.init(params))))
  t0 = time.perf_counter()
  for _ in range(steps):
    carry = one(carry)
  jax.block_until_ready(carry)
  host_ms = (time.perf_counter() - t0) * 1e3 / steps
  carry = jax.block_until_ready(scanned(carry))  # compiles
  t0 = time.perf_counter()
  jax.block_until_ready(scanned(carry))
  scan_ms = (time.perf_counter() - t0) * 1e3 / steps
  return dict(width=width, batch=batch, steps=steps, host_loop_ms=host_ms, scan_ms=scan_ms, ratio=scan_ms / host_ms)


def main():
  parser = _common.argument_parser(__doc__)
  parser.add_argument("--widths", type=int, nargs="+", default=[32, 128])
  parser.add_argument("--batch", type=int, default=100)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args()
  if args.quick:
    args.widths, args.batch, args.steps = [8], 16, 3
  meta = _common.machine()
  print(_common.header(meta))
  rows = [measure(w, args.batch, args.steps) for w in args.widths]
  print(_common.markdown_table(
      ["ConvNet width", "batch", "host loop of jitted steps (ms/step)", "one lax.scan (ms/step)", "scan / host"],
      [[r["width"], r["batch"], f"{r['host_loop_ms']:.0f}", f"{r['scan_ms']:.0f}", f"{r['ratio']:.1f}x"] for r in rows]))
  json_path, _ = _common.output_paths("conv_loop", args.quick)
  _common.write_json(json_path, meta, rows)


if __name__ == "__main__":
  main()
