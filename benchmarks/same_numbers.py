"""The sets a redesign must not change, written to one .npz, and two such files compared bit for bit.

Runs every solver for 3 steps at ``distill``'s defaults on the embedded digits (|D| = 10,
K = 8, ``log_every=1``), the pool on three tasks, the implicit solver with the diversity
term and another step size on D, the pool with its implicit hypergradient, and with
``--mnist`` the library defaults on MNIST (|D| = 100, K = 128, seed 0, ~3 min on 2 cores). Saves images, learner parameters, the
metric histories (without wall time) and the shipped recipes.

Run it on the tree before a change (a worktree, with ``PYTHONPATH`` pointing at it) and on
the tree after, then compare::

  git worktree add /tmp/before <commit>
  PYTHONPATH=/tmp/before python benchmarks/same_numbers.py --out /tmp/before.npz --mnist
  python benchmarks/same_numbers.py --out /tmp/after.npz --mnist
  python benchmarks/same_numbers.py --compare /tmp/before.npz /tmp/after.npz

The comparison reads recipes written before ``Recipe.inner_steps`` became ``steps`` too.
"""

import argparse
import json
import sys

import jax
import numpy as np

SOLVERS = ("penalty", "value_function", "implicit", "unrolled", "pool")


def recipe_of(result):
  recipe = result.config.get("recipe")
  if recipe is None:  # before the recipe moved under config["recipe"]
    recipe = {k: result.config[k] for k in ("inner_optimizer", "inner_lr", "inner_steps", "init_scale",
                                               "until_converged", "max_steps") if k in result.config}
  return recipe


def record(arrays, name, result):
  arrays[f"{name}/images"] = np.asarray(result.images)
  for i, leaf in enumerate(jax.tree.leaves(result.params)):
    arrays[f"{name}/params{i}"] = np.asarray(leaf)
  history = [{k: v for k, v in h.items() if k != "wall_time"} for h in result.history]
  arrays[f"{name}/history"] = np.asarray(json.dumps(history, sort_keys=True))
  arrays[f"{name}/recipe"] = np.asarray(json.dumps(recipe_of(result), sort_keys=True))


def run(out, mnist, data_dir):
  import udd_jax

  print(f"udd_jax from {udd_jax.__file__}", file=sys.stderr)
  (x, y), _ = udd_jax.load_dataset("digits")
  small = dict(n_distill=10, n_hidden=8, steps=3, log_every=1, progress=False)
  arrays = {}
  for name in SOLVERS:
    record(arrays, name, udd_jax.distill(x, y, solver=name, seed=0, **small))
  record(arrays, "pool_three_tasks", udd_jax.distill(x, [y, y % 2], solver="pool", seed=1, head="softmax", **small))
  record(arrays, "implicit_diversity",
         udd_jax.distill(x, y, solver="implicit", seed=2, diversity=0.1, image_lr=0.05, **small))
  record(arrays, "pool_implicit", udd_jax.distill(x, y, solver="pool", seed=3, hypergradient="implicit", **small))
  if mnist:
    (xm, ym), _ = udd_jax.load_dataset("mnist", data_dir=data_dir)
    arrays["mnist_default/images"] = udd_jax.distill(xm, ym, n_distill=100, n_hidden=128, inner="ae", seed=0,
                                                     progress=False).images
  np.savez(out, **arrays)
  print(f"wrote {out} ({len(arrays)} entries)")


def same_recipe(a, b):
  a, b = json.loads(a), json.loads(b)
  for r in (a, b):
    if "inner_steps" in r:
      r["steps"] = r.pop("inner_steps")
  return a == b


def compare(before, after):
  a, b = np.load(before), np.load(after)
  differ = []
  for key in sorted(set(a) | set(b)):
    if key not in a or key not in b:
      differ.append(f"{key}: only in {'after' if key in b else 'before'}")
    elif key.endswith("/recipe"):
      if not same_recipe(str(a[key]), str(b[key])):
        differ.append(f"{key}: {a[key]} -> {b[key]}")
    elif a[key].dtype.kind in "US":
      ha, hb = json.loads(str(a[key])), json.loads(str(b[key]))
      if ha != hb:
        names = sorted({k for x, y in zip(ha, hb) for k in set(x) | set(y) if x.get(k) != y.get(k)})
        differ.append(f"{key}: the metric(s) {names} differ" if len(ha) == len(hb) else f"{key}: lengths differ")
    elif not np.array_equal(a[key], b[key]):
      differ.append(f"{key}: max difference {np.abs(a[key] - b[key]).max():.3g}")
  print("\n".join(differ) if differ else f"identical: {len(set(a))} entries, bit for bit")
  return 1 if differ else 0


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", help="where to write this tree's numbers (.npz)")
  parser.add_argument("--mnist", action="store_true", help="also MNIST at the library defaults (~3 min)")
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
  args = parser.parse_args()
  if args.compare:
    return compare(*args.compare)
  if not args.out:
    parser.error("give --out FILE (or --compare BEFORE AFTER)")
  run(args.out, args.mnist, args.data_dir)
  return 0


if __name__ == "__main__":
  sys.exit(main())
