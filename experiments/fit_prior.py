"""Fit a learned image prior (a GRBM, by score matching) to a dataset's training images and save it.

  python experiments/fit_prior.py --dataset=mnist --data_dir=../shared/data --out=runs/priors/mnist.npz
  python experiments/distill.py --dataset=mnist --data_dir=../shared/data --n_distill=100 --n_hidden=128 \\
      --prior=runs/priors/mnist.npz --opt prior_weight=1.0 --workdir=runs/mnist_prior_1

Prints the mean log-density of the training and test images and of uniform noise in the same
range, so that the fit can be judged before it is used (docs/METHOD.md section 2.6).
"""

import pathlib

import jax
import numpy as np
from absl import app, flags, logging

import udd_jax
from udd_jax import app_flags, experiment

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", "digits", experiment.BUILTIN_DATASETS, "Dataset whose training images the prior fits.")
flags.DEFINE_string("data_dir", None, "Directory with <dataset>.npz; defaults to $UDD_DATA_DIR.")
flags.DEFINE_string("out", None, "Where to save the prior (.npz).", required=True)
flags.DEFINE_integer("n_hidden", 256, "Hidden units of the GRBM prior.")
flags.DEFINE_float("sigma2", 0.1, "Visible variance of the GRBM prior.")
flags.DEFINE_integer("steps", 3000, "Adam steps of score matching.")
flags.DEFINE_integer("batch_size", 512, "Images per step.")
flags.DEFINE_float("lr", 1e-3, "Adam's step size.")
flags.DEFINE_integer("seed", 0, "Seed of the init and the batches.")


@app_flags.one_line_errors
def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # keep JAX's backend probing out of the output
  (x, _), (xt, _) = udd_jax.load_dataset(FLAGS.dataset, data_dir=FLAGS.data_dir)
  x = np.asarray(x, np.float32).reshape(len(x), -1)
  xt = np.asarray(xt, np.float32).reshape(len(xt), -1)
  prior = udd_jax.fit_prior(x, n_hidden=FLAGS.n_hidden, sigma2=FLAGS.sigma2, steps=FLAGS.steps,
                            batch_size=FLAGS.batch_size, lr=FLAGS.lr, seed=FLAGS.seed)
  noise = np.asarray(jax.random.uniform(jax.random.key(0), xt.shape, minval=x.min(), maxval=x.max()))
  for name, images in (("train", x[:10000]), ("test", xt), ("uniform noise", noise)):
    log_p = np.asarray(prior.log_density(images))
    print(f"{name}: mean log p {log_p.mean():.1f}, quartiles {np.percentile(log_p, 25):.1f} / "
          f"{np.median(log_p):.1f} / {np.percentile(log_p, 75):.1f}")
  path = prior.save(pathlib.Path(FLAGS.out))
  print(f"saved {path} ({prior.record()['sha256'][:12]})")


if __name__ == "__main__":
  app.run(main)
