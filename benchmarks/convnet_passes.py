"""Where DC's image update loses its FLOP rate: the ConvNet's forward and backward passes on XLA:CPU.

Issue 18, item 2. DC's step (``benchmarks/matching_step.py``, docs/BENCHMARKS.md (q)) runs at
29 GFLOP/s against DM's 82, and almost all its FLOPs are the real batches' parameter
gradients. This script times, jitted, the three passes of the library's ConvNet (depth 3,
instance norm, ReLU, average pooling) on random MNIST-shaped batches: the forward pass, the
gradient of the cross-entropy in the inputs (forward + the backward-data pass) and in the
parameters (forward + backward-data + backward-filter), with XLA's FLOP count of each
(``cost_analysis``). ``--batches``: 256 is one DC class batch, 2560 all ten at once.
``--norms`` times the passes twice, with the library's instance norm (flax ``InstanceNorm``)
and with the ``GroupNorm(group_size=1)`` it replaced (same values, same parameters). Then,
at the first batch size, each block's operations alone: the convolution's forward,
backward-data and backward-filter passes, both norms' forward and backward passes, and
ReLU + pooling's.

  python benchmarks/convnet_passes.py                   # ~2 min on 2 idle cores
  python benchmarks/convnet_passes.py --batches 256 --norms --out benchmarks/results/convnet_norms.json
"""

from __future__ import annotations

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp

import _common
from udd_jax.supervised import networks
from udd_jax.supervised.networks import cross_entropy

N_CLASSES = 10
EPSILON = 1e-5
NORMS = {"InstanceNorm": lambda: nn.InstanceNorm(epsilon=EPSILON),
         "GroupNorm(group_size=1)": lambda: nn.GroupNorm(num_groups=None, group_size=1, epsilon=EPSILON)}


class _ConvNetWithNorm(networks.ConvNet):
  """The library's ConvNet with another instance-norm module (same parameter tree)."""

  norm: str = "InstanceNorm"

  def setup(self):
    self.convs = [nn.Conv(self.width, (3, 3), padding=1) for _ in range(self.depth)]
    self.norms = [NORMS[self.norm]() for _ in range(self.depth)]
    self.classifier = nn.Dense(self.n_classes)


def _timed(fn, *args, repeats):
  """Median seconds of the jitted ``fn`` and XLA's FLOP count of it."""
  compiled = jax.jit(fn).lower(*args).compile()
  flops = _common.xla_flops(compiled)
  _, _, seconds = _common.first_and_median(compiled, *args, repeats=repeats)
  return seconds, flops


def _block_ops(batch: int, width: int, repeats: int) -> list[dict]:
  """Each ConvNet block's operations timed alone, at that block's shapes (grey 28x28 inputs)."""
  rows = []
  size, channels = 28 + 2 * (networks.GREY_PADDING - 1), 1
  for block in range(3):
    x = jax.random.normal(jax.random.key(0), (batch, size, size, channels))
    y = jax.random.normal(jax.random.key(1), (batch, size, size, width))
    pooled = jax.random.normal(jax.random.key(2), (batch, size // 2, size // 2, width))
    conv = nn.Conv(width, (3, 3), padding=1)
    conv_params = conv.init(jax.random.key(3), x)
    ops = {"conv forward": (lambda x: conv.apply(conv_params, x), x),
           "conv backward-data": (lambda x, g: jax.vjp(lambda x: conv.apply(conv_params, x), x)[1](g)[0], x, y),
           "conv backward-filter": (lambda p, g: jax.vjp(lambda p: conv.apply(p, x), p)[1](g)[0], conv_params, y)}
    for name, make in NORMS.items():
      module = make()
      norm_params = module.init(jax.random.key(4), y)
      ops[f"{name} forward"] = (lambda z, m=module, p=norm_params: m.apply(p, z), y)
      ops[f"{name} backward"] = (lambda z, g, m=module, p=norm_params: jax.vjp(lambda z: m.apply(p, z), z)[1](g)[0], y, y)

    def relu_pool(z):
      return nn.avg_pool(nn.relu(z), (2, 2), strides=(2, 2))

    ops["ReLU + pool forward"] = (relu_pool, y)
    ops["ReLU + pool backward"] = (lambda z, g: jax.vjp(relu_pool, z)[1](g)[0], y, pooled)
    for name, (fn, *args) in ops.items():
      seconds, flops = _timed(fn, *args, repeats=repeats)
      rows.append(dict(block=block, input=[batch, size, size, channels], op=name, seconds=seconds, flops=flops))
      print(rows[-1], flush=True)
    size, channels = size // 2, width
  return rows


def main():
  parser = _common.argument_parser(__doc__)
  parser.add_argument("--width", type=int, default=32)
  parser.add_argument("--batches", default="256,2560")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--norms", action="store_true", help="Also the GroupNorm network, and each block's operations.")
  parser.add_argument("--out", default=str(_common.RESULTS / "convnet_passes.json"))
  args = parser.parse_args()
  meta = _common.machine()
  print(_common.header(meta), flush=True)
  norms = list(NORMS) if args.norms else ["InstanceNorm"]
  rows = []
  for batch, norm in [(int(b), norm) for b in args.batches.split(",") for norm in norms]:
    network = _ConvNetWithNorm(n_classes=N_CLASSES, width=args.width, norm=norm)
    params = networks.init_params(network, jax.random.key(2), (28, 28, 1))
    x = jax.random.normal(jax.random.key(0), (batch, 28, 28, 1))
    labels = jnp.arange(batch) % N_CLASSES

    def loss(p, inputs, labels=labels):
      return cross_entropy(network, p, inputs, labels)

    passes = {"forward": lambda p, inputs: network.apply({"params": p}, inputs),
              "gradient in the inputs": jax.grad(loss, argnums=1),
              "gradient in the parameters": jax.grad(loss)}
    for name, fn in passes.items():
      seconds, flops = _timed(fn, params, x, repeats=args.repeats)
      rows.append(dict(width=args.width, batch=batch, norm=norm, pass_=name, seconds=seconds, flops=flops,
                       gflops_per_s=flops / seconds / 1e9))
      print(rows[-1], flush=True)
      _common.write_json(pathlib.Path(args.out), meta, rows, config=vars(args))
  table = _common.markdown_table(
      ["batch", "norm", "pass", "seconds", "GFLOP (XLA)", "GFLOP/s"],
      [[r["batch"], r["norm"], r["pass_"], f"{r['seconds']:.3f}", f"{r['flops'] / 1e9:.1f}", f"{r['gflops_per_s']:.1f}"]
       for r in rows])
  print(table)
  extra = {}
  if args.norms:
    ops = _block_ops(int(args.batches.split(",")[0]), args.width, args.repeats)
    extra = dict(block_ops=ops, block_table=_common.markdown_table(
        ["block", "input", "operation", "ms", "GFLOP/s"],
        [[o["block"], "x".join(map(str, o["input"])), o["op"], f"{o['seconds'] * 1e3:.1f}",
          f"{o['flops'] / o['seconds'] / 1e9:.1f}"] for o in ops]))
    print(extra["block_table"])
  _common.write_json(pathlib.Path(args.out), meta, rows, config=vars(args), table=table, **extra)


if __name__ == "__main__":
  main()
