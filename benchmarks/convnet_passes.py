"""Where DC's image update loses its FLOP rate: the ConvNet's forward and backward passes on XLA:CPU.

Issue 18, item 2. DC's step (``benchmarks/matching_step.py``, docs/BENCHMARKS.md (q)) runs at
29 GFLOP/s against DM's 82, and almost all its FLOPs are the real batches' parameter
gradients. This script times, jitted, the three passes of the library's ConvNet (depth 3,
instance norm, ReLU, average pooling) on random MNIST-shaped batches: the forward pass, the
gradient of the cross-entropy in the inputs (forward + the backward-data pass) and in the
parameters (forward + backward-data + backward-filter), with XLA's FLOP count of each
(``cost_analysis``). ``--batches``: 256 is one DC class batch, 2560 all ten at once.

  python benchmarks/convnet_passes.py                   # ~2 min on 2 idle cores
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp

import _common
from udd_jax.supervised import networks
from udd_jax.supervised.networks import cross_entropy

N_CLASSES = 10


def main():
  parser = _common.argument_parser(__doc__)
  parser.add_argument("--width", type=int, default=32)
  parser.add_argument("--batches", default="256,2560")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default=str(_common.RESULTS / "convnet_passes.json"))
  args = parser.parse_args()
  meta = _common.machine()
  print(_common.header(meta), flush=True)
  network = networks.get_network("convnet", N_CLASSES, width=args.width)
  params = networks.init_params(network, jax.random.key(2), (28, 28, 1))
  rows = []
  for batch in [int(b) for b in args.batches.split(",")]:
    x = jax.random.normal(jax.random.key(0), (batch, 28, 28, 1))
    labels = jnp.arange(batch) % N_CLASSES

    def loss(p, inputs, labels=labels):
      return cross_entropy(network, p, inputs, labels)

    passes = {"forward": lambda p, inputs: network.apply({"params": p}, inputs),
              "gradient in the inputs": jax.grad(loss, argnums=1),
              "gradient in the parameters": jax.grad(loss)}
    for name, fn in passes.items():
      compiled = jax.jit(fn).lower(params, x).compile()
      cost = compiled.cost_analysis()
      flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
      _, _, seconds = _common.first_and_median(compiled, params, x, repeats=args.repeats)
      rows.append(dict(width=args.width, batch=batch, pass_=name, seconds=seconds, flops=flops,
                       gflops_per_s=flops / seconds / 1e9))
      print(rows[-1], flush=True)
      _common.write_json(pathlib.Path(args.out), meta, rows, config=vars(args))
  table = _common.markdown_table(
      ["batch", "pass", "seconds", "GFLOP (XLA)", "GFLOP/s"],
      [[r["batch"], r["pass_"], f"{r['seconds']:.3f}", f"{r['flops'] / 1e9:.1f}", f"{r['gflops_per_s']:.1f}"] for r in rows])
  print(table)
  _common.write_json(pathlib.Path(args.out), meta, rows, config=vars(args), table=table)


if __name__ == "__main__":
  main()
