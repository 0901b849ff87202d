"""KIP's transfer to finite networks, and its decline with budget (issue 18, item 3).

docs/RESULTS.md: KIP sets distilled with the FC NTK reach 89.2% by kernel ridge regression (KRR) on
MNIST at 1 image per class, but a finite ConvNet trained on them reaches 21.5%, and less the longer
KIP runs (32.0 -> 21.5 -> 18.3% at 30 / 90 / 270 s). This script distils KIP on MNIST at ``--ipc``
images per class for a few budgets, for the FC kernel (as in the table) and the conv kernel, with
and without learned labels, and scores every snapshot in several ways:

* ``krr_own``: KRR test accuracy with the kernel the set was distilled with (``kip.kip_accuracy``);
  ``krr_fc`` / ``krr_conv``: with the FC or the conv kernel, whichever it was distilled with or not
  (cross-kernel transfer; the conv kernel's KRR runs on the first ``--conv_krr_test`` test images);
* ``convnet``: the app's evaluation (``train.evaluate_synset``: ConvNet of ``--width`` channels with
  instance norm, SGD 0.01 / momentum 0.9 / weight decay 5e-4, 300 epochs, MSE on the logits against
  the float label vectors), exactly as ``experiments/supervised.py`` scores KIP;
* ``convnet_onehot``: the same, with the labels reset to the centred one-hot vectors of their
  arg-max (separates what the images carry from what the learned labels carry);
* ``convnet_init_images``: the same ConvNet on the *initial real images* with the learned labels
  (what the labels alone do);
* ``convnet_ce``: the same network trained by cross-entropy on the arg-max labels (how
  google-research kip/nn_training.ipynb turns learned labels into ``xent`` targets);
* ``mlp``: the app's MLP (2 x 128 hidden units), MSE on the label vectors;
* ``matched``: the finite network whose infinite-width limit is the kernel, trained with the
  KIP authors' finite-network recipe (below): for ``fc`` a 1-hidden-layer ReLU MLP of
  ``--matched_width`` units, for ``conv`` ``--conv_depth`` x [3x3 SAME conv, ReLU] at full
  resolution, flatten, dense (no norm, no pooling: ``kernels.conv_kernel``'s network), and
  with ``--conv_pooling paper`` (the kernel of their ConvNet, ``pooling="avg",
  prepend_conv=True``) their ConvNet below;
* ``paper_convnet``: the KIP authors' finite ConvNet (nn_training.ipynb ``ConvNet``,
  ``prepend_conv_layer=True``, ``use_gap=False``: conv + ReLU, then 3 x [conv, ReLU, 2x2 average
  pool], flatten, dense; no normalisation) with their recipe.

The authors' recipe (google-research/google-research kip/nn_training.ipynb, ``get_config`` and
``run_trainer``): standard parameterisation, W_std sqrt(2), b_std 0.1; loss ``0.5 * mean((f - y)^2)``
plus ``0.5 * 1e-3 * ||theta||^2``; SGD with momentum 0.9 and a cosine decay over ``train_steps``;
the learning rate is ``nt.predict.max_learning_rate`` of the empirical NTK of
``sum(logits) / sqrt(classes)`` on 50 real images (``2 * 50 * classes / lambda_max``), times
``max_lr_factor`` 1; batch 100 (here: the whole set). Width 1024 and 5000 steps there; here
``--matched_width`` / ``--paper_width`` and ``--paper_steps`` (CPU).

Also recorded per snapshot: the KIP loss, the images' per-image L2 norm and pixel range against the
real (preprocessed) images', how far they moved from their initial real images, their energy outside
the real data's top principal subspace, and the labels' range, correct-class and off-class means,
the distance from the initial 0.9 / -0.1 vectors and whether the arg-max is still the class.

Snapshots: ``distill_kip`` is deterministic in its seed and its target batches use
``fold_in(key, i)``, so a run of ``n`` iterations is the first ``n`` iterations of any longer
run with the same seed; each budget is a fresh ``distill_kip(iterations=n)`` call.

Preprocessing: ``kip_zca`` (default) is what the app does for KIP (``zca.kip_preprocessing``,
per-image layer norm + regularised ZCA, 0.1); ``standardize`` is the scalar mean / std of DC and of
KIP's own notebook for grey datasets.

Runs (each smoke under 2 minutes on the 2 shared cores; FC and conv separately):

  python benchmarks/kip_transfer.py --kernels fc --fc_iterations 2500 --learn_labels true --eval_runs 1 \\
      --paper_steps 200 --test_n 2000 --krr_test 5000 --conv_krr_test 100 --matched_width 256 \\
      --out /tmp/kip_transfer_smoke_fc300.json                                        # smoke, ~75 s
  python benchmarks/kip_transfer.py --kernels conv --conv_iterations 2 --learn_labels true --no_init_row \\
      --eval_runs 1 --eval_epochs 5 --paper_steps 5 --test_n 500 --krr_test 500 --conv_krr_test 100 \\
      --out /tmp/kip_transfer_smoke_conv2.json                                        # smoke, ~90 s
  python benchmarks/kip_transfer.py                                 # the defaults: full run, ~25-35 min

Rows go to benchmarks/results/kip_transfer.json (``--out``) as they finish; a markdown table is
printed at the end.
"""

from __future__ import annotations

import functools
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import _common
import udd_jax
from udd_jax.supervised import kip, networks, train, zca
from udd_jax.supervised.kernels import get_kernel
from udd_jax.supervised.krr import centred_one_hot

N_CLASSES = 10


# ---------------------------------------------------------------------------------------------------------------
# Finite networks of the kernels and of the KIP authors
# ---------------------------------------------------------------------------------------------------------------

_W_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "normal")  # W_std sqrt(2), standard parameterisation
_B_INIT = nn.initializers.normal(0.1)  # b_std 0.1


class FCNet(nn.Module):
  """``depth`` dense ReLU layers of ``width`` units and a dense readout: ``kernels.fc_kernel``'s network."""

  width: int = 1024
  depth: int = 1
  n_classes: int = N_CLASSES

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for _ in range(self.depth):
      x = nn.relu(nn.Dense(self.width, kernel_init=_W_INIT, bias_init=_B_INIT)(x))
    return nn.Dense(self.n_classes, kernel_init=_W_INIT, bias_init=_B_INIT)(x)


class KernelConvNet(nn.Module):
  """``depth`` x [3x3 SAME conv, ReLU] at full resolution, flatten, dense: ``kernels.conv_kernel``'s network."""

  width: int = 32
  depth: int = 3
  n_classes: int = N_CLASSES

  @nn.compact
  def __call__(self, x):
    for _ in range(self.depth):
      x = nn.relu(nn.Conv(self.width, (3, 3), padding="SAME", kernel_init=_W_INIT, bias_init=_B_INIT)(x))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(self.n_classes, kernel_init=_W_INIT, bias_init=_B_INIT)(x)


class PaperConvNet(nn.Module):
  """kip/nn_training.ipynb's ``ConvNet(depth=3, prepend_conv_layer=True, use_gap=False)``, no norm layer."""

  width: int = 32
  depth: int = 3
  n_classes: int = N_CLASSES

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, self.width, (3, 3), padding="SAME", kernel_init=_W_INIT, bias_init=_B_INIT)
    x = nn.relu(conv()(x))
    for _ in range(self.depth):
      x = nn.avg_pool(nn.relu(conv()(x)), (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(self.n_classes, kernel_init=_W_INIT, bias_init=_B_INIT)(x)


def max_learning_rate(network, params, x_probe):
  """``nt.predict.max_learning_rate`` of the empirical NTK of ``sum(logits) / sqrt(C)`` on ``x_probe``
  (as kip/nn_training.ipynb): ``2 * n * C / lambda_max``."""

  def reduced(p, x):
    out = network.apply({"params": p}, x[None])[0]
    return jnp.sum(out) / jnp.sqrt(out.shape[-1])

  jac = jax.vmap(jax.grad(reduced), in_axes=(None, 0))(params, x_probe)
  flat = jnp.concatenate([j.reshape(x_probe.shape[0], -1) for j in jax.tree.leaves(jac)], axis=1)
  lam_max = float(jnp.linalg.eigvalsh(flat @ flat.T)[-1])
  return 2.0 * x_probe.shape[0] * N_CLASSES / (lam_max + 1e-12)


@functools.partial(jax.jit, static_argnames=("network", "steps"))
def _sgd_step(params, velocity, count, images, labels, lr, *, network, steps, l2, momentum):
  """One step of jax.example_libraries.optimizers.momentum (``v = m v + g``, ``p -= lr_t v``) on the
  authors' loss, with ``lr_t`` the cosine decay of nn_training.ipynb's ``cosine_schedule``."""

  def loss_fn(p):
    out = network.apply({"params": p}, images)
    mse = 0.5 * jnp.mean(jnp.square(out - labels))
    return mse + 0.5 * l2 * sum(jnp.sum(jnp.square(w)) for w in jax.tree.leaves(p))

  loss, grads = jax.value_and_grad(loss_fn)(params)
  lr_t = lr * 0.5 * (1 + jnp.cos(count / steps * jnp.pi))
  velocity = jax.tree.map(lambda v, g: momentum * v + g, velocity, grads)
  params = jax.tree.map(lambda p, v: p - lr_t * v, params, velocity)
  return params, velocity, loss


def paper_recipe(network, images, labels, test, *, seed, runs, steps, x_probe, l2=1e-3, momentum=0.9):
  """The KIP authors' finite-network training (kip/nn_training.ipynb ``run_trainer``), full batch.

  Returns the test accuracies, the learning rates (one per run) and the final training losses.
  """
  images, labels = jnp.asarray(images), jnp.asarray(labels, images.dtype)
  accs, lrs, final_losses = [], [], []
  for r in range(runs):
    params = network.init(jax.random.key(seed * 1000 + r), images[:1])["params"]
    lr = max_learning_rate(network, params, x_probe)
    velocity = jax.tree.map(jnp.zeros_like, params)
    for i in range(steps):
      params, velocity, loss = _sgd_step(params, velocity, jnp.asarray(i, jnp.float32), images, labels,
                                         jnp.asarray(lr, jnp.float32), network=network, steps=steps, l2=l2,
                                         momentum=momentum)
    final_losses.append(float(loss))
    stacked = jax.tree.map(lambda a: a[None], params)
    accs.append(float(train.accuracy(network, stacked, *test)[0]))
    lrs.append(lr)
  return dict(accuracies=accs, mean=float(np.mean(accs)), std=float(np.std(accs)), lr=lrs, final_loss=final_losses)


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------

def load(data_dir, prep):
  (x_train, y_train), (x_test, y_test) = udd_jax.load_dataset("mnist", data_dir=data_dir)
  x_train, x_test = np.asarray(x_train, np.float32), np.asarray(x_test, np.float32)
  if prep == "kip_zca":
    kp = zca.kip_preprocessing(x_train, zca_reg=0.1)
    config = kp.config()

    def apply(x):
      return np.asarray(kp.apply(x), np.float32)[..., None]
  else:
    mean, std = float(x_train.mean()), float(x_train.std())
    config = dict(method="standardize", mean=mean, std=std)

    def apply(x):
      return ((x - mean) / std)[..., None]
  return apply(x_train), np.asarray(y_train), apply(x_test), np.asarray(y_test), config


# ---------------------------------------------------------------------------------------------------------------
# Measurements of a set
# ---------------------------------------------------------------------------------------------------------------

def image_stats(images, init_images, real_norm, basis):
  flat = images.reshape(len(images), -1).astype(np.float64)
  init = init_images.reshape(len(init_images), -1).astype(np.float64)
  norms = np.linalg.norm(flat, axis=1)
  inside = flat @ basis.T @ basis
  return dict(
      image_norm_mean=float(norms.mean()), image_norm_max=float(norms.max()),
      image_norm_over_real=float(norms.mean() / real_norm),
      pixel_min=float(flat.min()), pixel_max=float(flat.max()), pixel_std=float(flat.std()),
      moved_rel=float(np.linalg.norm(flat - init) / np.linalg.norm(init)),
      cos_to_init=float(np.mean(np.sum(flat * init, 1) / (norms * np.linalg.norm(init, axis=1)))),
      energy_outside_real_pcs=float(np.sum((flat - inside) ** 2) / np.sum(flat ** 2)),
  )


def label_stats(labels, classes):
  labels = np.asarray(labels, np.float64)
  onehot = np.asarray(centred_one_hot(jnp.asarray(classes), N_CLASSES), np.float64)
  mask = onehot > 0
  return dict(
      label_min=float(labels.min()), label_max=float(labels.max()),
      label_correct_mean=float(labels[mask].mean()), label_off_mean=float(labels[~mask].mean()),
      label_off_absmax=float(np.abs(labels[~mask]).max()),
      label_norm_over_init=float(np.linalg.norm(labels) / np.linalg.norm(onehot)),
      label_moved_rel=float(np.linalg.norm(labels - onehot) / np.linalg.norm(onehot)),
      label_argmax_is_class=float(np.mean(labels.argmax(1) == classes)),
  )


def summarize(out):
  return dict(mean=out["mean"], std=out["std"], accuracies=out["accuracies"])


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------

def ints(text):
  return [int(t) for t in text.split(",") if t]


def main():
  parser = _common.argument_parser(__doc__)
  parser.add_argument("--ipc", type=int, default=1)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--kernels", default="fc,conv")
  parser.add_argument("--learn_labels", default="true,false", help="comma list of true/false")
  parser.add_argument("--fc_iterations", type=ints, default=ints("300,2500,12000"))
  parser.add_argument("--conv_iterations", type=ints, default=ints("20,60,180"))
  parser.add_argument("--conv_depth", type=int, default=3)
  parser.add_argument("--conv_pooling", choices=("none", "paper"), default="none",
                      help="conv kernel without pooling, or the KIP authors' ConvNet kernel (an unpooled conv block, "
                           "then --conv_depth blocks with 2x2 average pooling; 'matched' is then their ConvNet)")
  parser.add_argument("--prep", choices=("kip_zca", "standardize"), default="kip_zca")
  parser.add_argument("--width", type=int, default=32, help="the app's ConvNet channels (the table's 32)")
  parser.add_argument("--eval_runs", type=int, default=2)
  parser.add_argument("--eval_epochs", type=int, default=300)
  parser.add_argument("--test_n", type=int, default=10000, help="test images for the networks")
  parser.add_argument("--krr_test", type=int, default=10000, help="test images for the FC kernel's KRR")
  parser.add_argument("--conv_krr_test", type=int, default=1000, help="test images for the conv kernel's KRR")
  parser.add_argument("--matched_width", type=int, default=1024, help="FC1 hidden units (authors: 1024)")
  parser.add_argument("--kernel_conv_width", type=int, default=32)
  parser.add_argument("--paper_width", type=int, default=32, help="authors' ConvNet channels (theirs: 1024)")
  parser.add_argument("--paper_steps", type=int, default=1000, help="authors' recipe steps (theirs: 5000)")
  parser.add_argument("--no_init_row", action="store_true", help="skip iteration 0 (the initial real images)")
  parser.add_argument("--out", default=str(_common.RESULTS / "kip_transfer.json"))
  args = parser.parse_args()

  meta = _common.machine()
  print(_common.header(meta))
  out_path = pathlib.Path(args.out)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  x_train, y_train, x_test, y_test, prep_config = load(args.data_dir, args.prep)
  test = (x_test[:args.test_n], y_test[:args.test_n])
  rng = np.random.default_rng(12345)
  x_probe = jnp.asarray(x_train[rng.choice(len(x_train), 50, replace=False)])  # 50 real images for max_lr
  real_flat = x_train[:10000].reshape(10000, -1).astype(np.float64)
  real_norm = float(np.linalg.norm(real_flat, axis=1).mean())
  # Top principal directions of the real images holding 99% of their energy (uncentred).
  _, s, vt = np.linalg.svd(real_flat, full_matrices=False)
  k99 = int(np.searchsorted(np.cumsum(s ** 2) / np.sum(s ** 2), 0.99)) + 1
  basis = vt[:k99]
  fc_kernel = get_kernel("fc", depth=1, kind="ntk", w_var=2.0, b_var=1e-4)  # distill_kip's defaults
  pooling = dict(pooling="avg", prepend_conv=True) if args.conv_pooling == "paper" else {}
  conv_kernel = get_kernel("conv", depth=args.conv_depth, kind="ntk", w_var=2.0, b_var=1e-4, filter_size=3, **pooling)
  config = dict(vars(args), preprocessing=prep_config, real_image_norm=real_norm, real_pcs_99=k99,
                real_pixel_range=[float(x_train.min()), float(x_train.max())])
  rows = []

  def write():
    _common.write_json(out_path, meta, rows, config=config)

  def evaluate(kernel, learn_labels, iterations, result, seconds):
    images, labels = np.asarray(result.images), np.asarray(result.labels)
    classes = np.repeat(np.arange(N_CLASSES), args.ipc)
    init_images = evaluate.init_images[kernel]
    row = dict(kernel=kernel, learn_labels=learn_labels, iterations=iterations, distill_seconds=seconds,
               final_loss=(result.history[-1]["loss"] if result.history else None))
    row |= image_stats(images, init_images, real_norm, basis) | label_stats(labels, classes)
    t0 = time.perf_counter()
    # KRR with the set's own kernel (kip_accuracy's default), and with the other kernel (cross-kernel).
    fc_test = (x_test[:args.krr_test], y_test[:args.krr_test])
    conv_test = (x_test[:args.conv_krr_test], y_test[:args.conv_krr_test])
    reg = float(result.config.get("reg", 1e-6))
    if kernel == "fc":
      row["krr_fc"] = row["krr_own"] = kip.kip_accuracy(result, fc_test)
      row["krr_conv"] = kip.kip_accuracy(result, conv_test, kernel_fn=conv_kernel, reg=reg, block_size=100)
    else:
      row["krr_conv"] = row["krr_own"] = kip.kip_accuracy(result, conv_test, block_size=100)
      row["krr_fc"] = kip.kip_accuracy(result, fc_test, kernel_fn=fc_kernel, reg=reg)
    row["krr_seconds"] = time.perf_counter() - t0
    ev = dict(seed=args.seed + 1000, runs=args.eval_runs, epochs=args.eval_epochs)
    convnet = networks.get_network("convnet", N_CLASSES, width=args.width)
    onehot = np.asarray(centred_one_hot(jnp.asarray(labels.argmax(1)), N_CLASSES), np.float32)
    t0 = time.perf_counter()
    row["convnet"] = summarize(train.evaluate_synset(images, labels, test, network=convnet, **ev))
    if learn_labels and iterations:
      # Learned images with one-hot labels, and the initial real images with the learned labels.
      row["convnet_onehot"] = summarize(train.evaluate_synset(images, onehot, test, network=convnet, **ev))
      row["convnet_init_images"] = summarize(train.evaluate_synset(init_images, labels, test, network=convnet, **ev))
    row["convnet_ce"] = summarize(train.evaluate_synset(images, labels.argmax(1), test, network=convnet, **ev))
    row["mlp"] = summarize(train.evaluate_synset(images, labels, test, network="mlp", n_classes=N_CLASSES, **ev))
    if kernel == "fc":
      matched = FCNet(width=args.matched_width)
    elif pooling:
      matched = PaperConvNet(width=args.kernel_conv_width, depth=args.conv_depth)
    else:
      matched = KernelConvNet(width=args.kernel_conv_width, depth=args.conv_depth)
    pr = dict(seed=args.seed + 1000, runs=args.eval_runs, steps=args.paper_steps, x_probe=x_probe)
    row["matched"] = paper_recipe(matched, images, labels, test, **pr)
    row["paper_convnet"] = paper_recipe(PaperConvNet(width=args.paper_width), images, labels, test, **pr)
    row["eval_seconds"] = time.perf_counter() - t0
    rows.append(row)
    write()
    print(f"{kernel} labels={'learned' if learn_labels else 'fixed'} it={iterations}: KRR own {100 * row['krr_own']:.1f} "
          f"fc {100 * row['krr_fc']:.1f} conv {100 * row['krr_conv']:.1f} | ConvNet {100 * row['convnet']['mean']:.1f} "
          f"CE {100 * row['convnet_ce']['mean']:.1f} MLP {100 * row['mlp']['mean']:.1f} matched "
          f"{100 * row['matched']['mean']:.1f} paper-ConvNet {100 * row['paper_convnet']['mean']:.1f} | "
          f"|x|/|real| {row['image_norm_over_real']:.2f} moved {row['moved_rel']:.2f} labels "
          f"[{row['label_min']:.2f}, {row['label_max']:.2f}] ({row['distill_seconds']:.0f} s + "
          f"{row['krr_seconds']:.0f} + {row['eval_seconds']:.0f} s)", flush=True)

  evaluate.init_images = {}
  for kernel in args.kernels.split(","):
    budgets = args.fc_iterations if kernel == "fc" else args.conv_iterations
    for learn_labels in [t.strip().lower() == "true" for t in args.learn_labels.split(",")]:
      options = dict(ipc=args.ipc, seed=args.seed, kernel=kernel, learn_labels=learn_labels, preprocessing=prep_config)
      if kernel == "conv":
        options |= dict(depth=args.conv_depth, **pooling)
      # The initial support (iteration 0) is the same real images for every budget.
      init = kip.distill_kip(x_train, y_train, **options, iterations=1, lr=1e-30)
      evaluate.init_images[kernel] = np.asarray(init.images)
      if not args.no_init_row and not rows:  # the same real images for every kernel; both KRRs are recorded
        evaluate(kernel, learn_labels, 0, init, 0.0)
      for n in budgets:
        t0 = time.perf_counter()
        result = kip.distill_kip(x_train, y_train, **options, iterations=n, log_every=max(1, n // 10))
        evaluate(kernel, learn_labels, n, result, time.perf_counter() - t0)

  headers = ["kernel", "labels", "iterations", "KRR own", "KRR fc", "KRR conv", "ConvNet (app)", "ConvNet one-hot",
             "ConvNet, real images + these labels", "ConvNet CE", "MLP", "matched (authors' recipe)", "authors' ConvNet", "|x| / |real|", "moved",
             "outside real PCs", "labels min / max", "label argmax = class"]
  table = [[r["kernel"], "learned" if r["learn_labels"] else "fixed", r["iterations"],
            *(f"{100 * r[k]:.1f}" for k in ("krr_own", "krr_fc", "krr_conv")),
            *(f"{100 * r[k]['mean']:.1f} ± {100 * r[k]['std']:.1f}" if k in r else "-"
              for k in ("convnet", "convnet_onehot", "convnet_init_images", "convnet_ce", "mlp", "matched",
                      "paper_convnet")),
            f"{r['image_norm_over_real']:.2f}", f"{r['moved_rel']:.2f}", f"{r['energy_outside_real_pcs']:.3f}",
            f"{r['label_min']:.2f} / {r['label_max']:.2f}", f"{r['label_argmax_is_class']:.1f}"] for r in rows]
  markdown = _common.markdown_table(headers, table)
  print(markdown)
  _common.write_json(out_path, meta, rows, config=config, table=markdown)


if __name__ == "__main__":
  main()
