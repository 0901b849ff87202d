"""MTT parity with the authors' reference code (GeorgeCazenavette/mtt-distillation) at equal budget.

Issue 18, item 1, for Matching Training Trajectories (Cazenavette et al., 2022). MNIST, 1 image
per class (``--ipc``): the authors' PyTorch components and ``udd_jax.supervised.mtt.distill_mtt``
run side by side on the SAME expert trajectories, from the same initial images, for the same
numbers of iterations, and both distilled sets are scored by the same evaluator
(``udd_jax.supervised.train.evaluate_synset``, DC-BENCH's schedule) with the same seeds. The
companion of ``supervised_parity.py`` (DC, DSA, DM), whose data, initial-image draw, evaluator
and summary it reuses.

Held equal, for seed ``s``:

* pixels: MNIST standardised by the training set's scalar mean and std (``supervised_parity``'s
  ``load_standardised``), fed to both sides;
* experts: trained once by ``udd_jax.supervised.experts.train_experts`` (``--n_experts`` of
  ``--expert_train_epochs`` epochs, SGD lr 0.01, no momentum, batch 256: buffer.py's defaults,
  lines 117-118 and 129) into ``--expert_dir``; each epoch's flat flax vector is converted to
  the per-epoch list of torch tensors in ``net.parameters()`` order that buffer.py saves (lines
  78, 92, 106) and distill.py loads (lines 162-179), and written there as ``replay_buffer_0.pt``.
  The conversion is checked on every run: their ConvNetW32 wrapped in their ``ReparamModule``,
  given the converted flat vector, must give our network's logits on real images to 1e-4
  (first, middle and last epoch of every expert);
* network: ConvNet width 32, depth 3, instance norm, ReLU, 2x2 average pooling, one linear
  layer (their ``ConvNetW32``, utils.py line 235, networks.py lines 29-98; ours
  ``networks.get_network("convnet", 10, width=32)``); the first convolution of both pads a
  one-channel input by 3 (networks.py line 86; ours pads 2 then the conv's own 1);
* initial images: one real training image per class picked by ``np.random.default_rng(s)``
  (their ``--pix_init real``, distill.py lines 120-130, with these images);
* MTT's hyperparameters: ``syn_steps``, ``expert_epochs``, ``max_start_epoch``, ``lr_img``,
  ``lr_lr``, ``lr_teacher`` (the student's initial lr), ``batch_syn`` = all synthetic images
  (their default, line 74-75; ours None), SGD(momentum 0.5) on the images and on the lr (lines
  138-139), no ZCA, no texture, no DSA (see below);
* evaluation: ``evaluate_synset`` with ``--eval_runs`` networks of our ConvNet of the same width,
  ``--eval_epochs`` epochs, seed ``1000 + s`` for both sides (paired), lr ``--eval_lr`` (0.01,
  DC-BENCH's; ``learned`` evaluates each set with the student lr its own side learned, as
  distill.py line 210 does).

The reference side is our own loop (distill.py's ``main()`` loads the data itself, needs wandb,
a GPU for saving, and evaluates with their own evaluator) over their ``utils.get_network`` and
``reparam_module.ReparamModule``, mirroring distill.py lines 111-139 (labels, initial images,
the two optimisers), 162-179 (loading the buffer, shuffling), 294-396 (one iteration: a
ReparamModule student, the next expert of the shuffled buffer, a start epoch, ``syn_steps``
differentiable SGD steps on the synthetic set, the normalised parameter distance, one step of
each optimiser). Made reproducible: their ``get_network`` seeds torch from ``time.time()`` on
every iteration (utils.py line 195), which is replaced by a seeded clock
(``supervised_parity.seeded_clock``); their ``random.shuffle`` (lines 172, 179, 315, 322) by a
``random.Random(s)``; their ``np.random.randint`` start epoch (line 324) and ``randperm`` of the
synthetic set (line 345; a no-op at full batch) by ``np.random.RandomState(s)`` and
``torch.manual_seed(s)``. Nothing of their code is copied here: it is imported from
``--reference_dir`` (an exported snapshot of the repository, kept outside this project).

Imports: their utils.py imports ``kornia`` (only for ZCA in ``get_dataset``) and ``torchvision``
(only for ``get_dataset`` too); neither loads here (kornia is not installed; PyPI torchvision
0.28 does not load against the CPU torch 2.13 build), so empty stand-in modules are put in
``sys.modules`` when the real ones cannot be imported (recorded as ``stubs`` in the JSON).
distill.py itself (wandb, torchvision.utils) is not imported.

Differences between their MTT and ours (their file:line; none is exercised here unless said):

1. DSA during distillation: theirs augments every student step's batch with DiffAugment
   (distill.py lines 358-359; ``--dsa`` default 'True', line 446; strategy default
   'color_crop_cutout_flip_scale_rotate', line 449), one fresh random draw per image (no seed);
   ``distill_mtt`` has no augmentation at all. So both run WITHOUT DSA here (their ``--dsa False``
   path). This is the largest difference from their published setting.
2. Expert order: theirs walks the shuffled buffer expert by expert, reshuffling (and reloading the
   file) after each pass (distill.py lines 305-322, without ``--load_all``); ours draws the expert
   uniformly at random every iteration (``udd_jax/supervised/mtt.py`` line 111), which is their
   ``--load_all`` path (distill.py line 306). Same distribution over a pass, other sequences.
3. Random streams: start epochs (both uniform in ``[0, max_start_epoch)``: distill.py line 324,
   mtt.py line 112) and expert choice come from different generators, so the two sides see
   different (expert, start) sequences; the comparison is statistical over seeds, not step by step.
4. Student mini-batches when ``batch_syn`` < the set (not at ipc 1 here): theirs pops chunks of a
   ``randperm`` split (distill.py lines 344-348), the LAST chunk first, and the last chunk of a
   permutation can be smaller than ``batch_syn``; ours concatenates permutations and cuts
   equal chunks of ``batch_syn`` that may straddle two permutations (mtt.py lines 100-106), so a
   batch can repeat an image and never has the remainder's size.
5. Loss: theirs divides both squared distances by ``num_params`` (distill.py lines 383-384) before
   the ratio; ours takes the ratio directly (mtt.py line 89). Identical value.
6. Iterations: their loop runs ``Iteration + 1`` updates (line 185) and evaluates at ``it`` before
   that iteration's update (line 191), so the set scored "at iteration it" has had ``it`` updates,
   the budget's meaning here; their final update is never evaluated.
7. Evaluation: theirs trains each evaluation network with the learned student lr
   (``args.lr_net = syn_lr.item()``, line 210), for ``epoch_eval_train`` 1000 epochs (line 430)
   with DSA (line 194); here both sides use ours (``--eval_lr``, ``--eval_epochs``, no DSA).
8. Defaults that differ (both sides are given the same values here): ``lr_img`` theirs 1000
   (line 433) vs ours 100; ``expert_epochs`` theirs 3 (line 455) vs ours 2; ``max_start_epoch``
   theirs 25 (line 457) vs ours ``epochs - expert_epochs + 1``; ``syn_steps`` 20, ``lr_lr`` 1e-5,
   ``lr_teacher`` 0.01 agree.
9. Experts (not compared: both sides use ours): buffer.py trains them with DSA
   (``epoch(..., aug=True)``, lines 84-85, DSA on by default, line 120) and keeps the last
   incomplete batch (a DataLoader without ``drop_last``, line 60); ``train_experts`` trains
   without augmentation and drops it (``udd_jax/supervised/experts.py`` lines 73-74). buffer.py's
   optional ``--decay`` (lr x 0.1 after half the epochs, lines 80, 94-97) and ``--l2`` have no
   counterpart in ``train_experts``.
10. Flattening: their ReparamModule's flat vector is ``net.parameters()`` order (conv weight, conv
   bias, norm weight, norm bias per block, then the classifier; reparam_module.py lines 28-51),
   the classifier reading features in (C, H, W) order; ours is ``ravel_pytree`` of the flax dict
   (sorted names: classifier, convs_*, norms_*; NHWC features in (H, W, C) order). Only the
   layout differs; the conversion below permutes the classifier's input rows.

Seconds per iteration exclude the first iteration (JAX compile, torch warm-up). The reference side
runs once to the largest budget and is snapshotted at each budget (its loop does not depend on
the total); ours calls ``distill_mtt`` once per budget (its key stream is a prefix). Rows are
written to the JSON as soon as each is done; iteration 0 (the real initial images) is evaluated
once per seed as side ``init``. Rows carry the learned student lr (``student_lr``).

Setup (torch is the project's ``bench`` extra):

  pip install 'torch==2.13.0'
  mkdir -p /work/scratch/mtt_ref && R=/work/.mirror/GeorgeCazenavette+mtt-distillation/repo && \\
      git -C $R archive HEAD -- buffer.py distill.py utils.py networks.py reparam_module.py readme.md \\
      | tar -x -C /work/scratch/mtt_ref

(the snapshot's docs/*.gif is absent from the mirror, so a plain ``git archive HEAD`` fails).

Runs:

  python benchmarks/supervised_parity_mtt.py --reference_dir /work/scratch/mtt_ref --iterations 2 --seeds 0 \\
      --n_experts 2 --expert_train_epochs 2 --expert_subset 2560 --expert_epochs 1 --max_start_epoch 2 --syn_steps 5 \\
      --eval_runs 1 --eval_epochs 2 --expert_dir /tmp/mtt_smoke_experts --out /tmp/supervised_parity_mtt_smoke.json
  python benchmarks/supervised_parity_mtt.py --reference_dir /work/scratch/mtt_ref --iterations 10,50,200 \\
      --seeds 0,1,2 --eval_runs 10 --eval_epochs 300                                     # the defaults (~3 h here)
  python benchmarks/supervised_parity_mtt.py --reference_dir /work/scratch/mtt_ref --iterations 10,50 --seeds 0,1,2 \\
      --n_experts 3 --expert_train_epochs 3 --expert_epochs 2 --max_start_epoch 2 --syn_steps 10 \\
      --eval_runs 5 --eval_epochs 300 --out benchmarks/results/supervised_parity_mtt.json  # the grid queued (~20-40 min)

Timings on the 2 shared CPU cores (load ~5, contended): an expert epoch on all of MNIST at width 32 takes ~64 s;
one MTT iteration at syn_steps 20 takes ~7 s on both sides (ours ~7.6 s, theirs ~7.1 s; not profiled);
one evaluation network (300 epochs) ~5-10 s. The
defaults (200 iterations, syn_steps 20, 3 x 4 experts, 10 evaluation runs) would take ~3 h here, so the queued grid
halves syn_steps, stops at 50 iterations, trains 3 experts of 3 epochs and scores with 5 networks.

The smoke line above takes ~1.5 min (its experts see 2,560 images).

Prints a markdown table, writes benchmarks/results/supervised_parity_mtt.json (``--out``).
"""

from __future__ import annotations

import contextlib
import pathlib
import random
import statistics
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import _common
import supervised_parity as sp
from udd_jax.supervised import experts as experts_lib
from udd_jax.supervised import mtt, networks, train

try:
  import torch
except ImportError:  # pragma: no cover
  sys.exit("supervised_parity_mtt.py needs PyTorch: pip install 'torch==2.13.0' (or pip install -e '.[bench]').")

N_CLASSES = sp.N_CLASSES
REFERENCE_MODELS = {32: "ConvNetW32", 64: "ConvNetW64", 128: "ConvNetW128", 256: "ConvNetW256"}  # their get_network
CHANNEL, IM_SIZE = 1, (28, 28)
RUNS = pathlib.Path(__file__).resolve().parent.parent / "runs"


# ---------------------------------------------------------------------------------------------------------------
# Their code
# ---------------------------------------------------------------------------------------------------------------

def import_reference(reference_dir):
  """Their ``utils`` and ``reparam_module`` from ``reference_dir``; kornia and torchvision stubbed if absent."""
  if not (pathlib.Path(reference_dir) / "reparam_module.py").is_file():
    sys.exit(f"--reference_dir {reference_dir} holds no reparam_module.py: export the mtt-distillation snapshot there.")
  stubs = []
  try:
    import kornia  # noqa: F401
  except Exception:  # only used by their get_dataset (ZCA)
    sys.modules.pop("kornia", None)
    sys.modules["kornia"] = types.ModuleType("kornia")
    stubs.append("kornia")
  ref_utils, tv_stubbed = sp.import_reference(reference_dir)  # puts reference_dir first on sys.path
  if tv_stubbed:
    stubs.append("torchvision")
  assert pathlib.Path(ref_utils.__file__).resolve().parent == pathlib.Path(reference_dir).resolve(), ref_utils.__file__
  import reparam_module as ref_reparam
  return ref_utils, ref_reparam, stubs


def reference_student(ref_utils, ref_reparam, width):
  net = ref_utils.get_network(REFERENCE_MODELS[width], CHANNEL, N_CLASSES, IM_SIZE, dist=False)  # distill.py line 294
  return ref_reparam.ReparamModule(net)  # line 296


# ---------------------------------------------------------------------------------------------------------------
# Experts: ours, trained once, converted to their replay buffer
# ---------------------------------------------------------------------------------------------------------------

def our_network(width):
  return networks.get_network("convnet", N_CLASSES, width=width)


def flax_to_torch(params, width, depth=3):
  """Our ConvNet's flax params to the list of tensors in their ``net.parameters()`` order."""
  out = []
  for d in range(depth):
    conv, norm = params[f"convs_{d}"], params[f"norms_{d}"]
    # flax (kh, kw, in, out) -> torch (out, in, kh, kw)
    out += [np.transpose(np.asarray(conv["kernel"]), (3, 2, 0, 1)), np.asarray(conv["bias"]),
            np.asarray(norm["scale"]), np.asarray(norm["bias"])]
  kernel = np.asarray(params["classifier"]["kernel"])  # (H*W*C, classes), features in (h, w, c) order
  side = int(round((kernel.shape[0] // width) ** 0.5))
  weight = kernel.reshape(side, side, width, -1).transpose(3, 2, 0, 1).reshape(kernel.shape[1], -1)  # (classes, C*H*W)
  out += [weight, np.asarray(params["classifier"]["bias"])]
  return [torch.from_numpy(np.array(p, dtype=np.float32, order="C")) for p in out]


def make_experts(x_train, y_train, args):
  """Our experts in ``args.expert_dir`` (resumed if there), and their replay buffer next to them."""
  directory = pathlib.Path(args.expert_dir)
  t0 = time.perf_counter()
  if args.expert_subset:  # smoke runs: experts on the first rows only
    x_train, y_train = x_train[:args.expert_subset], y_train[:args.expert_subset]
  experts_lib.train_experts(
      x_train, y_train, n_experts=args.n_experts, epochs=args.expert_train_epochs, workdir=directory,
      seed=args.expert_seed, network="convnet", width=args.width, depth=3, lr=args.expert_lr, momentum=0.0,
      batch_size=256, callback=lambda i, e, r: print(f"  expert {i} epoch {e}: train loss {r['train_loss']:.4f} "
                                                      f"({r['seconds']:.0f} s)", flush=True))
  manifest, trajectories = experts_lib.load_experts(directory)
  trajectories = trajectories[:args.n_experts]
  _, unravel = ravel_pytree(networks.init_params(our_network(args.width), jax.random.key(0), (28, 28, 1)))
  # buffer.py lines 78, 92, 99, 106: a list of experts, each a list of (epochs + 1) lists of tensors.
  buffer = [[flax_to_torch(unravel(jnp.asarray(flat)), args.width) for flat in traj] for traj in trajectories]
  buffer_path = directory / "replay_buffer_0.pt"
  torch.save(buffer, buffer_path)
  return manifest, trajectories, unravel, buffer_path, time.perf_counter() - t0


def check_conversion(ref_utils, ref_reparam, trajectories, unravel, x, width):
  """Their ReparamModule with the converted flat vector gives our logits (max abs diff < 1e-4)."""
  module, student = our_network(width), reference_student(ref_utils, ref_reparam, width)
  assert student.param_numel == trajectories.shape[-1], (student.param_numel, trajectories.shape[-1])
  x_torch = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  worst = 0.0
  for traj in trajectories:
    for epoch in sorted({0, len(traj) // 2, len(traj) - 1}):
      params = unravel(jnp.asarray(traj[epoch]))
      ours = np.asarray(module.apply({"params": params}, jnp.asarray(x)))
      flat = torch.cat([p.reshape(-1) for p in flax_to_torch(params, width)])
      with torch.no_grad():
        theirs = student(x_torch, flat_param=flat).numpy()
      worst = max(worst, float(np.abs(ours - theirs).max()))
  print(f"weight conversion check: max |logits ours - theirs| = {worst:.2e} over {len(trajectories)} experts",
        flush=True)
  assert worst < 1e-4, f"converted weights give other logits: max abs diff {worst}"
  return worst


# ---------------------------------------------------------------------------------------------------------------
# Reference side: their components, driven by a loop that mirrors distill.py
# ---------------------------------------------------------------------------------------------------------------

def reference_mtt(ref_utils, ref_reparam, x_train, init_idx, buffer_path, *, budgets, seed, width, syn_steps,
                  expert_epochs, max_start_epoch, lr_img, lr_lr, lr_teacher, ipc):
  """Yields ``(iterations, images NHWC, last loss, learned lr, seconds_per_iteration)`` at each budget."""
  torch.manual_seed(seed)
  py_rng, np_rng = random.Random(seed), np.random.RandomState(seed)  # their random / np.random module calls
  images_all = torch.from_numpy(np.ascontiguousarray(x_train.transpose(0, 3, 1, 2)))
  n_syn = N_CLASSES * ipc
  batch_syn = n_syn  # distill.py lines 74-75
  # Lines 111-139: class-major labels; the set from the chosen real images (--pix_init real); syn_lr = lr_teacher;
  # SGD(momentum 0.5) on each.
  label_syn = torch.tensor(np.repeat(np.arange(N_CLASSES), ipc), dtype=torch.long)
  image_syn = images_all[init_idx].clone().detach().requires_grad_(True)
  syn_lr = torch.tensor(lr_teacher).detach().requires_grad_(True)
  optimizer_img = torch.optim.SGD([image_syn], lr=lr_img, momentum=0.5)
  optimizer_lr = torch.optim.SGD([syn_lr], lr=lr_lr, momentum=0.5)
  optimizer_img.zero_grad()
  criterion = torch.nn.CrossEntropyLoss()
  # Lines 162-179 (not --load_all): the expert files, shuffled; the first one's experts, shuffled.
  expert_files = [str(buffer_path)]
  file_idx, expert_idx = 0, 0
  py_rng.shuffle(expert_files)
  buffer = torch.load(expert_files[file_idx])
  py_rng.shuffle(buffer)
  times = []
  with sp.seeded_clock(ref_utils, seed):
    for it in range(max(budgets)):
      t0 = time.perf_counter()
      # Lines 294-303: a random student (its init is never used: the flat vector replaces it).
      student_net = reference_student(ref_utils, ref_reparam, width)
      student_net.train()
      num_params = sum(np.prod(p.size()) for p in student_net.parameters())
      # Lines 308-322: the next expert; after a pass, the next file (here the same one) reloaded and reshuffled.
      expert_trajectory = buffer[expert_idx]
      expert_idx += 1
      if expert_idx == len(buffer):
        expert_idx = 0
        file_idx += 1
        if file_idx == len(expert_files):
          file_idx = 0
          py_rng.shuffle(expert_files)
        del buffer
        buffer = torch.load(expert_files[file_idx])  # line 319 (max_files is None)
        py_rng.shuffle(buffer)
      # Lines 324-332.
      start_epoch = np_rng.randint(0, max_start_epoch)
      starting_params = expert_trajectory[start_epoch]
      target_params = expert_trajectory[start_epoch + expert_epochs]
      target_params = torch.cat([p.data.reshape(-1) for p in target_params], 0)
      student_params = [torch.cat([p.data.reshape(-1) for p in starting_params], 0).requires_grad_(True)]
      starting_params = torch.cat([p.data.reshape(-1) for p in starting_params], 0)
      syn_images, y_hat = image_syn, label_syn
      indices_chunks = []
      # Lines 342-370: syn_steps differentiable SGD steps of size syn_lr (no DSA: their --dsa False).
      for _ in range(syn_steps):
        if not indices_chunks:
          indices = torch.randperm(len(syn_images))
          indices_chunks = list(torch.split(indices, batch_syn))
        these_indices = indices_chunks.pop()
        x = syn_images[these_indices]
        this_y = y_hat[these_indices]
        out = student_net(x, flat_param=student_params[-1])
        ce_loss = criterion(out, this_y)
        grad = torch.autograd.grad(ce_loss, student_params[-1], create_graph=True)[0]
        student_params.append(student_params[-1] - syn_lr * grad)
      # Lines 373-396: the normalised parameter distance; one step of each optimiser.
      param_loss = torch.nn.functional.mse_loss(student_params[-1], target_params, reduction="sum")
      param_dist = torch.nn.functional.mse_loss(starting_params, target_params, reduction="sum")
      param_loss = param_loss / num_params
      param_dist = param_dist / num_params
      grand_loss = param_loss / param_dist
      optimizer_img.zero_grad()
      optimizer_lr.zero_grad()
      grand_loss.backward()
      optimizer_img.step()
      optimizer_lr.step()
      loss = grand_loss.item()
      del student_params
      times.append(time.perf_counter() - t0)
      if it + 1 in budgets:
        per_it = statistics.mean(times[1:]) if len(times) > 1 else times[0]
        yield (it + 1, image_syn.detach().numpy().transpose(0, 2, 3, 1).copy(), loss, float(syn_lr.item()), per_it)


# ---------------------------------------------------------------------------------------------------------------
# Our side: distill_mtt, started from the same images
# ---------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def fixed_initial_images(images):
  """Makes ``distill_mtt`` start from ``images`` (class-major) instead of its own random real pick."""
  original, used = mtt._initial_images, []

  def pick(s, key, init):
    used.append(True)
    return jnp.asarray(images, s.dtype)

  mtt._initial_images = pick
  try:
    yield used
  finally:
    mtt._initial_images = original


def ours_mtt(x_train, y_train, init_images, expert_dir, *, iterations, seed, syn_steps, expert_epochs, max_start_epoch,
             lr_img, lr_lr, lr_teacher, ipc):
  with fixed_initial_images(init_images) as used:
    result = mtt.distill_mtt(x_train, y_train, ipc=ipc, seed=seed, expert_dir=expert_dir, syn_steps=syn_steps,
                             expert_epochs=expert_epochs, max_start_epoch=max_start_epoch, image_lr=lr_img,
                             student_lr_lr=lr_lr, init_student_lr=lr_teacher, batch_syn=None, init="real",
                             iterations=iterations)
  assert used, "distill_mtt did not take the given initial images"
  hist = result.history
  return result.images, hist[-1]["loss"], float(result.step_sizes[0]), sp._seconds_per_iteration(hist)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation, output
# ---------------------------------------------------------------------------------------------------------------

def evaluate(images, test, *, seed, width, runs, epochs, ipc, lr):
  module = our_network(width)
  out = train.evaluate_synset(np.asarray(images, np.float32), np.repeat(np.arange(N_CLASSES), ipc), test,
                                 seed=1000 + seed, network=module, runs=runs, epochs=epochs, lr=lr)
  return dict(acc_mean=out["mean"], acc_std=out["std"], accuracies=out["accuracies"], eval_seconds=out["seconds"],
              eval_lr=lr)


def main():
  parser = _common.argument_parser(__doc__)
  parser.add_argument("--reference_dir", required=True, help="exported snapshot of GeorgeCazenavette/mtt-distillation")
  parser.add_argument("--iterations", default="10,50,200", help="budgets, comma-separated")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--ipc", type=int, default=1, help="images per class")
  parser.add_argument("--width", type=int, default=32, choices=sorted(REFERENCE_MODELS))
  parser.add_argument("--sides", default="reference,ours")
  parser.add_argument("--expert_dir", default=None,
                      help="where our experts and their converted replay_buffer_0.pt go (default under runs/)")
  parser.add_argument("--n_experts", type=int, default=3)
  parser.add_argument("--expert_train_epochs", type=int, default=4)
  parser.add_argument("--expert_lr", type=float, default=0.01, help="buffer.py's --lr_teacher")
  parser.add_argument("--expert_seed", type=int, default=0)
  parser.add_argument("--expert_subset", type=int, default=0,
                      help="train the experts on the first N training images only (smoke runs); 0: all")
  parser.add_argument("--syn_steps", type=int, default=20, help="distill.py's default")
  parser.add_argument("--expert_epochs", type=int, default=2)
  parser.add_argument("--max_start_epoch", type=int, default=2)
  parser.add_argument("--lr_img", type=float, default=100.0, help="ours' default (theirs 1000, for ZCA'd CIFAR)")
  parser.add_argument("--lr_lr", type=float, default=1e-5)
  parser.add_argument("--lr_teacher", type=float, default=0.01, help="the student lr's initial value")
  parser.add_argument("--eval_runs", type=int, default=10)
  parser.add_argument("--eval_epochs", type=int, default=300)
  parser.add_argument("--eval_lr", default="0.01", help="a float, or 'learned' (each side's learned student lr)")
  parser.add_argument("--no_init_row", action="store_true", help="skip evaluating the initial real images")
  parser.add_argument("--out", default=str(_common.RESULTS / "supervised_parity_mtt.json"))
  args = parser.parse_args()
  budgets = sorted({int(v) for v in args.iterations.split(",")})
  seeds = [int(v) for v in args.seeds.split(",")]
  sides = [s for s in args.sides.split(",") if s]
  if args.expert_dir is None:
    name = f"experts_w{args.width}_e{args.expert_train_epochs}_s{args.expert_seed}"
    args.expert_dir = str(RUNS / "supervised_parity_mtt" / (name + (f"_sub{args.expert_subset}" if args.expert_subset
                                                                    else "")))
  if args.max_start_epoch - 1 + args.expert_epochs > args.expert_train_epochs:
    parser.error("max_start_epoch - 1 + expert_epochs must not exceed expert_train_epochs")
  learned_lr = args.eval_lr == "learned"
  fixed_lr = None if learned_lr else float(args.eval_lr)

  ref_utils, ref_reparam, stubs = import_reference(args.reference_dir)
  x_train, y_train, x_test, y_test, prep = sp.load_standardised(args.data_dir)
  test = (x_test, y_test)
  meta = _common.machine()
  print(_common.header(meta), flush=True)
  print(f"experts: {args.n_experts} x {args.expert_train_epochs} epochs in {args.expert_dir}", flush=True)
  manifest, trajectories, unravel, buffer_path, expert_seconds = make_experts(x_train, y_train, args)
  conversion = check_conversion(ref_utils, ref_reparam, trajectories, unravel, x_test[:16], args.width)
  config = dict(vars(args), budgets=budgets, seeds=seeds, sides=sides, dataset="mnist", preprocessing=prep,
                stubs=stubs, reference_model=REFERENCE_MODELS[args.width], batch_syn="all (n_classes * ipc)",
                dsa="none on either side (distill_mtt has none; theirs run as --dsa False)",
                experts=dict(n=int(trajectories.shape[0]), epochs=manifest["epochs"], lr=manifest["lr"],
                             momentum=manifest["momentum"], batch_size=manifest["batch_size"], seed=manifest["seed"],
                             n_params=manifest["n_params"], seconds=expert_seconds,
                             train_images=args.expert_subset or int(x_train.shape[0]), buffer=str(buffer_path)),
                conversion_max_abs_logit_diff=conversion,
                evaluator="udd_jax.supervised.train.evaluate_synset", eval_network=f"udd_jax convnet width {args.width}",
                eval_seed="1000 + seed (both sides)")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  rows = []

  def record(row):
    row = dict(method="mtt", **row)
    rows.append(row)
    print(f"  mtt {row['side']:9s} it={row['iterations']:4d} seed={row['seed']}: "
          f"acc {100 * row['acc_mean']:.2f} +- {100 * row['acc_std']:.2f}%  "
          f"s/it {row.get('seconds_per_iteration') or 0:.3f}  loss {row.get('final_loss')}  "
          f"lr {row.get('student_lr')}", flush=True)
    _common.write_json(out, meta, rows, config=config)

  eval_kw = dict(width=args.width, runs=args.eval_runs, epochs=args.eval_epochs, ipc=args.ipc)
  mtt_kw = dict(syn_steps=args.syn_steps, expert_epochs=args.expert_epochs, max_start_epoch=args.max_start_epoch,
                lr_img=args.lr_img, lr_lr=args.lr_lr, lr_teacher=args.lr_teacher, ipc=args.ipc)
  for seed in seeds:
    init_idx = sp.initial_indices(y_train, seed, args.ipc)
    init_images = x_train[init_idx]
    print(f"seed {seed}: initial images = training rows {init_idx.tolist()}", flush=True)
    common = dict(seed=seed, init_rows=init_idx.tolist())
    if not args.no_init_row:
      lr = args.lr_teacher if learned_lr else fixed_lr
      record(dict(side="init", iterations=0, student_lr=args.lr_teacher, **common,
                  **evaluate(init_images, test, seed=seed, lr=lr, **eval_kw)))
    if "reference" in sides:
      for its, images, loss, syn_lr, per_it in reference_mtt(
          ref_utils, ref_reparam, x_train, init_idx, buffer_path, budgets=budgets, seed=seed, width=args.width,
          **mtt_kw):
        record(dict(side="reference", iterations=its, **common, final_loss=loss, student_lr=syn_lr,
                    seconds_per_iteration=per_it,
                    **evaluate(images, test, seed=seed, lr=syn_lr if learned_lr else fixed_lr, **eval_kw)))
    if "ours" in sides:
      for its in budgets:
        images, loss, syn_lr, per_it = ours_mtt(x_train, y_train, init_images, args.expert_dir, iterations=its,
                                                seed=seed, **mtt_kw)
        record(dict(side="ours", iterations=its, **common, final_loss=loss, student_lr=syn_lr,
                    seconds_per_iteration=per_it,
                    **evaluate(images, test, seed=seed, lr=syn_lr if learned_lr else fixed_lr, **eval_kw)))
  print()
  print(f"MTT, MNIST, ipc {args.ipc}, width {args.width}, no DSA, {trajectories.shape[0]} experts x "
        f"{manifest['epochs']} epochs (ours, shared), syn_steps {args.syn_steps}, expert_epochs {args.expert_epochs}, "
        f"max_start_epoch {args.max_start_epoch}, lr_img {args.lr_img}, lr_lr {args.lr_lr}, lr_teacher "
        f"{args.lr_teacher}; evaluator: evaluate_synset, convnet width {args.width}, {args.eval_runs} runs x "
        f"{args.eval_epochs} epochs, lr {args.eval_lr}, seed 1000+s")
  print(sp.summary(rows))
  _common.write_json(out, meta, rows, config=config, table=sp.summary(rows))


if __name__ == "__main__":
  main()
