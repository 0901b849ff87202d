"""The experiment apps and their library side: flags, option checks, finished runs, keys."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest
from absl import flags

import numpy as np

import udd_jax
from udd_jax import app_flags, experiment
from udd_jax.driver import arguments

REPO = pathlib.Path(__file__).resolve().parents[1]
APPS = ("distill", "compare_solvers", "seed_table")
RUN = dict(dataset="digits", n_distill=10, n_hidden=8, steps=4, eval_every=0, eval_seeds=1, baselines=(),
           solver="unrolled", options=dict(unroll_steps=3), batch_size=64, log_every=2, checkpoint_every=2, progress=False)


def run_app(name, *args, cwd):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, str(REPO / "experiments" / f"{name}.py"), *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def test_config_differences_names_each_setting_with_old_and_new_values():
  saved = dict(n_hidden=8, steps=5, image_shape=[8, 8], solver_options=dict(mu=1.0, cg_steps=3), seed=0)
  new = dict(n_hidden=16, steps=9, image_shape=(8, 8), solver_options=dict(mu=2.0, damping=0.1), seed=0, init="real")
  assert experiment.config_differences(saved, new) == [
      "init: (not set) -> 'real'", "n_hidden: 8 -> 16", "solver_options.cg_steps: 3 -> (not set)",
      "solver_options.damping: (not set) -> 0.1", "solver_options.mu: 1.0 -> 2.0",
  ]
  assert experiment.config_differences(saved, saved | dict(steps=6), ignore=()) == ["steps: 5 -> 6"]
  assert experiment.config_differences(saved, dict(saved)) == []


@pytest.mark.parametrize("solver", ["pool", "unrolled"])
def test_unknown_option_is_refused_with_solver_and_problem_options_before_loading(tmp_path, solver):
  with pytest.raises(TypeError, match=rf"unknown option\(s\) \['bogus'\] for solver '{solver}'") as info:
    experiment.run(**(RUN | dict(workdir=str(tmp_path / "run"), solver=solver, options=dict(bogus=1))))
  message = str(info.value)
  for name in ("image_lr", "lr_schedule", "head", "head_l2", "sigma2", "noise_std", "init_scale", "inner_lr"):
    assert f"'{name}'" in message, name
  assert not (tmp_path / "run").exists()
  with pytest.raises(ValueError, match="lr_schedule"):
    experiment.run(**(RUN | dict(workdir=str(tmp_path / "run"), options=dict(lr_schedule="linear"))))
  with pytest.raises(ValueError, match="disagree"):
    experiment.run(**(RUN | dict(workdir=str(tmp_path / "run"), options=dict(lr_schedule="cosine"), lr_schedule="constant")))


def test_seeds_and_keys_are_both_accepted():
  args = dict(dataset="digits", workdir="unused", n_distill=5, n_hidden=4)
  assert experiment.check_run_args(**args, seed=3) == 3
  record = experiment.check_run_args(**args, seed=jax.random.key(3))
  assert record == jax.random.key_data(jax.random.key(3)).tolist()
  assert experiment.check_run_args(**args, seed=jax.random.PRNGKey(3)) == record
  with pytest.raises(ValueError, match="seed must be a non-negative integer"):
    experiment.check_run_args(**args, seed=-1)
  with pytest.raises(TypeError, match="seed must be an integer seed or a single PRNG key"):
    experiment.compare_solvers(**args, budget_seconds=1.0, seed=1.5)


def test_enum_list_flag_takes_comma_lists_of_its_choices_only():
  values = flags.FlagValues()
  app_flags.define_enum_list("pick", ["a"], ["a", "b", "c"], "Some letters.", flag_values=values)
  values(["prog", "--pick=b,c"])
  assert values.pick == ["b", "c"]
  values(["prog", "--pick="])
  assert values.pick == []
  with pytest.raises(flags.IllegalFlagValueError, match=r"unknown value\(s\) \['z'\]; valid options are \['a', 'b', 'c'\]"):
    values(["prog", "--pick=a,z"])
  assert "<a|b|c>,...: Some letters." in values["pick"].help


def test_every_experiment_is_an_absl_app():
  for path in (REPO / "experiments").glob("*.py"):
    assert "app.run(main)" in path.read_text(), f"{path.name} is not an absl app"


@pytest.mark.slow
@pytest.mark.parametrize("name", APPS)
def test_helpfull_lists_choices_and_defaults_and_starts_no_run(tmp_path, name):
  proc = run_app(name, "--helpfull", cwd=tmp_path)
  assert list(tmp_path.iterdir()) == [], "--helpfull wrote files"
  out = proc.stdout + proc.stderr
  assert "--workdir: (required)" in out
  assert "<digits|mnist_10k|mnist|fashion_mnist|usps>" in out
  if name != "seed_table":
    assert "--inner:\n    <ae|score_matching|denoising_score_matching|sliced_score_matching|linear_ae>" in out
  if name == "distill":
    assert "--solver: <implicit|penalty|pool|unrolled|value_function>: Solver.\n    (default: 'pool')" in out
    assert "pool 500" in out and "unrolled 300" in out and "penalty 600" in out
    for option in ("head_l2", "clip_images", "pool_size", "cg_steps", "unroll_steps", "inner_steps"):
      assert option in out.split("--opt:")[1].split("\n  --")[0], option  # the --opt help lists every option
    for flag in ("--init: <real|kmeans|random>", "--preprocessing: <none|standardize|zca>",
                 "--lr_schedule: <constant|cosine>", "--baselines:\n    <raw_pixels|random_w|"):
      assert flag in out, flag


@pytest.mark.slow
def test_app_refuses_an_unknown_opt_before_loading_data(tmp_path):
  proc = run_app("distill", f"--workdir={tmp_path / 'run'}", "--opt=bogus=1", cwd=tmp_path)
  last = proc.stderr.strip().splitlines()[-1]
  assert proc.returncode == 1 and last.startswith("TypeError: unknown option(s) ['bogus'] for solver 'pool'"), proc.stderr
  assert "'cg_steps'" in last and "the problem options are ['clip_images', 'head', 'head_l2', 'init_scale'" in last
  assert not (tmp_path / "run").exists()


def _finished(workdir: pathlib.Path, request: dict) -> None:
  workdir.mkdir()
  (workdir / "report.md").write_text("# saved report\n")
  (workdir / experiment.RUN_FILE).write_text(json.dumps(dict(request=request, summary=dict(honest_accuracy=0.5))))


def test_finished_run_allows_more_steps_or_another_evaluation_and_names_other_changes(tmp_path):
  request = dict(dataset="digits", n_hidden=8, eval_seeds=1, steps=4, options=dict(mu=1.0), baselines=[])
  assert experiment.finished_run(tmp_path / "none", request) == (None, [])
  _finished(tmp_path / "run", request)
  assert experiment.finished_run(tmp_path / "run", request) == (dict(honest_accuracy=0.5), [])
  assert experiment.finished_run(tmp_path / "run", request | dict(eval_seeds=3, steps=8))[1] == [
      "eval_seeds: 1 -> 3", "steps: 4 -> 8"]
  with pytest.raises(ValueError, match=r"another configuration \(n_hidden: 8 -> 16; options.mu: 1.0 -> 2.0\)"):
    experiment.finished_run(tmp_path / "run", request | dict(n_hidden=16, options=dict(mu=2.0)))


@pytest.mark.slow
def test_a_finished_run_asked_again_prints_its_report_and_recomputes_nothing(tmp_path, capsys):
  workdir = tmp_path / "run"
  summary = experiment.run(**(RUN | dict(workdir=str(workdir))))
  files = {p.name: p.stat().st_mtime_ns for p in workdir.iterdir()}
  assert {"run.json", "report.md", "evaluation.json", "distilled.npz"} <= set(files)
  capsys.readouterr()
  again = experiment.run(**(RUN | dict(workdir=str(workdir))))
  out = capsys.readouterr().out
  assert again == json.loads(json.dumps(summary))
  assert (workdir / "report.md").read_text() in out and "holds a finished run of this configuration" in out
  assert {p.name: p.stat().st_mtime_ns for p in workdir.iterdir()} == files  # nothing rewritten
  with pytest.raises(ValueError, match="n_distill: 10 -> 12"):
    experiment.run(**(RUN | dict(workdir=str(workdir), n_distill=12)))
  rerun = experiment.run(**(RUN | dict(workdir=str(workdir), rerun_evaluation=True)))
  assert "holds a finished run" not in capsys.readouterr().out
  # The distillation time of a re-evaluated run is its own, not only the resume's.
  assert rerun["distill_seconds"] >= summary["distill_seconds"]
  assert (workdir / "evaluation.json").stat().st_mtime_ns > files["evaluation.json"]


def test_a_list_of_int_labels_is_one_task_and_a_list_of_arrays_is_several():
  x = np.random.default_rng(0).uniform(size=(6, 4)).astype(np.float32)
  labels = [0, 1, 2, 0, 1, 2]
  for y in (labels, tuple(labels), [np.int64(v) for v in labels]):
    tasks = arguments.tasks_from_inputs(x, y)
    assert len(tasks) == 1 and tasks[0][1].tolist() == labels
  tasks = arguments.tasks_from_inputs(x, [np.array(labels), np.array(labels) % 2])
  assert [t[1].tolist() for t in tasks] == [labels, [0, 1, 0, 0, 1, 0]]
  tasks = arguments.tasks_from_inputs(x, [labels, [v % 2 for v in labels]])  # a list of lists: two tasks
  assert len(tasks) == 2
  with pytest.raises(ValueError, match=r"y \(task 0\)"):
    arguments.tasks_from_inputs(x, [0, 1, 2])  # one label per example, or the error names the task


@pytest.mark.slow
def test_distill_takes_a_python_list_of_int_labels():
  (x, y), _ = udd_jax.load_dataset("digits")
  x = x.reshape(len(x), -1)[:200]
  result = udd_jax.distill(x, [int(v) for v in y[:200]], n_distill=5, n_hidden=4, steps=2, solver="unrolled",
                           unroll_steps=2, batch_size=16, progress=False)
  assert result.images.shape == (5, 64)


def test_opt_help_lists_the_problem_options_and_each_solvers_options():
  text = app_flags.opt_help()
  for name in arguments.PROBLEM_OPTIONS + arguments.DRIVER_OPTIONS:
    assert name in text, name
  for name, cls in experiment.SOLVERS.items():
    part = text.split(f"{name}: ")[1].split(";")[0]
    assert part.rstrip(".").split(", ") == sorted(f.name for f in dataclasses.fields(cls)), name


def test_error_line_is_one_line_and_names_the_flag_to_change(tmp_path):
  with pytest.raises(FileNotFoundError) as info:
    udd_jax.load_dataset("mnist", data_dir=str(tmp_path))
  line = app_flags.error_line(info.value)
  assert line.startswith("FileNotFoundError: no data found for dataset 'mnist'") and "pass --data_dir=DIR" in line
  assert "\n" not in line and "UDD_DATA_DIR" in line
  assert app_flags.error_line(ValueError("two\nlines")) == "ValueError: two lines"
  values = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "Where.", flag_values=values)
  values(["prog", "--workdir=/proc/x"])
  error = FileNotFoundError(2, "No such file or directory", "/proc/x/sub")
  assert app_flags.error_line(error, values).startswith("FileNotFoundError: --workdir=/proc/x: [Errno 2]")
  assert "--workdir" not in app_flags.error_line(FileNotFoundError(2, "No such file", "/elsewhere"), values)


@pytest.mark.slow
@pytest.mark.parametrize("args, expected", [
    (["--n_distill=0"], "ValueError: n_distill must be a positive integer; got 0."),
    (["--workdir=/proc/x", "--steps=2", "--eval_seeds=0", "--eval_every=0"], "FileNotFoundError: --workdir=/proc/x: "),
    (["--dataset=mnist", "--data_dir=EMPTY"], "pass --data_dir=DIR"),
])
def test_a_bad_value_stops_the_app_with_one_line_and_no_traceback(tmp_path, args, expected):
  (tmp_path / "empty").mkdir()
  args = [a.replace("EMPTY", str(tmp_path / "empty")) for a in args]
  if not any(a.startswith("--workdir") for a in args):
    args.append(f"--workdir={tmp_path / 'run'}")
  proc = run_app("distill", *args, cwd=tmp_path)
  assert proc.returncode == 1, proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr
  errors = [line for line in proc.stderr.splitlines() if expected in line]
  assert len(errors) == 1 and errors[0] == proc.stderr.strip().splitlines()[-1], proc.stderr
  assert not (tmp_path / "run").exists()
