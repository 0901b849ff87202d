"""DM, DC and DSA parity with the authors' reference code (VICO-UoE/DatasetCondensation) at equal budget.

Issue 18, item 1. Method DM, MNIST, 1 image per class: the authors' PyTorch components and
``udd_jax.supervised.dm.distill_dm`` run side by side, from the same initial images, for
the same numbers of iterations, and both distilled sets are scored by the same evaluator
(``udd_jax.supervised.train.evaluate_synset``, DC-BENCH's schedule) with the same seeds.

Held equal, for seed ``s``:

* pixels: MNIST standardised by the training set's scalar mean and std (as
  ``udd_jax.supervised.experiment`` does; DC's 0.1307 / 0.3081), fed to both sides;
* initial images: one real training image per class picked by ``np.random.default_rng(s)``;
* iterations, ``image_lr`` (SGD, momentum 0.5), ``batch_real`` real images per class per
  iteration, the DSA strategy string (``--dsa_strategy``, default main_DM.py's own default,
  flip included: both sides get the same string), the ConvNet width (depth 3);
* evaluation: ``evaluate_synset`` with ``--eval_runs`` networks of our ConvNet of the same
  width, ``--eval_epochs`` epochs, seed ``1000 + s`` for both sides (paired), no
  augmentation unless ``--eval_dsa`` (then per-image DSA without flip, as the app does).

The reference side is our own loop (main_DM.py's ``main()`` loads the data itself) over
their ``utils.get_network``, ``utils.DiffAugment``, ``utils.ParamDiffAug`` and
``ConvNet.embed``; it mirrors main_DM.py lines 81-83 (``get_images``), 101-103 (the image
optimiser) and 138-197 (the DM update for a ConvNet without BN). Made reproducible: their
``get_network`` seeds torch from ``time.time()``, and main_DM.py draws each class's DSA
seed from ``time.time()``; here ``utils.time`` is replaced by a clock whose readings are
drawn from a RNG seeded by ``s`` and the DSA seeds by ``np.random.default_rng([s, 1])``,
one independent draw per class (in the original, classes handled within the same
millisecond share a seed). Their real batches use ``RandomState(s).permutation`` as their
``np.random.permutation``. Nothing of their code is copied here: it is imported from
``--reference_dir`` (an exported snapshot of the repository, kept outside this project).

torchvision: their utils.py imports ``torchvision.datasets/transforms`` (only for
``get_dataset``, which this harness does not call). The PyPI torchvision that matches
torch 2.13 (0.28.0) fails to load against the CPU torch build (``operator torchvision::nms
does not exist``), so a tiny empty stand-in module is put in ``sys.modules`` when the real
one cannot be imported (recorded in the JSON as ``torchvision_stub``).

The reference side runs once to the largest budget and is snapshotted at each budget (its
loop does not depend on the total); ours calls ``distill_dm`` once per budget (its key
stream is a prefix too). Seconds per iteration exclude the first iteration (JAX compile,
torch warm-up). Rows are written to the JSON as soon as each is done, so a stopped run
loses nothing; iteration 0 (the real initial images) is evaluated once per seed as side
``init``.

Setup (torch is the project's ``bench`` extra):

  pip install 'torch==2.13.0'
  mkdir -p /work/scratch/dc_ref && git -C /work/.mirror/VICO-UoE+DatasetCondensation/repo archive HEAD \\
      | tar -x -C /work/scratch/dc_ref

Runs (width 32 by default: on 2 shared CPU cores the reference takes ~5 s per iteration at
width 32 and ~9 s at width 128, ours ~0.6 s and ~4 s, so the grid below, 600 reference and
780 of our iterations plus 21 evaluations of 10 networks, is ~40-60 min at width 32 and
would be ~2.5 h at width 128):

  python benchmarks/supervised_parity.py --reference_dir /work/scratch/dc_ref --iterations 10,50,200 \\
      --seeds 0,1,2 --width 32 --eval_runs 10 --eval_epochs 300                                 # full grid (the defaults)
  python benchmarks/supervised_parity.py --reference_dir /work/scratch/dc_ref --iterations 2,5 \\
      --seeds 0 --eval_runs 1 --eval_epochs 5 --out /tmp/supervised_parity_quick.json           # smoke, ~1 min

DC and DSA (``--method dc|dsa``; ``dm`` is the default and what the text above describes): the reference
side is our loop over their ``get_network``, ``get_loops``, ``match_loss`` (``dis_metric='ours'``),
``DiffAugment``/``ParamDiffAug``, ``TensorDataset`` and ``epoch``, mirroring main.py lines 35-38, 79-102 and
147-218 (one iteration: a fresh ConvNet; ``outer_loop`` rounds of [per-class gradient matching on a real batch
of ``batch_real`` and the class's synthetic images, one SGD(lr_img 0.1, momentum 0.5) step; ``inner_loop``
epochs of their ``epoch`` on the synthetic set, mini-batches of ``batch_train``, SGD(lr_net 0.01)], the
BatchNorm branch being inert for ConvNet); ours is ``udd_jax.supervised.dc.distill_dc`` (``dsa=True`` for DSA)
with the same lr_img, lr_net, loops (their ``get_loops(1)`` = 1, 1: at ipc 1 the network is never trained),
batch_real, width and strategy, started from the same images (``dc.initial_images`` swapped). Same seeding as
DM (seeded clock for ``get_network``, one DSA seed per class from ``default_rng([s, 1])``,
``RandomState(s).permutation`` for real batches) and the same torch-2.x workarounds (the overlapping setitem;
the NCHW re-layout, here by wrapping their ``DiffAugment`` so that ``epoch`` gets it too). DSA's strategy
defaults to ``color_crop_cutout_scale_rotate``, their readme's string for MNIST (no flip); DC runs without DSA
(main.py: ``args.dsa`` is True only for ``--method DSA``). ``--image_lr`` defaults to 0.1 for DC/DSA
(main.py), 1.0 for DM (main_DM.py). Both sides are started from real images (main.py's DSA runs use
``--init real``; its DC default is noise). Rows carry ``method``.

  python benchmarks/supervised_parity.py --method dc --reference_dir /work/scratch/dc_ref --iterations 10,50,100 \\
      --seeds 0,1,2 --width 32 --eval_runs 10 --eval_epochs 300 --out benchmarks/results/supervised_parity_dc.json
  python benchmarks/supervised_parity.py --method dsa --reference_dir /work/scratch/dc_ref --iterations 10,50,100 \\
      --seeds 0,1,2 --width 32 --eval_runs 10 --eval_epochs 300 --out benchmarks/results/supervised_parity_dsa.json

At width 32 on the 2 shared cores (load 5-7) both DC and DSA take ~3.5 s per iteration on the reference side and
~5 s on ours, so the grid with a 200-iteration budget (~1 h 45 min) is cut to 10,50,100 (~1 h).

Prints a markdown table, writes benchmarks/results/supervised_parity.json (``--out``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import pathlib
import statistics
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

import _common
import udd_jax
from udd_jax.supervised import augment, dc, dm, networks, train

try:
  import torch
except ImportError:  # pragma: no cover
  sys.exit("supervised_parity.py needs PyTorch: pip install 'torch==2.13.0' (or pip install -e '.[bench]').")

N_CLASSES = 10
REFERENCE_MODELS = {32: "ConvNetW32", 64: "ConvNetW64", 128: "ConvNet", 256: "ConvNetW256"}  # their get_network names
REFERENCE_DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"  # main_DM.py's --dsa_strategy default (every dataset)
# DSA (main.py --method DSA): readme.md's "Basic experiments" note, "use color_crop_cutout_flip_scale_rotate for
# FashionMNIST CIFAR10/100, and color_crop_cutout_scale_rotate for the digit datasets (MNIST and SVHN)".
REFERENCE_DSA_STRATEGY_DIGITS = "color_crop_cutout_scale_rotate"
METHOD_DEFAULTS = {  # per --method: DSA strategy, image lr (main_DM.py's --lr_img 1.0; main.py's 0.1)
    "dm": dict(dsa_strategy=REFERENCE_DSA_STRATEGY, image_lr=1.0),
    "dc": dict(dsa_strategy="none", image_lr=0.1),  # main.py: --dsa_strategy 'None', args.dsa False for --method DC
    "dsa": dict(dsa_strategy=REFERENCE_DSA_STRATEGY_DIGITS, image_lr=0.1),
}


# ---------------------------------------------------------------------------------------------------------------
# Data and the shared starting point
# ---------------------------------------------------------------------------------------------------------------

def load_standardised(data_dir):
  """MNIST as both sides see it: (n, 28, 28, 1) float32 standardised by the training pixels' scalar mean / std."""
  (x_train, y_train), (x_test, y_test) = udd_jax.load_dataset("mnist", data_dir=data_dir)
  x_train = np.asarray(x_train, np.float32)
  mean, std = float(x_train.mean()), float(x_train.std())  # as udd_jax.supervised.experiment._standardise

  def prep(x):
    return ((np.asarray(x, np.float32) - mean) / std)[..., None]

  return prep(x_train), np.asarray(y_train, np.int64), prep(x_test), np.asarray(y_test, np.int64), dict(
      mean=mean, std=std)


def initial_indices(y, seed, ipc=1):
  """``ipc`` real training images per class (distinct), picked by ``np.random.default_rng(seed)``: rows of the
  training set, class-major. (At ipc 1 one ``rng.choice`` per class, the draw of the runs recorded before --ipc.)"""
  rng = np.random.default_rng(seed)
  if ipc == 1:
    return np.array([rng.choice(np.flatnonzero(y == c)) for c in range(N_CLASSES)])
  return np.concatenate([rng.choice(np.flatnonzero(y == c), ipc, replace=False) for c in range(N_CLASSES)])


# ---------------------------------------------------------------------------------------------------------------
# Reference side: the authors' components, driven by a loop that mirrors main_DM.py
# ---------------------------------------------------------------------------------------------------------------

def import_reference(reference_dir):
  """Their ``utils`` module from ``reference_dir``; torchvision stubbed if it cannot be imported."""
  stubbed = False
  try:
    import torchvision  # noqa: F401
  except Exception:  # missing, or a build that does not match this torch
    for name in ("torchvision", "torchvision.datasets", "torchvision.transforms", "torchvision.utils"):
      sys.modules.pop(name, None)
    tv = types.ModuleType("torchvision")
    tv.datasets, tv.transforms, tv.utils = (types.ModuleType(f"torchvision.{n}") for n in ("datasets", "transforms", "utils"))
    sys.modules.update({"torchvision": tv, "torchvision.datasets": tv.datasets, "torchvision.transforms": tv.transforms,
                        "torchvision.utils": tv.utils})
    stubbed = True
  path = str(pathlib.Path(reference_dir).resolve())
  if not (pathlib.Path(path) / "utils.py").is_file():
    sys.exit(f"--reference_dir {reference_dir} holds no utils.py: export the DatasetCondensation snapshot there.")
  sys.path.insert(0, path)
  import utils as ref_utils  # their utils.py (and networks.py)
  return ref_utils, stubbed


class _SeededClock:
  """Stands in for the ``time`` module inside their utils.py: ``time()`` readings drawn from a seeded RNG,
  so that ``get_network``'s ``torch.random.manual_seed(int(time.time() * 1000) % 100000)`` is reproducible."""

  def __init__(self, seed, real):
    self._rng, self._real = np.random.default_rng([seed, 2]), real

  def time(self):
    return (int(self._rng.integers(100000)) + 0.5) / 1000.0

  def __getattr__(self, name):
    return getattr(self._real, name)


@contextlib.contextmanager
def seeded_clock(ref_utils, seed):
  real = ref_utils.time
  ref_utils.time = _SeededClock(seed, real)
  try:
    yield
  finally:
    ref_utils.time = real


@contextlib.contextmanager
def overlapping_setitem():
  """Lets their Siamese ``t[:] = t[0]`` (utils.py's rand_* functions) run on torch 2.x.

  torch 1.2, which their requirements.txt pins, copied a view of a tensor into the same
  tensor; torch 2.x refuses ("some elements of the input tensor and the written-to tensor
  refer to a single memory location"). Here the value is cloned first when it shares the
  target's storage, which gives torch 1.2's result (every row equal to row 0).
  """
  original = torch.Tensor.__setitem__

  def setitem(self, index, value):
    if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() == self.untyped_storage().data_ptr():
      value = value.clone()
    return original(self, index, value)

  torch.Tensor.__setitem__ = setitem
  try:
    yield
  finally:
    torch.Tensor.__setitem__ = original


def reference_dm(ref_utils, x_train, y_train, init_idx, *, budgets, seed, width, dsa_strategy, image_lr, batch_real,
                 ipc):
  """DM with their components; yields ``(iterations, images NHWC, loss_avg, seconds_per_iteration)`` at each budget."""
  torch.manual_seed(seed)
  images_all = torch.from_numpy(np.ascontiguousarray(x_train.transpose(0, 3, 1, 2)))  # NCHW, as their loaders give
  indices_class = [np.flatnonzero(y_train == c) for c in range(N_CLASSES)]
  perm_rng = np.random.RandomState(seed)
  dsa_rng = np.random.default_rng([seed, 1])
  param = ref_utils.ParamDiffAug()
  use_dsa = dsa_strategy not in ("none", "None")
  model = REFERENCE_MODELS[width]
  channel, im_size = 1, (28, 28)

  def get_images(c, n):  # main_DM.py lines 81-83
    return images_all[perm_rng.permutation(indices_class[c])[:n]]

  # main_DM.py lines 90-96 and 101-103: the set starts from the chosen real images; SGD(lr_img, momentum 0.5).
  image_syn = images_all[init_idx].clone().requires_grad_(True)
  optimizer_img = torch.optim.SGD([image_syn], lr=image_lr, momentum=0.5)
  optimizer_img.zero_grad()
  times = []
  with seeded_clock(ref_utils, seed), overlapping_setitem():
    for it in range(max(budgets)):
      t0 = time.perf_counter()
      # main_DM.py lines 138-163: a fresh random network, frozen; per class a real batch, one shared DSA seed.
      net = ref_utils.get_network(model, channel, N_CLASSES, im_size)
      net.train()
      for p in net.parameters():
        p.requires_grad = False
      loss = torch.tensor(0.0)
      for c in range(N_CLASSES):
        img_real = get_images(c, batch_real)
        img_syn = image_syn[c * ipc:(c + 1) * ipc].reshape((ipc, channel, *im_size))
        if use_dsa:
          dsa_seed = int(dsa_rng.integers(100000))  # main_DM.py: int(time.time() * 1000) % 100000
          img_real = ref_utils.DiffAugment(img_real, dsa_strategy, seed=dsa_seed, param=param)
          img_syn = ref_utils.DiffAugment(img_syn, dsa_strategy, seed=dsa_seed, param=param)
          # torch 2.x: their crop returns a 1-channel tensor with channels-last strides (which counts as contiguous),
          # the convolutions then keep that layout and ConvNet.embed's .view fails; torch 1.2 gave NCHW strides.
          img_real = img_real.clone(memory_format=torch.contiguous_format)
          img_syn = img_syn.clone(memory_format=torch.contiguous_format)
        output_real = net.embed(img_real).detach()
        output_syn = net.embed(img_syn)
        loss += torch.sum((torch.mean(output_real, dim=0) - torch.mean(output_syn, dim=0)) ** 2)
      # main_DM.py lines 191-197.
      optimizer_img.zero_grad()
      loss.backward()
      optimizer_img.step()
      loss_avg = loss.item() / N_CLASSES
      times.append(time.perf_counter() - t0)
      if it + 1 in budgets:
        per_it = statistics.mean(times[1:]) if len(times) > 1 else times[0]
        yield it + 1, image_syn.detach().numpy().transpose(0, 2, 3, 1).copy(), loss_avg, per_it


@contextlib.contextmanager
def contiguous_diff_augment(ref_utils):
  """Their ``DiffAugment`` followed by an NCHW-strided copy, wherever their code calls it (our loop, their ``epoch``).

  torch 2.x: their crop returns a 1-channel tensor with channels-last strides (which counts as contiguous, so their
  ``x.contiguous()`` keeps it), the convolutions keep that layout and ``ConvNet.forward``'s ``.view`` fails; torch 1.2
  gave NCHW strides. The same re-layout as the DM loop's, done by wrapping the module's function so that ``epoch``
  (which looks ``DiffAugment`` up in their module) gets it too.
  """
  original = ref_utils.DiffAugment

  def diff_augment(*a, **kw):
    return original(*a, **kw).clone(memory_format=torch.contiguous_format)

  ref_utils.DiffAugment = diff_augment
  try:
    yield
  finally:
    ref_utils.DiffAugment = original


def reference_dc(ref_utils, x_train, y_train, init_idx, *, budgets, seed, width, dsa_strategy, image_lr, batch_real,
                 network_lr, batch_train, outer_loop, inner_loop, ipc):
  """DC (``dsa_strategy`` 'none') or DSA with their components, mirroring main.py's training loop; yields
  ``(iterations, images NHWC, loss_avg, seconds_per_iteration)`` at each budget."""
  torch.manual_seed(seed)
  images_all = torch.from_numpy(np.ascontiguousarray(x_train.transpose(0, 3, 1, 2)))  # NCHW, as their loaders give
  indices_class = [np.flatnonzero(y_train == c) for c in range(N_CLASSES)]
  perm_rng = np.random.RandomState(seed)
  dsa_rng = np.random.default_rng([seed, 1])
  use_dsa = dsa_strategy not in ("none", "None")
  # main.py lines 35-38: the fields of ``args`` that match_loss and epoch read; args.dsa from the method.
  args = types.SimpleNamespace(device="cpu", dis_metric="ours", dsa=use_dsa, dsa_strategy=dsa_strategy if use_dsa
                               else "None", dsa_param=ref_utils.ParamDiffAug(), dc_aug_param=None)
  model = REFERENCE_MODELS[width]
  channel, im_size = 1, (28, 28)

  def get_images(c, n):  # main.py lines 79-81
    return images_all[perm_rng.permutation(indices_class[c])[:n]]

  # main.py lines 88-94 (``--init real``; the chosen real images) and 100-102: SGD(lr_img, momentum 0.5), CE loss.
  image_syn = images_all[init_idx].clone().requires_grad_(True)
  label_syn = torch.tensor(np.repeat(np.arange(N_CLASSES), ipc), dtype=torch.long)
  optimizer_img = torch.optim.SGD([image_syn], lr=image_lr, momentum=0.5)
  optimizer_img.zero_grad()
  criterion = torch.nn.CrossEntropyLoss()
  times = []
  with seeded_clock(ref_utils, seed), overlapping_setitem(), contiguous_diff_augment(ref_utils):
    for it in range(max(budgets)):
      t0 = time.perf_counter()
      # main.py lines 147-153: a fresh random network, SGD(lr_net) on it.
      net = ref_utils.get_network(model, channel, N_CLASSES, im_size)
      net.train()
      net_parameters = list(net.parameters())
      optimizer_net = torch.optim.SGD(net.parameters(), lr=network_lr)
      optimizer_net.zero_grad()
      loss_avg = 0.0
      for ol in range(outer_loop):  # main.py lines 156-216
        # main.py lines 158-174 (freezing BatchNorm statistics) do nothing for ConvNet: instance norm, no BatchNorm.
        # main.py lines 177-199: per class, their match_loss between the CE gradients on a real batch and on the
        # synthetic images, with one DSA seed per class shared by both.
        loss = torch.tensor(0.0)
        for c in range(N_CLASSES):
          img_real = get_images(c, batch_real)
          lab_real = torch.ones((img_real.shape[0],), dtype=torch.long) * c
          img_syn = image_syn[c * ipc:(c + 1) * ipc].reshape((ipc, channel, *im_size))
          lab_syn = torch.ones((ipc,), dtype=torch.long) * c
          if use_dsa:
            dsa_seed = int(dsa_rng.integers(100000))  # main.py line 186: int(time.time() * 1000) % 100000
            img_real = ref_utils.DiffAugment(img_real, args.dsa_strategy, seed=dsa_seed, param=args.dsa_param)
            img_syn = ref_utils.DiffAugment(img_syn, args.dsa_strategy, seed=dsa_seed, param=args.dsa_param)
          output_real = net(img_real)
          loss_real = criterion(output_real, lab_real)
          gw_real = torch.autograd.grad(loss_real, net_parameters)
          gw_real = list(g.detach().clone() for g in gw_real)
          output_syn = net(img_syn)
          loss_syn = criterion(output_syn, lab_syn)
          gw_syn = torch.autograd.grad(loss_syn, net_parameters, create_graph=True)
          loss += ref_utils.match_loss(gw_syn, gw_real, args)
        # main.py lines 201-207.
        optimizer_img.zero_grad()
        loss.backward()
        optimizer_img.step()
        loss_avg += loss.item()
        if ol == outer_loop - 1:
          break
        # main.py lines 210-215: inner_loop epochs of their ``epoch`` over the synthetic set, mini-batches of
        # batch_train, shuffled, DSA (per image, no shared seed) for DSA. (At ipc 1 outer_loop is 1: never reached.)
        image_syn_train, label_syn_train = copy.deepcopy(image_syn.detach()), copy.deepcopy(label_syn.detach())
        dst_syn_train = ref_utils.TensorDataset(image_syn_train, label_syn_train)
        trainloader = torch.utils.data.DataLoader(dst_syn_train, batch_size=batch_train, shuffle=True, num_workers=0)
        for _ in range(inner_loop):
          ref_utils.epoch("train", trainloader, net, optimizer_net, criterion, args, aug=use_dsa)
      loss_avg /= N_CLASSES * outer_loop  # main.py line 218
      times.append(time.perf_counter() - t0)
      if it + 1 in budgets:
        per_it = statistics.mean(times[1:]) if len(times) > 1 else times[0]
        yield it + 1, image_syn.detach().numpy().transpose(0, 2, 3, 1).copy(), loss_avg, per_it


def reference_embed_dim(ref_utils, width):
  net = ref_utils.get_network(REFERENCE_MODELS[width], 1, N_CLASSES, (28, 28))
  return int(net.embed(torch.zeros(1, 1, 28, 28)).shape[1])


# ---------------------------------------------------------------------------------------------------------------
# Our side: distill_dm, started from the same images
# ---------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def fixed_initial_images(images, module=dm):
  """Makes ``module.distill_*`` (``dm`` or ``dc``; both call the ``initial_images`` they import from
  ``labelled``) start from ``images`` (class-major) instead of their own random real pick."""
  original, used = module.initial_images, []

  def pick(data, key, ipc, init):
    used.append(True)
    return jnp.asarray(images, data.images.dtype)

  module.initial_images = pick
  try:
    yield used
  finally:
    module.initial_images = original


def _seconds_per_iteration(hist):
  return (hist[-1]["seconds"] - hist[0]["seconds"]) / (len(hist) - 1) if len(hist) > 1 else hist[0]["seconds"]


def ours_dm(x_train, y_train, init_images, *, iterations, seed, width, dsa_strategy, image_lr, batch_real, ipc):
  with fixed_initial_images(init_images) as used:
    result = dm.distill_dm(x_train, y_train, ipc=ipc, seed=seed, network="convnet", width=width, iterations=iterations,
                           image_lr=image_lr, batch_real=batch_real, dsa=dsa_strategy not in ("none", "None"),
                           dsa_strategy=dsa_strategy if dsa_strategy not in ("none", "None") else
                           augment.DSA_STRATEGY_DIGITS)
  assert used, "distill_dm did not take the given initial images"
  hist = result.history
  return result.images, hist[-1]["loss"], _seconds_per_iteration(hist)


def ours_dc(x_train, y_train, init_images, *, iterations, seed, width, dsa_strategy, image_lr, batch_real,
            network_lr, batch_train, outer_loop, inner_loop, ipc):
  """``distill_dc`` (DSA: ``dsa=True``) from ``init_images``. ``batch_train`` is not an option of ours: its network
  steps are full-batch, the same as one mini-batch of 256 for sets of at most 256 images."""
  del batch_train
  use_dsa = dsa_strategy not in ("none", "None")
  with fixed_initial_images(init_images, dc) as used:
    result = dc.distill_dc(x_train, y_train, ipc=ipc, seed=seed, network="convnet", width=width, iterations=iterations,
                           dsa=use_dsa, dsa_strategy=dsa_strategy if use_dsa else augment.DSA_STRATEGY_DIGITS,
                           image_lr=image_lr, network_lr=network_lr, batch_real=batch_real, init="real",
                           outer_loop=outer_loop, inner_loop=inner_loop)
  assert used, "distill_dc did not take the given initial images"
  hist = result.history
  return result.images, hist[-1]["loss"], _seconds_per_iteration(hist)


def ours_embed_dim(width):
  net = networks.get_network("convnet", N_CLASSES, width=width)
  params = networks.init_params(net, jax.random.key(0), (28, 28, 1))
  return int(net.apply({"params": params}, jnp.zeros((1, 28, 28, 1)), method="embed").shape[1])


# ---------------------------------------------------------------------------------------------------------------
# Evaluation, output
# ---------------------------------------------------------------------------------------------------------------

def evaluate(images, test, *, seed, width, runs, epochs, eval_dsa, ipc):
  module = networks.get_network("convnet", N_CLASSES, width=width)
  aug = functools.partial(augment.dsa_per_image, strategy=augment.DSA_STRATEGY_DIGITS) if eval_dsa else None
  out = train.evaluate_synset(np.asarray(images, np.float32), np.repeat(np.arange(N_CLASSES), ipc), test,
                              seed=1000 + seed, network=module, runs=runs, epochs=epochs, augment=aug)
  return dict(acc_mean=out["mean"], acc_std=out["std"], accuracies=out["accuracies"], eval_seconds=out["seconds"])


def summary(rows):
  """Markdown: per (method, iterations, side), the mean and std over seeds of the per-seed mean accuracy, and
  s/iteration (rows without a method, from before --method, are DM)."""
  groups = {}
  for r in rows:
    groups.setdefault((r.get("method", "dm"), r["iterations"], r["side"]), []).append(r)
  table = []
  for (method, its, side), rs in sorted(groups.items(), key=lambda kv: kv[0]):
    accs = [100 * r["acc_mean"] for r in rs]
    spi = [r["seconds_per_iteration"] for r in rs if r.get("seconds_per_iteration") is not None]
    table.append([method, its, side, len(rs), f"{statistics.mean(accs):.2f}",
                  f"{statistics.pstdev(accs):.2f}" if len(accs) > 1 else "-",
                  " ".join(f"{a:.1f}" for a in accs), statistics.median(spi) if spi else None])
  return _common.markdown_table(["method", "iterations", "side", "seeds", "acc % (mean over seeds)", "std over seeds",
                                 "per seed", "s / iteration"], table)


def main():
  parser = _common.argument_parser(__doc__)
  parser.add_argument("--reference_dir", required=True, help="exported snapshot of VICO-UoE/DatasetCondensation")
  parser.add_argument("--method", default="dm", choices=sorted(METHOD_DEFAULTS),
                      help="dm (main_DM.py), dc or dsa (main.py --method DC / DSA)")
  parser.add_argument("--iterations", default="10,50,200", help="budgets, comma-separated")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--ipc", type=int, default=1, help="images per class")
  parser.add_argument("--width", type=int, default=32, choices=sorted(REFERENCE_MODELS))
  parser.add_argument("--sides", default="reference,ours")
  parser.add_argument("--dsa_strategy", default=None,
                      help=f"'none' for no DSA; default per method: dm {REFERENCE_DSA_STRATEGY}, dsa "
                           f"{REFERENCE_DSA_STRATEGY_DIGITS} (their readme's string for MNIST), dc none")
  parser.add_argument("--image_lr", type=float, default=None, help="default: dm 1.0 (main_DM.py), dc/dsa 0.1 (main.py)")
  parser.add_argument("--batch_real", type=int, default=256)
  parser.add_argument("--network_lr", type=float, default=0.01, help="dc/dsa: main.py's lr_net")
  parser.add_argument("--batch_train", type=int, default=256, help="dc/dsa: main.py's batch_train (reference side)")
  parser.add_argument("--outer_loop", type=int, default=None, help="dc/dsa: default their get_loops(ipc)")
  parser.add_argument("--inner_loop", type=int, default=None, help="dc/dsa: default their get_loops(ipc)")
  parser.add_argument("--eval_runs", type=int, default=10)
  parser.add_argument("--eval_epochs", type=int, default=300)
  parser.add_argument("--eval_dsa", action="store_true", help="train the evaluation networks with per-image DSA")
  parser.add_argument("--no_init_row", action="store_true", help="skip evaluating the initial real images")
  parser.add_argument("--out", default=str(_common.RESULTS / "supervised_parity.json"))
  args = parser.parse_args()
  for name, value in METHOD_DEFAULTS[args.method].items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  if args.method == "dc" and args.dsa_strategy not in ("none", "None"):
    parser.error("--method dc runs without DSA (main.py: args.dsa is False for DC); use --method dsa")
  if args.method == "dsa" and args.dsa_strategy in ("none", "None"):
    parser.error("--method dsa needs a DSA strategy")
  budgets = sorted({int(v) for v in args.iterations.split(",")})
  seeds = [int(v) for v in args.seeds.split(",")]
  sides = [s for s in args.sides.split(",") if s]

  ref_utils, stubbed = import_reference(args.reference_dir)
  if args.method != "dm":
    loops = ref_utils.get_loops(args.ipc)  # main.py line 35
    args.outer_loop = loops[0] if args.outer_loop is None else args.outer_loop
    args.inner_loop = loops[1] if args.inner_loop is None else args.inner_loop
  x_train, y_train, x_test, y_test, prep = load_standardised(args.data_dir)
  test = (x_test, y_test)
  meta = _common.machine()
  print(_common.header(meta), flush=True)
  config = dict(vars(args), budgets=budgets, seeds=seeds, sides=sides, dataset="mnist",
                preprocessing=prep, torchvision_stub=stubbed, reference_model=REFERENCE_MODELS[args.width],
                evaluator="udd_jax.supervised.train.evaluate_synset", eval_network=f"udd_jax convnet width {args.width}",
                eval_seed="1000 + seed (both sides)",
                embed_dim=dict(reference=reference_embed_dim(ref_utils, args.width), ours=ours_embed_dim(args.width)))
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  rows = []

  def record(row):
    row = dict(method=args.method, **row)
    rows.append(row)
    print(f"  {row['method']} {row['side']:9s} it={row['iterations']:4d} seed={row['seed']}: "
          f"acc {100 * row['acc_mean']:.2f} +- {100 * row['acc_std']:.2f}%  "
          f"s/it {row.get('seconds_per_iteration') or 0:.3f}  loss {row.get('final_loss')}",
          flush=True)
    _common.write_json(out, meta, rows, config=config)

  eval_kw = dict(width=args.width, runs=args.eval_runs, epochs=args.eval_epochs, eval_dsa=args.eval_dsa, ipc=args.ipc)
  dm_kw = dict(width=args.width, dsa_strategy=args.dsa_strategy, image_lr=args.image_lr, batch_real=args.batch_real,
               ipc=args.ipc)
  if args.method == "dm":
    reference_run, ours_run = reference_dm, ours_dm
  else:
    reference_run, ours_run = reference_dc, ours_dc
    dm_kw.update(network_lr=args.network_lr, batch_train=args.batch_train, outer_loop=args.outer_loop,
                 inner_loop=args.inner_loop)
  for seed in seeds:
    init_idx = initial_indices(y_train, seed, args.ipc)
    init_images = x_train[init_idx]
    print(f"seed {seed}: initial images = training rows {init_idx.tolist()}", flush=True)
    common = dict(seed=seed, init_rows=init_idx.tolist())
    if not args.no_init_row:
      record(dict(side="init", iterations=0, **common, **evaluate(init_images, test, seed=seed, **eval_kw)))
    if "reference" in sides:
      for its, images, loss, per_it in reference_run(ref_utils, x_train, y_train, init_idx, budgets=budgets, seed=seed,
                                                    **dm_kw):
        record(dict(side="reference", iterations=its, **common, final_loss=loss, seconds_per_iteration=per_it,
                    **evaluate(images, test, seed=seed, **eval_kw)))
    if "ours" in sides:
      for its in budgets:
        images, loss, per_it = ours_run(x_train, y_train, init_images, iterations=its, seed=seed, **dm_kw)
        record(dict(side="ours", iterations=its, **common, final_loss=loss, seconds_per_iteration=per_it,
                    **evaluate(images, test, seed=seed, **eval_kw)))
  print()
  loops = (f", network_lr {args.network_lr}, batch_train {args.batch_train}, loops {args.outer_loop}/{args.inner_loop}"
           if args.method != "dm" else "")
  print(f"{args.method.upper()}, MNIST, ipc {args.ipc}, width {args.width}, DSA '{args.dsa_strategy}', "
        f"image_lr {args.image_lr}, batch_real {args.batch_real}{loops}; evaluator: evaluate_synset, convnet width "
        f"{args.width}, {args.eval_runs} runs x {args.eval_epochs} epochs{' + DSA' if args.eval_dsa else ''}, "
        f"seed 1000+s")
  print(summary(rows))
  _common.write_json(out, meta, rows, config=config, table=summary(rows))


if __name__ == "__main__":
  main()
