"""Exploration runs of docs/RESULTS.md: MNIST, K = 128, distil then evaluate with 3 fresh seeds.

  python experiments/explore.py NAME '{"steps": 500, "batch_size": 2048}'

NAME is the workdir under runs/; the JSON holds options of udd_jax.distill (n_distill
defaults to 100). Prints the honest-accuracy table (no baselines) and writes
runs/NAME/report.md. The data directory is $UDD_DATA_DIR or ../shared/data.
"""

import json
import os
import sys
import time

import udd_jax


def main(name: str, options: dict) -> None:
  data_dir = os.environ.get("UDD_DATA_DIR", "../shared/data")
  (x, y), (xt, yt) = udd_jax.load_dataset("mnist", data_dir=data_dir)
  t = time.time()
  result = udd_jax.distill(x, y, n_distill=options.pop("n_distill", 100), n_hidden=128, workdir=f"runs/{name}",
                           eval_every=100, eval_data=(x, y, xt, yt), **options)
  seconds = time.time() - t
  print("distill time", seconds, flush=True)
  report = udd_jax.evaluate(result.images, (x, y), (xt, yt), n_hidden=128, recipe=result.recipe, seeds=3,
                            preprocessing=result.preprocessing, baselines=())
  print(report, flush=True)
  with open(f"runs/{name}/report.md", "w") as f:
    f.write(f"{report}\n\ndistill time {seconds:.0f}s\n")


if __name__ == "__main__":
  main(sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})
