"""distill(), DistillResult, evaluate() and the experiment pipeline, on the embedded digits."""

import dataclasses
import json
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import udd_jax
from udd_jax import evaluation, experiment
from udd_jax.data.clustering import kmeans
from udd_jax.inner import learners
from udd_jax.training import recipes


from udd_jax import driver as distill_lib
from udd_jax.driver import build as build_lib


@pytest.fixture(scope="module")
def digits():
  return udd_jax.load_dataset("digits")


# The unrolled solver (the default is the pool): cheap per step, and it learns a recipe of its own.
FAST = dict(solver="unrolled", n_distill=10, n_hidden=16, unroll_steps=20, batch_size=64, progress=False, log_every=5,
            checkpoint_every=5)
# The default solver, the pool, small.
FAST_POOL = {k: v for k, v in FAST.items() if k not in ("solver", "unroll_steps")} | dict(pool_size=3, inner_steps=5)
UNROLLED_ONLY = ("solver", "unroll_steps")  # what to drop from FAST to run another solver


@pytest.mark.slow
def test_pipeline_on_digits_writes_artifacts_and_beats_random_features(tmp_path):
  summary = experiment.run(
      dataset="digits", workdir=str(tmp_path), n_distill=20, n_hidden=16, steps=60, eval_every=30, eval_seeds=3,
      baselines=("random_w",), solver="unrolled", options=dict(unroll_steps=50, inner_lr=0.08), progress=False,
  )
  for name in ("config.json", "metrics.jsonl", "checkpoint.npz", "distilled.npz", "distilled.png", "filters.png",
               "curves.png", "evaluation.json", "report.md"):
    assert (tmp_path / name).is_file(), name
  evaluation = json.loads((tmp_path / "evaluation.json").read_text())
  rows = {(r["name"], r["recipe"]): r for r in evaluation["rows"]}
  honest, own = rows["distilled D", "standard"], rows["distilled D", "D's recipe"]
  assert len(honest["accuracies"]) == len(honest["accuracies_standardized"]) == 3
  assert own["steps"] == 50 and honest["steps"] >= 4000  # the unroll's recipe; the standard one, to convergence
  assert own["mean"] > rows["random untrained W", ""]["mean"] + 0.01
  assert summary["honest_accuracy"] == pytest.approx(honest["mean"])
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines] == list(range(10, 61, 10))
  assert {"honest_accuracy", "recipe_accuracy"} <= set(json.loads(lines[-1]))
  report = (tmp_path / "report.md").read_text()
  assert "| distilled D | standard |" in report and "| distilled D | D's recipe |" in report
  assert "- standard: adam lr 0.003, >= 4000 full-batch steps until the gradient norm stops falling" in report


@pytest.mark.slow
def test_result_carries_the_recipe_and_round_trips(digits, tmp_path):
  (x, y), _ = digits
  result = udd_jax.distill(x, y, steps=10, seed=3, **FAST)
  assert result.images.shape == (10, 8, 8) and result.images.dtype == np.float32
  for key in ("inner_optimizer", "inner_lr", "steps", "init_scale"):
    assert key in result.config["recipe"]
  recipe = result.config["recipe"]
  assert recipe["inner_optimizer"] == "sgd" and len(recipe["inner_lr"]) == recipe["steps"] == 20
  path = result.save(tmp_path / "d.npz")
  with np.load(path) as f:  # the artifact says what wrote it and how to read it
    assert int(f["format_version"]) == distill_lib.FORMAT_VERSION
    assert str(f["library_version"]) == udd_jax.__version__
    assert str(f["preprocessing_method"]) == "none" and json.loads(str(f["config"]))["n_distill"] == 10
  loaded = udd_jax.load_distilled(path)
  chex.assert_trees_all_equal((loaded.images, loaded.params), (result.images, result.params))
  assert loaded.config == result.config and loaded.history == result.history
  assert loaded.recipe == result.recipe
  np.testing.assert_array_equal(loaded.preprocessing.apply(x[:5]), result.preprocessing.apply(x[:5]))


@pytest.mark.slow
def test_default_solver_is_the_pool_and_ships_the_standard_recipe(digits, tmp_path):
  (x, y), _ = digits
  result = udd_jax.distill(x, y, steps=10, seed=3, **FAST_POOL)
  assert result.config["solver"] == distill_lib.DEFAULT_SOLVER == "pool"
  assert result.config["problem_options"]["head"] == "ridge_ce"
  assert result.recipe == udd_jax.STANDARD_RECIPE  # lifetime 4000 Adam 3e-3 steps, until convergence
  assert result.params.W.shape == (64, 16)  # one learner (the oldest), not the stacked pool
  loaded = udd_jax.load_distilled(result.save(tmp_path / "d.npz"))
  assert loaded.recipe == udd_jax.STANDARD_RECIPE and loaded.config == result.config
  chex.assert_trees_all_equal(loaded.params, result.params)


@pytest.mark.slow
def test_load_distilled_errors(digits, tmp_path):
  with pytest.raises(FileNotFoundError, match="no distilled set"):
    udd_jax.load_distilled(tmp_path / "missing.npz")
  (x, y), _ = digits
  path = udd_jax.distill(x, y, steps=5, **FAST).save(tmp_path / "d.npz")
  data = path.read_bytes()
  (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match="truncated or corrupted"):
    udd_jax.load_distilled(tmp_path / "cut.npz")
  with np.load(path) as f:
    arrays = {k: f[k] for k in f.files}
  arrays["format_version"] = np.asarray(99)
  np.savez(tmp_path / "future.npz", **arrays)
  with pytest.raises(ValueError, match="format version 99"):
    udd_jax.load_distilled(tmp_path / "future.npz")
  np.savez(tmp_path / "no_version.npz", **{k: v for k, v in arrays.items() if k != "format_version"})
  with pytest.raises(ValueError, match="not a udd_jax distilled set: it has no format_version"):
    udd_jax.load_distilled(tmp_path / "no_version.npz")
  arrays["format_version"] = np.asarray(distill_lib.FORMAT_VERSION)
  np.savez(tmp_path / "no_images.npz", **{k: v for k, v in arrays.items() if k != "images"})
  with pytest.raises(ValueError, match=r"lacks the field\(s\) \['images'\]"):
    udd_jax.load_distilled(tmp_path / "no_images.npz")
  np.savez(tmp_path / "bad_config.npz", **(arrays | {"config": np.asarray('{"steps": 5')}))
  with pytest.raises(ValueError, match="corrupted config or history"):
    udd_jax.load_distilled(tmp_path / "bad_config.npz")


@pytest.mark.slow
@pytest.mark.parametrize("options", [
    FAST, FAST_POOL | dict(lifetime=20),
    FAST_POOL | dict(lifetime=20, pool_size=4, members="ae:16,denoising_score_matching:8")], ids=["unrolled", "pool", "mixed_pool"])
def test_resumed_run_equals_uninterrupted_run(digits, tmp_path, options):
  """The pool's lifetime of 20 inner steps: learners restart before, at and after the resume point.

  The mixed pool checkpoints one stack per member group, and ships the first group's learner.
  """
  (x, y), _ = digits
  straight = udd_jax.distill(x, y, steps=20, workdir=tmp_path / "a", **options)
  udd_jax.distill(x, y, steps=10, workdir=tmp_path / "b", **options)
  resumed = udd_jax.distill(x, y, steps=20, workdir=tmp_path / "b", **options)
  chex.assert_trees_all_equal((resumed.images, resumed.params), (straight.images, straight.params))
  assert [h["step"] for h in resumed.history] == [5, 10, 15, 20]
  assert resumed.params.W.shape == (64, 16)
  lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines] == [5, 10, 15, 20]


@pytest.mark.slow
def test_resume_refuses_another_configuration(digits, tmp_path):
  (x, y), _ = digits
  udd_jax.distill(x, y, steps=5, workdir=tmp_path, **FAST)
  with pytest.raises(ValueError, match="another configuration"):
    udd_jax.distill(x, y, steps=5, workdir=tmp_path, **(FAST | dict(n_hidden=8)))


@pytest.mark.slow
@pytest.mark.parametrize("solver", list(udd_jax.bilevel.SOLVERS))
def test_every_solver_through_distill_with_three_tasks(digits, solver):
  (x, y), _ = digits
  options = {k: v for k, v in FAST.items() if k not in UNROLLED_ONLY}
  if solver == "unrolled":
    options["unroll_steps"] = 10
  if solver == "implicit":
    options.update(inner_steps=10, cg_steps=5)
  if solver == "pool":
    options.update(pool_size=2, inner_steps=5, lifetime=20)
  result = udd_jax.distill(x, [y, y % 2, (y >= 5).astype(int)], steps=10, solver=solver, **options)
  assert result.config["n_classes"] == [10, 2, 2] and result.config["solver"] == solver
  assert np.all(np.isfinite(result.images))
  assert result.history[-1]["step"] == 10


@pytest.mark.slow
def test_tasks_as_pairs_of_datasets(digits):
  (x, y), (xt, yt) = digits
  result = udd_jax.distill([(x, y), (xt, yt % 2)], None, steps=5, **FAST)
  assert result.config["n_classes"] == [10, 2]


@pytest.mark.slow
def test_cosine_schedule_moves_the_images_less(digits):
  (x, y), _ = digits
  args = dict(FAST, log_every=1, checkpoint_every=1, steps=8, seed=1)
  constant = udd_jax.distill(x, y, **args)
  cosine = udd_jax.distill(x, y, lr_schedule="cosine", **args)
  assert cosine.config["solver_options"]["lr_schedule"] == "cosine" and cosine.config["solver_options"]["decay_steps"] == 8
  # Both start from the same real images; Adam's steps on D shrink to zero under the cosine schedule.
  start = build_lib.initial_images("real", jax.random.split(jax.random.key(1), 3)[0], x.reshape(len(x), -1), 10)
  travelled = [float(np.linalg.norm(r.images.reshape(10, -1) - start)) for r in (constant, cosine)]
  assert 0.0 < travelled[1] < 0.8 * travelled[0]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(n_distill=0), ValueError, "n_distill must be a positive integer"),
        (dict(n_hidden=2.5), TypeError, "n_hidden must be a positive integer"),
        (dict(solver="adam"), ValueError,
         r"unknown solver 'adam'; valid options are \['implicit', 'penalty', 'pool', 'unrolled', 'value_function'\]"),
        (dict(inner="vae"), ValueError, "unknown inner loss 'vae'"),
        (dict(init="zeros"), ValueError, "unknown init 'zeros'"),
        (dict(cg_iters=3), TypeError, r"unknown option\(s\) \['cg_iters'\]"),
        (dict(n_distill=5000), ValueError, "exceeds the 1437 real inputs"),
        (dict(eval_every=5), ValueError, "needs eval_data"),
        (dict(seed=-1), ValueError, "seed must be a non-negative integer"),
        (dict(lr_schedule="step"), ValueError, "unknown lr_schedule 'step'"),
        (dict(solver="unrolled", n_inits=0), ValueError, "n_inits must be a positive integer"),
        (dict(unroll_steps=5), TypeError, r"unknown option\(s\) \['unroll_steps'\] for solver 'pool'"),
        (dict(lifetime=3), ValueError, r"lifetime \(3\) must be at least inner_steps \(10\)"),
        (dict(steps=12, log_every=5), ValueError, r"steps \(12\) must be a multiple of log_every \(5\)"),
    ],
)
def test_distill_bad_options(digits, kwargs, error, match):
  (x, y), _ = digits
  args = dict(n_distill=10, n_hidden=8, steps=5, progress=False) | kwargs
  with pytest.raises(error, match=match):
    udd_jax.distill(x, y, **args)


def test_distill_bad_data(digits):
  (x, y), _ = digits
  with pytest.raises(ValueError, match=r"y \(task 0\) has 10 labels but the inputs have 1437 rows"):
    udd_jax.distill(x, y[:10], n_distill=5, n_hidden=4)
  bad = x.copy()
  bad[3, 2, 2] = np.nan
  with pytest.raises(ValueError, match=r"x \(task 0\) contains 1 non-finite"):
    udd_jax.distill(bad, y, n_distill=5, n_hidden=4)
  with pytest.raises(ValueError, match="resize them first"):
    udd_jax.distill([(x, y), (np.zeros((5, 4, 4)), np.zeros(5, int))], None, n_distill=5, n_hidden=4)
  with pytest.raises(ValueError, match="non-negative class labels"):
    udd_jax.distill(x, -np.ones(len(x), int), n_distill=5, n_hidden=4)


@dataclasses.dataclass(frozen=True)
class ExplodingPenalty(udd_jax.Penalty):
  """The penalty solver whose step size on D jumps from 1e-2 to 1e30 after ``good_steps`` steps."""

  good_steps: int = 7

  def image_transform(self, paired=False):
    return optax.sgd(lambda count: jnp.where(count < self.good_steps, 1e-2, 1e30))


@pytest.mark.slow
@pytest.mark.parametrize("good_steps", [7, 0])
def test_divergence_stops_with_a_clear_message(digits, tmp_path, good_steps):
  """A sane step size for ``good_steps`` steps, then 1e30: the run stops, the last good state stays on disk."""
  (x, y), _ = digits
  with pytest.raises(FloatingPointError) as info:
    udd_jax.distill(x, y, steps=20, workdir=tmp_path, solver=ExplodingPenalty(good_steps=good_steps), **{
        k: v for k, v in FAST.items() if k not in UNROLLED_ONLY})
  message = str(info.value)
  step = int(re.search(r"diverged at step (\d+): non-finite", message).group(1))
  assert good_steps < step <= good_steps + 3  # the first step whose metrics are not finite, not the chunk's end
  assert "image_grad_norm (the hypergradient's norm)" in message and "penalty" in message
  last_good = 5 if good_steps else 0  # checkpoints every 5 steps, and one at the start
  assert f"the last good checkpoint (step {last_good}) is {tmp_path / 'checkpoint.npz'}" in message
  assert f"its distilled set {tmp_path / 'distilled.npz'}" in message
  kept = udd_jax.load_distilled(tmp_path / "distilled.npz")
  assert [h["step"] for h in kept.history] == list(range(5, last_good + 1, 5))
  assert kept.config["diverged_at_step"] == step
  assert np.all(np.isfinite(kept.images)) and all(np.all(np.isfinite(p)) for p in kept.params)
  with np.load(tmp_path / "checkpoint.npz") as f:
    leaves = [f[k] for k in f.files if k.startswith("state/")]
  assert leaves and all(np.all(np.isfinite(a)) for a in leaves if a.dtype.kind == "f")


# Evaluation.


def test_recipe_validation_and_step_sizes():
  r = udd_jax.Recipe("sgd", (0.1, 0.2, 0.3), 3, 0.01)
  np.testing.assert_allclose(r.step_sizes(5), [0.1, 0.2, 0.3, 0.3, 0.3])
  assert udd_jax.Recipe.from_config(r.to_config()) == r
  standard = udd_jax.STANDARD_RECIPE
  assert (standard.inner_optimizer, standard.inner_lr, standard.steps, standard.init_scale) == ("adam", 3e-3, 4000, 0.01)
  assert standard.until_converged and standard.max_steps == 16000
  assert udd_jax.Recipe.from_config(standard.to_config()) == standard
  with pytest.raises(ValueError, match="needs one constant inner_lr"):
    udd_jax.Recipe("sgd", (0.1, 0.2), 2, until_converged=True)
  with pytest.raises(ValueError, match="max_steps applies only"):
    udd_jax.Recipe("sgd", 0.1, 2, max_steps=5)
  with pytest.raises(ValueError, match="max_steps \\(3\\) must be at least steps \\(4\\)"):
    udd_jax.Recipe("sgd", 0.1, 4, until_converged=True, max_steps=3)
  with pytest.raises(ValueError, match="3 per-step rates but steps is 4"):
    udd_jax.Recipe("sgd", (0.1, 0.2, 0.3), 4)
  with pytest.raises(ValueError, match="unknown inner_optimizer 'lbfgs'"):
    udd_jax.Recipe("lbfgs")


def test_retrain_follows_the_recipe_exactly():
  """Two SGD steps by hand equal retrain() with the same recipe and key."""
  learner = udd_jax.get_inner_learner("ae")
  images = jax.random.uniform(jax.random.key(0), (6, 5), jnp.float64)
  recipe = udd_jax.Recipe("sgd", (0.5, 0.25), 2, 0.3)
  key = jax.random.key(7)
  params, loss, _ = recipes.retrain(images, recipe, key, learner=learner, n_hidden=3)
  k_init, _ = jax.random.split(key)
  p = learner.init(k_init, 5, 3, init_scale=1.0, dtype=jnp.float64)
  p = p._replace(W=0.3 * p.W)
  for lr in (0.5, 0.25):
    p = jax.tree.map(lambda w, g: w - lr * g, p, jax.grad(udd_jax.ae_loss)(p, images))
  chex.assert_trees_all_close(params, p, rtol=1e-12)
  assert float(loss) == pytest.approx(float(udd_jax.ae_loss(p, images)))


def test_train_until_converged_stops_when_the_gradient_norm_stops_falling(monkeypatch):
  """Chunks continue while the gradient norm falls by CONVERGENCE_DROP; the cap and the minimum hold.

  On a quadratic, plain gradient steps of size lr shrink the gradient norm by exactly
  (1 - lr) per step, so the stopping point is known in advance.
  """
  monkeypatch.setattr(recipes, "CONVERGENCE_CHUNK", 10)

  grbm_learner = learners.GRBMLearner()

  @dataclasses.dataclass(frozen=True)
  class Quadratic(learners.InnerLearner):  # the GRBM's parameters, a quadratic loss
    name: str = "quadratic"

    def init(self, *args, **kwargs):
      return grbm_learner.init(*args, **kwargs)

    def loss(self, params, x, key):
      return 0.5 * sum(jnp.sum((w - 1.0) ** 2) for w in params)

    def features(self, params, x):
      return grbm_learner.features(params, x)

    def to_arrays(self, params):
      return grbm_learner.to_arrays(params)

    def from_arrays(self, arrays):
      return grbm_learner.from_arrays(arrays)

  quadratic = Quadratic()
  images = jnp.zeros((6, 5), jnp.float64)
  run = lambda lr, lo, hi: recipes.train_until_converged(images, jax.random.key(1), learner=quadratic, n_hidden=3, lr=lr,
                                                          init_scale=0.01, adam=False, min_steps=lo, max_steps=hi)
  params, _, gnorm, steps = run(0.1, 20, 200)  # (1 - 0.1)^10 = 0.35 per chunk: falling until the cap
  assert int(steps) == 200
  k_init, _ = jax.random.split(jax.random.key(1))
  p0 = quadratic.init(k_init, 5, 3, init_scale=0.01, dtype=jnp.float64)
  # Exactly 200 plain steps: w_T = 1 + 0.9^200 (w_0 - 1).
  chex.assert_trees_all_close(params, jax.tree.map(lambda w0: 1.0 + 0.9**200 * (w0 - 1.0), p0), rtol=1e-10)
  _, _, _, steps = run(1e-3, 20, 200)  # (1 - 1e-3)^10 = 0.99 per chunk: not a 5% drop, stops at the minimum
  assert int(steps) == 20
  _, _, _, steps = run(0.004, 20, 200)  # 0.96 per chunk: falls by 4%, stops at the minimum too
  assert int(steps) == 20
  _, _, _, steps = run(0.006, 20, 200)  # 0.94 per chunk: falls by 6%, runs on
  assert int(steps) == 200


@pytest.mark.slow
def test_raw_feature_head_is_the_raw_problem_solved_in_a_better_basis():
  """fit_logistic(standardize=False) minimises mean CE(f V + c) + l2/2 ||V||^2 on the raw features."""
  key_f, key_y = jax.random.split(jax.random.key(0))
  scales = jnp.asarray([1.0, 0.01, 10.0, 1e-4], jnp.float64)
  feats = jax.random.normal(key_f, (300, 4), jnp.float64) * scales + 0.5
  # The signal without the offset: feats / scales put every label in one class, a problem with no minimiser.
  labels = jnp.argmax((feats[:, :3] - 0.5) / scales[:3] + 0.5 * jax.random.normal(key_y, (300, 3), jnp.float64), axis=1)
  l2 = 1e-3
  head = evaluation.fit_logistic(feats, labels, 3, l2=l2, standardize=False, max_steps=2000, tol=1e-10)
  V, c = head.kernel / head.scale[:, None], head.bias - (head.mean / head.scale) @ head.kernel  # back to the raw basis
  onehot = jax.nn.one_hot(labels, 3, dtype=feats.dtype)
  raw = lambda p: jnp.mean(optax.softmax_cross_entropy(feats @ p[0] + p[1], onehot)) + 0.5 * l2 * jnp.sum(p[0] ** 2)
  grad = jax.grad(raw)((V, c))
  assert max(float(jnp.max(jnp.abs(g))) for g in grad) < 1e-8  # stationary for the raw objective: its minimiser
  np.testing.assert_array_equal(evaluation.logistic.predict(head, feats), jnp.argmax(feats @ V + c, axis=1))
  # The standardised head is another problem (penalty on standardised weights): another answer.
  other = evaluation.fit_logistic(feats, labels, 3, l2=l2, standardize=True, max_steps=2000, tol=1e-10)
  assert float(jnp.max(jnp.abs(other.kernel / other.scale[:, None] - V))) > 1e-3


@pytest.mark.slow
def test_recipe_transfers_to_another_learner_or_says_it_diverged(digits):
  """Plain-gradient step sizes rescale with K; a recipe that still diverges gives a marked row, never NaN accuracies."""
  sgd = udd_jax.Recipe("sgd", (0.2, 0.1), 2, 0.01)
  assert sgd.for_learner(256, made_for=128).inner_lr == (0.1, 0.05)
  assert sgd.for_learner(128, made_for=128) is sgd and sgd.for_learner(64, made_for=None) is sgd
  adam = udd_jax.Recipe("adam", 0.01, 2)
  assert adam.for_learner(256, made_for=128) is adam  # Adam's steps are scale-free
  (x, y), (xt, yt) = digits
  exploding = udd_jax.Recipe("sgd", 8.0, 30, 0.01)  # plain steps of 8 blow up a K = 64 learner on the digits
  quick = udd_jax.Recipe("adam", 0.01, 50, 0.01, until_converged=True, max_steps=50)
  report = udd_jax.evaluate(x[:10], (x, y), (xt, yt), n_hidden=64, n_seeds=2, baselines=(), recipe=exploding,
                            standard_recipe=quick, head_steps=100)
  standard, own = report.rows
  assert own.recipe == "D's recipe" and own.accuracies == [] and "diverged" in own.note
  assert "| distilled D | D's recipe | diverged | diverged |" in report.to_markdown()
  assert len(standard.accuracies) == 2 and all(np.isfinite(standard.accuracies))
  # The same recipe, made for a K = 4 learner, is rescaled by 4 / 64 to steps of 0.5, which train.
  rescaled = udd_jax.evaluate(x[:10], (x, y), (xt, yt), n_hidden=64, n_seeds=2, baselines=(), recipe=exploding,
                              recipe_n_hidden=4, standard_recipe=quick, head_steps=100)
  assert len(rescaled.rows[1].accuracies) == 2 and all(np.isfinite(rescaled.rows[1].accuracies))
  assert rescaled.settings["recipes"]["D's recipe"]["inner_lr"] == 0.5


def test_kmeans_recovers_separated_clusters():
  rng = np.random.default_rng(0)
  centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
  x = jnp.asarray(np.concatenate([c + 0.1 * rng.normal(size=(50, 2)) for c in centres]))
  found = np.asarray(kmeans(jax.random.key(0), x, 3))
  assert np.abs(np.sort(found, axis=0) - np.sort(centres, axis=0)).max() < 0.1


@pytest.mark.slow
def test_evaluate_report_and_errors(digits):
  (x, y), (xt, yt) = digits
  quick = udd_jax.Recipe("adam", 0.01, 100, 0.01, until_converged=True, max_steps=300)
  report = udd_jax.evaluate(x[:10], (x, y), (xt, yt), n_hidden=8, n_seeds=2, baselines=("raw_pixels",),
                            recipe=udd_jax.Recipe("adam", 0.01, 20), standard_recipe=quick, convergence_factor=10)
  assert [(r.name, r.recipe) for r in report.rows] == [
      ("distilled D", "standard"), ("distilled D", "D's recipe"), ("distilled D, 10x steps", "D's recipe"), ("raw pixels", "")]
  standard, own, longer = report.rows[:3]
  assert 100 <= standard.steps <= 300 and own.steps == 20 and longer.steps == 200
  assert standard.grad_norm < own.grad_norm  # trained further
  for row in report.rows:  # both probes, every seed
    assert len(row.accuracies) == len(row.accuracies_standardized) == (1 if row.name == "raw pixels" else 2)
  assert 0.5 < report["raw pixels"].mean <= 1.0
  text = str(report)
  assert "| raw pixels |  |" in text and "- D's recipe: adam lr 0.01, 20 full-batch steps, init 0.01 N(0, 1)" in text
  assert report.settings["recipes"] == {"standard": quick.to_config(), "D's recipe": udd_jax.Recipe("adam", 0.01, 20).to_config()}
  # A set that ships the standard recipe gets one learner row per set, not two.
  same = udd_jax.evaluate(x[:10], (x, y), (xt, yt), n_hidden=8, n_seeds=1, baselines=(), recipe=quick, standard_recipe=quick)
  assert [(r.name, r.recipe) for r in same.rows] == [("distilled D", "standard")]
  with pytest.raises(ValueError, match="must share one trailing shape"):
    udd_jax.evaluate(np.zeros((3, 4, 4)), (x, y), (xt, yt), n_hidden=8)
  with pytest.raises(ValueError, match="unknown baseline 'pca'"):
    udd_jax.evaluate(x[:3], (x, y), (xt, yt), n_hidden=8, baselines=("pca",))
  with pytest.raises(ValueError, match="n_seeds must be a positive integer"):
    udd_jax.evaluate(x[:3], (x, y), (xt, yt), n_hidden=8, n_seeds=0)
  with pytest.raises(TypeError, match="'seeds', which is now called 'n_seeds'"):
    udd_jax.evaluate(x[:3], (x, y), (xt, yt), n_hidden=8, seeds=2)


@pytest.mark.slow
def test_compare_solvers_and_seed_table_smoke(tmp_path):
  table = experiment.compare_solvers(
      dataset="digits", workdir=str(tmp_path / "cmp"), n_distill=10, n_hidden=8, budget_seconds=2.0,
      solvers=("penalty", "unrolled"), eval_seeds=1, options={"unrolled": dict(unroll_steps=10)},
  )
  assert table.count("\n") == 3 and "| penalty |" in table and "| unrolled |" in table
  assert "| adam lr 0.003, >= 4000 full-batch steps" in table  # penalty ships the standard recipe
  assert (tmp_path / "cmp" / "comparison.png").is_file()
  history = json.loads((tmp_path / "cmp" / "comparison.json").read_text())[0]["history"]
  assert history[-1]["wall_time"] >= 2.0 and "honest_accuracy" in history[-1]

  table = experiment.seed_table(dataset="digits", workdir=str(tmp_path / "seed"), n_distill=10, n_hidden=8, points=[3])
  rows = [line for line in table.splitlines()[2:]]
  assert len(rows) == 3 and [r.split("|")[2].strip() for r in rows] == ["3"] * 3


def test_parse_options():
  assert experiment.parse_options(["mu=1e2", "truncate=None", "name=x=y"]) == {"mu": 100.0, "truncate": None, "name": "x=y"}
  with pytest.raises(ValueError, match="must be key=value"):
    experiment.parse_options(["mu"])
  assert experiment.parse_transfer("K=256,inner=score_matching") == {"n_hidden": 256, "inner": "score_matching"}
  with pytest.raises(ValueError, match="transfer option 'lr' unknown"):
    experiment.parse_transfer("lr=3")


# What a new user tried (issue 15): each gets a clear error or works.


@pytest.mark.slow
@pytest.mark.parametrize("scale", [np.uint8, np.float32], ids=["uint8", "float"])
def test_raw_pixels_are_refused_clearly(digits, scale):
  (x, y), _ = digits
  raw = np.round(x * 255).astype(scale)
  with pytest.raises(ValueError, match=r"x \(task 0\) holds values in \[0, 255\] \(raw .* pixels\?\).*Divide by 255"):
    udd_jax.distill(raw, y, steps=5, **FAST)
  # With a preprocessing that rescales them, raw pixels are fine.
  assert np.isfinite(udd_jax.distill(raw, y, steps=5, preprocessing="standardize", **FAST).images).all()


def test_one_class_is_refused_clearly(digits):
  (x, y), _ = digits
  with pytest.raises(ValueError, match=r"y \(task 0\) holds one class only \(label 3\)"):
    udd_jax.distill(x, np.full(len(x), 3), steps=5, **FAST)


def test_workdir_that_is_a_file_is_refused_clearly(digits, tmp_path):
  (x, y), _ = digits
  (tmp_path / "f").write_text("")
  with pytest.raises(ValueError, match="is an existing file, not a directory"):
    udd_jax.distill(x, y, steps=5, workdir=tmp_path / "f", **FAST)


def test_load_distilled_on_a_file_that_is_not_npz(tmp_path):
  (tmp_path / "d.npz").write_text("not an archive")
  with pytest.raises(ValueError, match=r"is not a distilled set: not an .npz \(zip\) archive") as info:
    udd_jax.load_distilled(tmp_path / "d.npz")
  assert "allow_pickle" not in str(info.value)


@pytest.mark.slow
def test_another_configuration_names_the_setting_that_differs(digits, tmp_path):
  (x, y), _ = digits
  udd_jax.distill(x, y, steps=5, workdir=tmp_path, **FAST)
  with pytest.raises(ValueError, match=r"another configuration \(n_hidden: 16 -> 8\)"):
    udd_jax.distill(x, y, steps=5, workdir=tmp_path, **(FAST | dict(n_hidden=8)))


def test_unknown_option_lists_solver_and_problem_options(digits):
  (x, y), _ = digits
  with pytest.raises(TypeError, match=r"unknown option\(s\) \['bogus'\] for solver 'unrolled'; its options are .*"
                                      r"'image_lr'.*'unroll_steps'.*the problem options are .*'init_scale'"):
    udd_jax.distill(x, y, steps=5, bogus=1, **FAST)


@pytest.mark.slow
def test_a_key_runs_as_its_seed(digits):
  (x, y), _ = digits
  by_seed = udd_jax.distill(x, y, steps=5, seed=7, **FAST)
  by_key = udd_jax.distill(x, y, steps=5, seed=jax.random.key(7), **FAST)
  np.testing.assert_array_equal(by_key.images, by_seed.images)
  assert by_key.config["seed"] == [0, 7]


@pytest.mark.slow
def test_checkpoint_is_keyed_by_pytree_paths(digits, tmp_path):
  (x, y), _ = digits
  udd_jax.distill(x, y, steps=5, workdir=tmp_path, **FAST)
  with np.load(tmp_path / "checkpoint.npz") as f:
    names = set(f.files)
  assert {"state/step", "state/images", "state/params/W", "meta/history"} <= names


@pytest.mark.slow
def test_evaluate_takes_a_key_as_its_seed(digits):
  (x, y), (xt, yt) = digits
  short = udd_jax.Recipe("adam", 0.01, 20, 0.01)
  run = lambda seed: udd_jax.evaluate(x[:20], (x, y), (xt, yt), n_hidden=8, n_seeds=2, standard_recipe=short,
                                      baselines=(), head_steps=50, seed=seed)
  assert run(jax.random.key(3)).rows[0].accuracies == run(3).rows[0].accuracies


@pytest.mark.slow
def test_clip_images_keeps_d_within_the_real_range(digits):
  (x, y), _ = digits
  free = udd_jax.distill(x, y, steps=20, **(FAST | dict(image_lr=0.1)))
  assert free.images.min() < 0.0 or free.images.max() > 1.0  # without it, D leaves [0, 1] at this step size
  clipped = udd_jax.distill(x, y, steps=20, clip_images=True, **(FAST | dict(image_lr=0.1)))
  assert clipped.images.min() >= 0.0 and clipped.images.max() <= 1.0 and clipped.config["clip_images"] is True
  with pytest.raises(TypeError, match="clip_images must be a bool"):
    udd_jax.distill(x, y, steps=5, clip_images="yes", **FAST)


REPLAYED_RUNS = {
    "penalty": dict(solver="penalty", mu=dict(kind="linear", init=0.1, final=1.0, steps=4), model_lr=3e-3, diversity=0.01),
    "value_function": dict(solver="value_function", inner_steps=3, inner_optimizer="sgd", inner_lr=0.05, lr_schedule="cosine"),
    "implicit": dict(solver="implicit", cg_steps=3, head_lr=0.05, image_optimizer="sgd", image_lr=0.5, head="softmax"),
    "unrolled": dict(solver="unrolled", unroll_steps=6, inner_optimizer="adam", inner_lr=0.01, clip_images=True),
    "pool": dict(solver="pool", pool_size=3, inner_steps=4, lifetime=16, hypergradient="implicit", seed=jax.random.key(7)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REPLAYED_RUNS))
def test_a_run_replays_bit_for_bit_from_its_config_json(digits, tmp_path, name):
  """Every setting that decides D is a plain value in config.json: the record alone re-creates the set."""
  (x, y), _ = digits
  options = dict(n_distill=8, n_hidden=6, steps=5, batch_size=64, log_every=5, progress=False) | REPLAYED_RUNS[name]
  first = udd_jax.distill(x, y, workdir=tmp_path / "first", **options)
  config = json.loads((tmp_path / "first" / "config.json").read_text())
  assert json.loads(json.dumps(config)) == config  # nothing in it but JSON values
  again = udd_jax.distill(x, y, progress=False, **udd_jax.distill_arguments(config))
  np.testing.assert_array_equal(again.images, first.images)
  assert again.config["solver_options"] == config["solver_options"]
  assert again.config["solver_options"]["name"] == name


def test_distill_arguments_refuses_an_incomplete_config():
  with pytest.raises(ValueError, match="solver_options"):
    udd_jax.distill_arguments({"n_distill": 3})
  with pytest.raises(ValueError, match=r"lacks \['n_hidden'"):
    udd_jax.distill_arguments({"solver_options": {"name": "pool"}, "n_distill": 3})


def test_settings_come_grouped_or_as_keywords_not_both(digits):
  (x, y), _ = digits
  with pytest.raises(TypeError, match=r"\['steps'\] given both in run= and as keyword arguments"):
    udd_jax.distill(x, y, n_distill=5, n_hidden=4, run=udd_jax.RunConfig(steps=5), steps=10)
  with pytest.raises(TypeError, match=r"unknown problem field\(s\) \['hidden'\]; ProblemConfig has \['n_hidden'"):
    udd_jax.distill(x, y, n_distill=5, problem=dict(hidden=4))
  with pytest.raises(TypeError, match=r"distill needs n_hidden, the learner's hidden units"):
    udd_jax.distill(x, y, n_distill=5)
  with pytest.raises(TypeError, match="problem needs n_hidden"):
    udd_jax.distill(x, y, n_distill=5, problem={})
  with pytest.raises(TypeError, match="run must be a RunConfig or a dict of its fields; got int"):
    udd_jax.distill(x, y, n_distill=5, n_hidden=4, run=5)
  with pytest.raises(TypeError, match=r"a solver config dict needs the solver's 'name' .*got the keys \['mu'\]"):
    udd_jax.distill(x, y, n_distill=5, n_hidden=4, solver={"mu": 1.0})
  # A solver's record is a solver: the same run from the instance and from its config dict.
  solver = udd_jax.get_solver("penalty", mu=1.0, image_lr=0.05)
  runs = [udd_jax.distill(x, y, n_distill=5, n_hidden=4, steps=2, progress=False, solver=s)
          for s in (solver, solver.to_config())]
  np.testing.assert_array_equal(runs[0].images, runs[1].images)


def test_optimisers_are_names_and_mu_is_data():
  with pytest.raises(TypeError, match=r"image_optimizer must be a string, one of \['adam', 'sgd'\]"):
    udd_jax.Penalty(image_optimizer=optax.adam(1e-2))
  with pytest.raises(TypeError, match=r"unknown mu schedule field\(s\) \['start'\]"):
    udd_jax.Penalty(mu={"kind": "constant", "start": 1.0})
  with pytest.raises(TypeError, match="mu must be a float or a MuSchedule"):
    udd_jax.Penalty(mu=lambda step: 1.0)
  with pytest.raises(ValueError, match="unknown inner_optimizer 'rmsprop'"):
    udd_jax.Implicit(inner_optimizer="rmsprop")
  solver = udd_jax.Penalty(mu={"kind": "geometric", "init": 0.1, "final": 10.0, "steps": 4})
  assert isinstance(solver.mu, udd_jax.bilevel.MuSchedule) and float(solver.mu(4)) == pytest.approx(10.0)
  for name in udd_jax.bilevel.SOLVERS:
    solver = udd_jax.get_solver(name)
    assert udd_jax.get_solver(**solver.to_config()) == solver
    assert json.loads(json.dumps(solver.to_config())) == solver.to_config()


def test_the_report_says_where_d_stands_against_each_baseline_in_points_and_against_the_spread():
  Row = evaluation.Row
  rows = [
      Row("mnist: distilled D", [0.900, 0.905, 0.895], recipe="standard"),
      Row("mnist: distilled D", [0.80, 0.81], recipe="D's recipe"),
      Row("mnist: raw pixels", [0.9083]),
      Row("mnist: random untrained W", [0.80, 0.81]),
      Row("mnist: random real subset of 20", [0.85, 0.86], recipe="D's recipe"),
      Row("mnist: k-means centroids (20)", [0.9044, 0.90], recipe="standard"),
      Row("mnist: jointly learned w (not a re-trained learner)", [0.99]),
      Row("usps: distilled D", [], recipe="standard"),  # diverged: no verdict
      Row("usps: raw pixels", [0.95]),
      Row("transfer to K=64, ae: distilled D", [0.7, 0.72], recipe="standard"),
  ]
  report = evaluation.EvaluationReport(rows, dict(n_test=10000, recipes={}))
  found = {(c["task"], c["baseline"]): c for c in report.comparisons()}
  assert set(found) == {("mnist", "raw pixels"), ("mnist", "random untrained W"), ("mnist", "k-means centroids (20)")}
  assert found["mnist", "raw pixels"]["exceeds"] and found["mnist", "raw pixels"]["difference"] < 0
  assert found["mnist", "random untrained W"]["exceeds"] and found["mnist", "random untrained W"]["difference"] > 0
  kmeans_row = found["mnist", "k-means centroids (20)"]
  assert not kmeans_row["exceeds"]
  np.testing.assert_allclose(kmeans_row["spread"], np.hypot(np.std([0.900, 0.905, 0.895]), np.std([0.9044, 0.90])))
  text = str(report)
  assert "Test set: 10000 images (one image = 0.01 points)." in text
  assert "- D (mnist) against raw pixels: -0.83 points (90.00 vs 90.83), below it" in text
  assert "k-means centroids (20), standard recipe: -0.22 points (90.00 vs 90.22), level with it" in text
