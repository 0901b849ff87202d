"""How close ``head="logistic"`` gets to its optimum, by Newton steps and CG iterations, on MNIST features.

The head (udd_jax.heads.NewtonLogisticHead) is differentiated by the envelope theorem, so its
gradient is the optimal loss's only when the fit reaches the optimum. This measures, on
2048 MNIST training images, the fit's gradient norm and its objective above a 40 x 200
reference fit, for features of a tied AE (K = 128) trained on a set for 100 and for 4000
Adam steps (lr 3e-3, full batch, init 0.01), and the time of one jitted fit (float32).

  python benchmarks/logistic_head_fit.py --data_dir ../shared/data --set runs/x/distilled.npz   # ~20 s

Without ``--set`` the learner trains on the first 100 training images. Writes
benchmarks/results/logistic_head_fit.json.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import _common
import udd_jax
from udd_jax.heads import NewtonLogisticHead
from udd_jax.inner import get_inner_learner

CONFIGS = ((3, 10), (5, 20), (10, 20), (20, 50))  # (Newton steps, CG iterations); (5, 20) is the default
REFERENCE = NewtonLogisticHead(newton_steps=40, cg_steps=200)
LEARNER_STEPS = (100, 4000)


def learner_features(d, z, steps):
  """Features of ``z`` from a tied AE trained on ``d`` for each of ``steps`` Adam steps."""
  learner, opt = get_inner_learner("ae"), optax.adam(3e-3)

  @jax.jit
  def step(p, s):
    updates, s = opt.update(jax.grad(learner.loss)(p, d, jax.random.key(0)), s, p)
    return optax.apply_updates(p, updates), s

  p = learner.init(jax.random.key(1), d.shape[1], 128, init_scale=0.01)
  s, out = opt.init(p), {}
  for i in range(1, max(steps) + 1):
    p, s = step(p, s)
    if i in steps:
      out[i] = learner.features(p, z)
  return out


def main():
  parser = _common.argument_parser(__doc__)
  parser.add_argument("--set", default=None, help="a distilled set (.npz written by DistillResult.save / the app)")
  args = parser.parse_args()
  x, y, _ = _common.load_mnist(args.data_dir)
  d = x[:100] if args.set is None else jnp.asarray(np.asarray(udd_jax.load_distilled(args.set).images).reshape(-1, 784))
  idx = np.random.default_rng(0).choice(x.shape[0], 2048, replace=False)
  labels, mask = jnp.asarray(y)[idx], jnp.ones(10, bool)
  feats = learner_features(d, x[idx], LEARNER_STEPS)
  optimum = {k: float(REFERENCE.objective(REFERENCE.fit(f, labels, mask), f, labels, mask)) for k, f in feats.items()}
  meta = _common.machine()
  rows = []
  for newton_steps, cg_steps in CONFIGS:
    head = NewtonLogisticHead(newton_steps=newton_steps, cg_steps=cg_steps)
    fit = jax.jit(head.fit)
    for k, f in feats.items():
      fit(f, labels, mask).block_until_ready()
      t0 = time.perf_counter()
      beta = fit(f, labels, mask).block_until_ready()
      rows.append(dict(newton_steps=newton_steps, cg_steps=cg_steps, learner_steps=k,
                       grad_norm=float(head.gradient_norm(beta, f, labels, mask)),
                       above_optimum=float(head.objective(beta, f, labels, mask)) - optimum[k],
                       fit_ms=1e3 * (time.perf_counter() - t0)))
  print(_common.header(meta))
  print(_common.markdown_table(["Newton x CG", "learner steps", "gradient norm", "objective above the optimum", "ms per fit"],
                               [[f"{r['newton_steps']} x {r['cg_steps']}", r["learner_steps"], r["grad_norm"],
                                 r["above_optimum"], r["fit_ms"]] for r in rows]))
  json_path, _ = _common.output_paths("logistic_head_fit", quick=False)
  _common.write_json(json_path, meta, rows, set=args.set)


if __name__ == "__main__":
  jax.config.update("jax_enable_x64", False)
  main()
