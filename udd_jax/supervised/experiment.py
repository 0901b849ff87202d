"""One supervised distillation run, end to end: the logic behind ``experiments/supervised.py``.

``run`` loads a dataset, preprocesses it, distils a labelled set with one method (or
picks a coreset baseline), evaluates it DC-BENCH style (networks trained from scratch on
the set, ``eval_runs`` inits, with and without DSA, other architectures beside), and
writes everything into ``workdir``: ``result.npz`` (the set, its labels, config,
history and learned step sizes), ``images.png`` (a grid, one row per class),
``evaluation.json`` and ``report.md``. A run whose ``result.npz`` exists is not
distilled again: only its evaluation is (re)done, so a stopped evaluation loses nothing.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import time
from typing import Any

import jax
import numpy as np

from udd_jax import _validation, io
from udd_jax import reporting
from udd_jax.data import load_dataset
from udd_jax.supervised import artifacts, augment, base, compare, coresets, dd, kip, networks, train, zca
from udd_jax.supervised.methods import DISTILLERS as REGISTRY
from udd_jax.supervised.result import SupervisedResult

DISTILLERS = tuple(REGISTRY)
CORESETS = ("random", "herding", "kcenter")
CHECKPOINT = "checkpoint.npz"  # in the workdir: a distillation's progress, saved every 5 minutes
# An unsupervised distilled set (udd_jax.distill's distilled.npz, --opt source=...) labelled by
# its nearest real training images: it enters the same evaluation table.
EXTERNAL = ("udd",)
METHODS = DISTILLERS + CORESETS + EXTERNAL


def _standardise(x_train: np.ndarray) -> tuple[Any, dict[str, Any]]:
  """Scalar mean / std of the training pixels (DC's MNIST normalisation, 0.1307 / 0.3081)."""
  mean, std = float(x_train.mean()), float(x_train.std())
  return (lambda x: ((np.asarray(x, np.float32) - mean) / std)[..., None]), dict(
      method="standardize", mean=mean, std=std)


def _distil(method: str, x: np.ndarray, y: np.ndarray, *, ipc: int, network: str, width: int, iterations: int | None,
            max_seconds: float | None, seed: int, workdir: pathlib.Path, options: dict[str, Any],
            preprocessing: dict[str, Any]) -> SupervisedResult:
  entry = REGISTRY[method]
  kwargs = dict(ipc=ipc, seed=seed, max_seconds=max_seconds, callback=_progress(method))
  if iterations:
    kwargs["iterations"] = iterations
  # The options may name another network to distil with than the one evaluated (DD's LeNet).
  net_options = dict(network=network, width=width) | {k: options.pop(k) for k in ("network", "width") if k in options}
  if entry.network:
    kwargs |= net_options
  if entry.preprocessing:
    kwargs["preprocessing"] = preprocessing
  if entry.workdir:
    kwargs["workdir"] = workdir
  if entry.checkpoint:  # a stopped run resumes from here; the tag refuses a checkpoint of other flags
    run = {k: v for k, v in kwargs.items() if k not in ("callback", "max_seconds", "workdir")}
    tag = json.dumps(dict(method=method, **run, options=options), sort_keys=True, default=str)
    kwargs["checkpoint"] = base.Checkpoint(workdir / CHECKPOINT, tag=tag)
  return entry.distill(x, y, **kwargs, **options)


def _progress(method: str):
  t0 = time.perf_counter()

  def callback(iteration: int, record: dict[str, float]) -> None:
    # The run's seconds (a resumed run's count those of its earlier calls too), else this call's.
    seconds = record.get("seconds", time.perf_counter() - t0)
    shown = ", ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float) and k != "seconds")
    print(f"{method} iteration {iteration} ({seconds:.0f} s): {shown}", flush=True)

  return callback


def _grid(result: SupervisedResult, path: pathlib.Path, title: str) -> None:
  """One row per class (images sorted by label), pixels mapped back to [0, 1] when standardised."""
  images = np.asarray(result.images)[..., 0]
  labels = np.asarray(result.labels)
  order = np.argsort(labels.argmax(-1) if labels.ndim == 2 else labels, kind="stable")
  prep = result.config.get("preprocessing") or {}
  if prep.get("method") == "standardize":
    images, clip = images * prep["std"] + prep["mean"], (0.0, 1.0)
  else:
    clip = None
  reporting.image_grid(images[order], path, title=title, clip=clip)


def run(*, method: str, dataset: str, data_dir: str | None, ipc: int, network: str = "convnet", width: int = 128,
        iterations: int | None = None, max_seconds: float | None = None, seed: int | jax.Array = 0, workdir: str,
        eval_runs: int = 5, eval_epochs: int = 300, eval_dsa: bool = True, cross_arch: tuple[str, ...] = (),
        options: dict[str, Any] | None = None) -> dict[str, Any]:
  """Distils (or picks a coreset), evaluates and writes a workdir; returns the evaluation dict.

  The set goes to ``<workdir>/result.npz``; a workdir that has one is only evaluated. A
  distillation saves its progress to ``<workdir>/checkpoint.npz`` every 5 minutes and when
  stopped (SIGTERM, Ctrl-C, an error), and the same command resumes it; other flags with
  that workdir are refused (:class:`~udd_jax.supervised.base.Checkpoint`).

  Args:
    method: one of ``METHODS``: a distiller (``dd``, ``dc``, ``dsa``, ``dm``, ``mtt``,
      ``kip``, ``gtn``), a coreset baseline (``random``, ``herding``, ``kcenter``), or
      ``udd``: the unsupervised distilled set ``options["source"]`` (a ``distilled.npz``)
      with the labels of its nearest real training images, ``ipc`` per class unless
      ``options["labels"]`` is ``"nearest"`` (:func:`compare.from_unsupervised`).
    dataset: ``mnist``, ``fashion_mnist``, ``usps`` or ``digits`` (embedded).
    data_dir: directory with ``<dataset>.npz`` (default ``$UDD_DATA_DIR``).
    ipc: images per class.
    network: network the method distils with and the evaluation trains (``NETWORKS``).
    width: its channels (ConvNet) or hidden units (MLP), in distillation and evaluation;
      the ``cross_arch`` networks keep their default width.
    iterations: the method's outer iterations (None: its default).
    max_seconds: wall-time budget of the distillation (None: none).
    seed: int seed or PRNG key of the distillation; evaluation uses ``seed + 1000`` onwards
      (``fold_in(key, 1000)`` for a key).
    workdir: output directory.
    eval_runs: networks trained from scratch per evaluation row.
    eval_epochs: epochs of each (DC-BENCH schedule of ``train.evaluate_synset``).
    eval_dsa: also evaluate with DSA augmentation during training.
    cross_arch: other networks to evaluate the same set on.
    options: extra keyword options of the method's function.
  """
  _validation.check_choice(method, "method", METHODS)
  _validation.check_choice(network, "network", networks.NETWORKS)
  for name in cross_arch:
    _validation.check_choice(name, "cross_arch network", networks.NETWORKS)
  ipc = _validation.check_positive_int(ipc, "ipc")
  width = _validation.check_positive_int(width, "width")
  eval_runs = _validation.check_non_negative_int(eval_runs, "eval_runs")
  eval_epochs = _validation.check_positive_int(eval_epochs, "eval_epochs")
  base.as_key(seed, "seed")
  if iterations is not None:
    iterations = _validation.check_positive_int(iterations, "iterations")
  options = dict(options or {})
  if method == "udd" and "source" not in options:
    raise ValueError("method 'udd' evaluates an unsupervised distilled set: give its path as options['source'] "
                     "(--opt source=runs/.../distilled.npz).")
  workdir_path = pathlib.Path(workdir)
  workdir_path.mkdir(parents=True, exist_ok=True)

  (x_train, y_train), (x_test, y_test) = load_dataset(dataset, data_dir=data_dir)
  prepare, prep_config = _preprocessing(method, x_train, options)
  z_train, z_test = prepare(x_train), prepare(x_test)

  result = _distilled_set(method, dataset, z_train, y_train, prepare, prep_config, ipc=ipc, network=network, width=width,
                          iterations=iterations, max_seconds=max_seconds, seed=seed, workdir=workdir_path, options=options)
  _grid(result, workdir_path / "images.png", f"{method}, {dataset}, {ipc} per class")

  test = (z_test, y_test)
  rows = _evaluation_rows(result, test, network=network, width=width, cross_arch=cross_arch, eval_dsa=eval_dsa,
                          eval_runs=eval_runs, eval_epochs=eval_epochs, seed=seed, n_classes=int(y_train.max()) + 1)
  evaluation = dict(method=method, dataset=dataset, ipc=ipc, network=network, width=width, rows=rows, eval_runs=eval_runs, eval_epochs=eval_epochs,
                    iterations=result.config.get("iterations"), distill_seconds=result.config.get("seconds"))
  if method == "kip":
    evaluation["krr_accuracy"] = float(kip.kip_accuracy(result, test))
    print(f"KIP kernel ridge regression accuracy: {100 * evaluation['krr_accuracy']:.2f}%", flush=True)
  if method == "dd" and eval_runs:
    evaluation["dd_recipe_accuracy"] = _dd_recipe_accuracy(result, test, seed, eval_runs)
  io.atomic_write_text(workdir_path / "evaluation.json", json.dumps(evaluation, indent=1))
  _write_report(workdir_path / "report.md", result, evaluation)
  return evaluation


def _preprocessing(method: str, x_train: np.ndarray, options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
  """The run's preprocessing (KIP's ZCA, else standardisation) and its record."""
  if method != "kip":
    return _standardise(x_train)
  kip_prep = zca.kip_preprocessing(x_train, zca_reg=options.pop("zca_reg", 0.1))
  options.setdefault("preprocessing", kip_prep)
  return (lambda x: np.asarray(kip_prep.apply(x), np.float32)[..., None]), kip_prep.config()


def _distilled_set(method, dataset, z_train, y_train, prepare, prep_config, *, ipc, network, width, iterations,
                   max_seconds, seed, workdir, options) -> SupervisedResult:
  """The workdir's ``result.npz`` if there is one; else the set distilled (or picked) now, saved there."""
  result_path = workdir / "result.npz"
  if result_path.is_file():
    print(f"{result_path} exists: evaluating it (delete it to distil again).", flush=True)
    return artifacts.load_result(result_path)
  t0 = time.perf_counter()
  if method in CORESETS:
    images, labels = coresets.coreset(z_train, y_train, ipc, method=method, seed=seed)
    result = SupervisedResult(images=images, labels=labels,
                              config=dict(method=method, ipc=ipc, seed=base.as_key(seed, "seed")[1], iterations=0,
                                          seconds=time.perf_counter() - t0))
  elif method == "udd":
    source, labels = options.pop("source"), options.pop("labels", "balanced")
    if options:
      raise ValueError(f"method 'udd' takes the options 'source' and 'labels'; got also {sorted(options)}.")
    result = compare.from_unsupervised(source, prepare, z_train, y_train, ipc=ipc, labels=labels)
  else:
    result = _distil(method, z_train, y_train, ipc=ipc, network=network, width=width, iterations=iterations,
                     max_seconds=max_seconds, seed=seed, workdir=workdir, options=options, preprocessing=prep_config)
  config = dict(result.config, dataset=dataset, preprocessing=prep_config, network=result.config.get("network", network))
  result = SupervisedResult(result.images, result.labels, config, result.history, result.step_sizes)
  artifacts.save_result(result, result_path)
  return result


def _evaluation_rows(result, test, *, network, width, cross_arch, eval_dsa, eval_runs, eval_epochs, seed,
                     n_classes) -> list[dict[str, Any]]:
  """One row per network and DSA setting: networks trained from scratch on the set, tested on ``test``."""
  rows = []
  # The DSA code drops flips for the MNIST family (a flipped digit is another symbol).
  dsa_fn = functools.partial(augment.dsa, strategy=augment.DSA_STRATEGY_DIGITS)
  for net in (network, *[n for n in cross_arch if n != network]):
    module = networks.get_network(net, n_classes, **({"width": width} if net == network else {}))
    for use_dsa in ((False, True) if eval_dsa else (False,)):
      if not eval_runs:
        break
      t0 = time.perf_counter()
      out = train.evaluate_synset(result.images, result.labels, test, seed=base.derived_key(seed, 1000), network=module, runs=eval_runs,
                                  epochs=eval_epochs, augment=dsa_fn if use_dsa else None)
      rows.append(dict(network=net, dsa=use_dsa, mean=float(out["mean"]), std=float(out["std"]),
                       accuracies=[float(a) for a in out["accuracies"]], seconds=time.perf_counter() - t0))
      print(f"evaluation {net}{' + DSA' if use_dsa else ''}: {100 * rows[-1]['mean']:.2f} +- "
            f"{100 * rows[-1]['std']:.2f}% ({eval_runs} runs, {eval_epochs} epochs)", flush=True)
  return rows


def _dd_recipe_accuracy(result: SupervisedResult, test, seed: Any, runs: int) -> list[float]:
  """DD is evaluated with its own learned recipe too: fresh inits trained by its unrolled steps."""
  cfg = result.config
  net = networks.get_network(cfg["network"], cfg["n_classes"], width=cfg["width"], depth=cfg["depth"])
  accs = []
  for r in range(runs):
    params = dd.retrain_dd(result, base.as_key(base.derived_key(seed, 2000 + r))[0])
    accs.append(float(train.accuracy(net, jax.tree.map(lambda a: a[None], params), *test)[0]))
  print(f"DD with its learned recipe: {100 * np.mean(accs):.2f} +- {100 * np.std(accs):.2f}%", flush=True)
  return accs


def _write_report(path: pathlib.Path, result: SupervisedResult, evaluation: dict[str, Any]) -> None:
  lines = [f"# {evaluation['method']} on {evaluation['dataset']}, {evaluation['ipc']} images per class", "",
           "## Settings", "", "```json", json.dumps(result.config, indent=1, default=str), "```", "",
           f"Budget: {evaluation['iterations']} iterations, {evaluation['distill_seconds'] or 0:.0f} s of distillation "
           f"(device: {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs).", "",
           "## Evaluation (networks trained from scratch on the set)", "",
           "| network | DSA during training | test accuracy (%) | runs | epochs | seconds |", "|---|---|---|---|---|---|"]
  for r in evaluation["rows"]:
    lines.append(f"| {r['network']} | {'yes' if r['dsa'] else 'no'} | {100 * r['mean']:.2f} +- {100 * r['std']:.2f} | "
                 f"{len(r['accuracies'])} | {evaluation['eval_epochs']} | {r['seconds']:.0f} |")
  if "krr_accuracy" in evaluation:
    lines += ["", f"KIP's own kernel ridge regression on the set: {100 * evaluation['krr_accuracy']:.2f}%"]
  if "dd_recipe_accuracy" in evaluation:
    accs = evaluation["dd_recipe_accuracy"]
    lines += ["", f"DD with its learned step sizes: {100 * np.mean(accs):.2f} +- {100 * np.std(accs):.2f}%"]
  lines += ["", "![distilled images](images.png)", ""]
  path.write_text("\n".join(lines))
