"""Exploration runs of docs/RESULTS.md: distil, then evaluate with 3 fresh seeds.

  python experiments/explore.py NAME '{"steps": 500, "batch_size": 2048}'
  python experiments/explore.py NAME '{"dataset": "fashion_mnist", "transfer": [[256, "ae"], [128, "score_matching"]]}'

NAME is the workdir under runs/; the JSON holds options of udd_jax.distill (n_distill
defaults to 100, K is 128), plus ``dataset`` (default mnist) and ``transfer``: extra
evaluations of the same set with other learners ([K, inner loss] pairs). Prints the
evaluation tables (no baselines) and writes runs/NAME/report.md. The data directory is
$UDD_DATA_DIR or ../shared/data.
"""

import json
import os
import sys
import time

import udd_jax


def main(name: str, options: dict) -> None:
  data_dir = os.environ.get("UDD_DATA_DIR", "../shared/data")
  (x, y), (xt, yt) = udd_jax.load_dataset(options.pop("dataset", "mnist"), data_dir=data_dir)
  transfers = [(128, "ae")] + [tuple(t) for t in options.pop("transfer", [])]
  t = time.time()
  result = udd_jax.distill(x, y, n_distill=options.pop("n_distill", 100), n_hidden=128, workdir=f"runs/{name}",
                           eval_every=100, eval_data=(x, y, xt, yt), **options)
  seconds = time.time() - t
  print("distill time", seconds, flush=True)
  texts = []
  for n_hidden, inner in transfers:
    t = time.time()
    report = udd_jax.evaluate(result.images, (x, y), (xt, yt), n_hidden=n_hidden, inner=inner, recipe=result.recipe,
                              recipe_n_hidden=128, seeds=3, preprocessing=result.preprocessing, baselines=())
    texts.append(f"K = {n_hidden}, {inner} (evaluation {time.time() - t:.0f} s)\n\n{report}")
    print(texts[-1], flush=True)
  with open(f"runs/{name}/report.md", "w") as f:
    f.write("\n\n".join(texts) + f"\n\ndistill time {seconds:.0f}s\n")


if __name__ == "__main__":
  main(sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})
