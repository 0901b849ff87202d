"""Bad input to public entry points fails early with an error naming the argument and problem."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import udd_jax

PARAMS = udd_jax.GRBMParams(W=jnp.ones((4, 3)), b=jnp.zeros(3), a=jnp.zeros(4))
X = jnp.ones((5, 4))
KEY = jax.random.key(0)

LOSSES = {
    "ae_loss": udd_jax.ae_loss,
    "score_matching_loss": udd_jax.score_matching_loss,
    "denoising_score_matching_loss": lambda p, x, **kw: udd_jax.denoising_score_matching_loss(p, x, KEY, **kw),
    "features": lambda p, x, **kw: udd_jax.features(p, x),
    "ae_grad_closed_form": udd_jax.ae_grad_closed_form,
    "score_matching_grad_closed_form": udd_jax.score_matching_grad_closed_form,
}

BAD_DATA = [
    (jnp.ones((5, 3)), ValueError, "x has 3 features but params.W expects 4"),
    (jnp.ones((5, 2, 2)), ValueError, r"x must have shape \(n, 4\)"),
    (jnp.ones((0, 4)), ValueError, "x is empty"),
    (jnp.ones((5, 4), jnp.int32), TypeError, "x must be a floating array"),
    ([[1.0] * 4], TypeError, "x must be an array"),
]

BAD_PARAMS = [
    (udd_jax.GRBMParams(jnp.ones((4, 3)), jnp.zeros(2), jnp.zeros(4)), ValueError, r"params.b must have shape \(3,\)"),
    (udd_jax.GRBMParams(jnp.ones((4, 3)), jnp.zeros(3), jnp.zeros(5)), ValueError, r"params.a must have shape \(4,\)"),
    (udd_jax.GRBMParams(jnp.ones(4), jnp.zeros(3), jnp.zeros(4)), ValueError, "params.W must have rank 2"),
    (udd_jax.GRBMParams(jnp.ones((4, 3), jnp.int32), jnp.zeros(3), jnp.zeros(4)), TypeError, "params.W must be a floating"),
    ((jnp.ones((4, 3)), jnp.zeros(3)), TypeError, "params must be a GRBMParams"),
]


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("x, error, match", BAD_DATA)
def test_bad_data(name, x, error, match):
  with pytest.raises(error, match=match):
    LOSSES[name](PARAMS, x)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("params, error, match", BAD_PARAMS)
def test_bad_params(name, params, error, match):
  with pytest.raises(error, match=match):
    LOSSES[name](params, X)


@pytest.mark.parametrize("sigma2", [0.0, -1.0, float("nan")])
def test_bad_sigma2(sigma2):
  with pytest.raises(ValueError, match="sigma2 must be a finite positive number"):
    udd_jax.ae_loss(PARAMS, X, sigma2=sigma2)


def test_bad_noise_std():
  with pytest.raises(ValueError, match="noise_std"):
    udd_jax.denoising_score_matching_loss(PARAMS, X, KEY, noise_std=0.0)


def test_shape_errors_raise_under_jit_at_trace_time():
  with pytest.raises(ValueError, match="x has 3 features"):
    jax.jit(udd_jax.ae_loss)(PARAMS, jnp.ones((5, 3)))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(n_visible=0, n_hidden=3), ValueError, "n_visible must be a positive integer; got 0"),
        (dict(n_visible=4, n_hidden=-2), ValueError, "n_hidden must be a positive integer; got -2"),
        (dict(n_visible=4, n_hidden=2.5), TypeError, "n_hidden must be a positive integer"),
        (dict(n_visible=4, n_hidden=True), TypeError, "n_hidden must be a positive integer"),
        (dict(n_visible=4, n_hidden=3, init_scale=-0.1), ValueError, "init_scale must be a finite non-negative"),
        (dict(n_visible=4, n_hidden=3, dtype=jnp.int32), TypeError, "dtype must be a floating dtype"),
    ],
)
def test_bad_init(kwargs, error, match):
  with pytest.raises(error, match=match):
    udd_jax.init_params(KEY, **kwargs)


@pytest.mark.parametrize(
    "x, kwargs, error, match",
    [
        (np.ones((3, 2, 2)), dict(method="whiten"), ValueError, r"unknown method 'whiten'; valid options are \['none'"),
        (np.ones(5), {}, ValueError, "rank >= 2"),
        (np.ones((0, 4)), {}, ValueError, "x is empty"),
        (np.array([[1.0, np.inf]]), {}, ValueError, "1 non-finite value"),
        (np.array([["a", "b"]]), {}, TypeError, "numeric array"),
        (np.ones((3, 2), complex), {}, TypeError, "real numbers"),
        (np.ones((3, 2)), dict(method="zca", zca_reg=0.0), ValueError, "zca_reg must be a finite positive"),
    ],
)
def test_bad_preprocessing_input(x, kwargs, error, match):
  with pytest.raises(error, match=match):
    udd_jax.fit_preprocessing(x, **kwargs)


# Entry points on host data: evaluate, distill, load_dataset and the experiment flags.


@pytest.fixture(scope="module")
def digits():
  return udd_jax.load_dataset("digits")


def _evaluate_case(digits, case):
  """(images, train, test, kwargs) for one bad-input case of evaluate()."""
  (x, y), (xt, yt) = digits
  nan_images = x[:3].copy()
  nan_images[0, 1, 1] = np.nan
  cases = {
      "train not a pair": (x[:3], x, (xt, yt), {}),
      "test a triple": (x[:3], (x, y), (xt, yt, yt), {}),
      "NaN images": (nan_images, (x, y), (xt, yt), {}),
      "infinite train x": (x[:3], (np.where(x == 0, np.inf, x), y), (xt, yt), {}),
      "images of another shape": (x[:3, :4, :4], (x, y), (xt, yt), {}),
      "flat images": (x[:3].reshape(3, 64), (x, y), (xt, yt), {}),
      "images of rank 1": (x[0, 0], (x, y), (xt, yt), {}),
      "empty images": (x[:0], (x, y), (xt, yt), {}),
      "string images": (np.array([["a"]]), (x, y), (xt, yt), {}),
      "train labels too short": (x[:3], (x, y[:10]), (xt, yt), {}),
      "test labels of rank 2": (x[:3], (x, y), (xt, yt[:, None]), {}),
      "negative labels": (x[:3], (x, -y), (xt, yt), {}),
      "fractional labels": (x[:3], (x, y + 0.5), (xt, yt), {}),
      "n_hidden zero": (x[:3], (x, y), (xt, yt), dict(n_hidden=0)),
      "n_seeds fractional": (x[:3], (x, y), (xt, yt), dict(n_seeds=1.5)),
      "unknown inner": (x[:3], (x, y), (xt, yt), dict(inner="vae")),
      "recipe config incomplete": (x[:3], (x, y), (xt, yt), dict(recipe={"inner_lr": 0.1})),
      "recipe a string": (x[:3], (x, y), (xt, yt), dict(recipe="adam")),
      "preprocessing a string": (x[:3], (x, y), (xt, yt), dict(preprocessing="zca")),
      "joint_params of another size": (x[:3], (x, y), (xt, yt), dict(joint_params=udd_jax.GRBMParams(
          np.ones((5, 3)), np.zeros(3), np.zeros(5)))),
      "more images than a subset can draw": (x[:3], (x[:2], y[:2]), (xt, yt), dict(baselines=("random_subset",))),
      "convergence_factor negative": (x[:3], (x, y), (xt, yt), dict(convergence_factor=-1)),
      "standard_recipe a config dict": (x[:3], (x, y), (xt, yt), dict(standard_recipe=udd_jax.STANDARD_RECIPE.to_config())),
      "recipe_n_hidden zero": (x[:3], (x, y), (xt, yt), dict(recipe=udd_jax.Recipe("sgd", 0.1, 5), recipe_n_hidden=0)),
      "head_steps zero": (x[:3], (x, y), (xt, yt), dict(head_steps=0)),
      "head_l2 negative": (x[:3], (x, y), (xt, yt), dict(head_l2=-1.0)),
  }
  return cases[case]


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("train not a pair", TypeError, r"train must be an \(x, y\) pair"),
        ("test a triple", TypeError, r"test must be an \(x, y\) pair.*length 3"),
        ("NaN images", ValueError, "images contains 1 non-finite value"),
        ("infinite train x", ValueError, "train x contains .* non-finite"),
        ("images of another shape", ValueError, "must share one trailing shape"),
        ("flat images", ValueError, "must share one trailing shape"),
        ("images of rank 1", ValueError, "images must have rank >= 2"),
        ("empty images", ValueError, "images is empty"),
        ("string images", TypeError, "images must be a numeric array"),
        ("train labels too short", ValueError, "train y has 10 labels but the inputs have 1437 rows"),
        ("test labels of rank 2", ValueError, r"test y must have rank 1; got shape \(360, 1\)"),
        ("negative labels", ValueError, "train y must hold non-negative class labels"),
        ("fractional labels", TypeError, "train y must hold integer class labels"),
        ("n_hidden zero", ValueError, "n_hidden must be a positive integer; got 0"),
        ("n_seeds fractional", TypeError, "n_seeds must be a positive integer"),
        ("unknown inner", ValueError, r"unknown inner loss 'vae'; valid options are \['ae'"),
        ("recipe config incomplete", ValueError, r"recipe config lacks \['inner_optimizer'"),
        ("recipe a string", TypeError, "recipe must be a Recipe or its config dict"),
        ("preprocessing a string", TypeError, "preprocessing must be the Preprocessing stored with D"),
        ("joint_params of another size", ValueError, "joint_params do not fit the images"),
        ("more images than a subset can draw", ValueError, "3 rows, more than the 2 training inputs"),
        ("convergence_factor negative", ValueError, "convergence_factor must be a non-negative integer; got -1"),
        ("standard_recipe a config dict", TypeError, "standard_recipe must be a Recipe; got dict"),
        ("recipe_n_hidden zero", ValueError, "recipe_n_hidden must be a positive integer; got 0"),
        ("head_steps zero", ValueError, "head_steps must be a positive integer; got 0"),
        ("head_l2 negative", ValueError, "head_l2 must be a finite non-negative"),
    ],
)
def test_evaluate_bad_input(digits, case, error, match):
  images, train, test, kwargs = _evaluate_case(digits, case)
  with pytest.raises(error, match=match):
    udd_jax.evaluate(images, train, test, **(dict(n_hidden=4, baselines=()) | kwargs))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(eval_every=-1), ValueError, "eval_every must be a non-negative integer; got -1"),
        (dict(eval_every=5, eval_data=(1, 2)), TypeError, r"eval_data must be a tuple \(x_train"),
        (dict(eval_every=5, eval_data="nan test x"), ValueError, "eval_data test x contains 1 non-finite"),
        (dict(eval_every=5, eval_data="short test y"), ValueError, "eval_data test y has 3 labels but the inputs have 360"),
        (dict(max_seconds=-1.0), ValueError, "max_seconds must be a finite positive number"),
        (dict(recipe="adam"), TypeError, "recipe must be a Recipe or its config dict"),
        (dict(recipe={"inner_steps": 3}), ValueError, "recipe config lacks"),
        (dict(callback=3), TypeError, "callback must be callable"),
        (dict(steps=-3), ValueError, "steps must be a positive integer; got -3"),
        (dict(preprocessing="whiten"), ValueError, r"unknown preprocessing 'whiten'; valid options are \['none'"),
    ],
)
def test_distill_bad_run_settings(digits, kwargs, error, match):
  (x, y), (xt, yt) = digits
  bad_xt = xt.copy()
  bad_xt[0, 0, 0] = np.nan
  if kwargs.get("eval_data") == "nan test x":
    kwargs = kwargs | dict(eval_data=(x, y, bad_xt, yt))
  elif kwargs.get("eval_data") == "short test y":
    kwargs = kwargs | dict(eval_data=(x, y, xt, yt[:3]))
  with pytest.raises(error, match=match):
    udd_jax.distill(x, y, **(dict(n_distill=5, n_hidden=4, steps=5, progress=False) | kwargs))


def test_load_dataset_checks_a_data_dir_given_for_digits(tmp_path):
  with pytest.raises(FileNotFoundError, match="data_dir .* is not an existing directory"):
    udd_jax.load_dataset("digits", data_dir=tmp_path / "missing")


RUN = dict(dataset="digits", n_distill=10, n_hidden=8, steps=5, eval_seeds=1, baselines=())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(steps=-5), ValueError, "steps must be a positive integer; got -5"),
        (dict(n_distill=0), ValueError, "n_distill must be a positive integer; got 0"),
        (dict(n_hidden=-1), ValueError, "n_hidden must be a positive integer; got -1"),
        (dict(batch_size=0), ValueError, "batch_size must be a positive integer"),
        (dict(log_every=0), ValueError, "log_every must be a positive integer"),
        (dict(checkpoint_every=-1), ValueError, "checkpoint_every must be a positive integer"),
        (dict(seed=-1), ValueError, "seed must be a non-negative integer"),
        (dict(eval_every=-10), ValueError, "eval_every must be a non-negative integer"),
        (dict(eval_seeds=-1), ValueError, "eval_seeds must be a non-negative integer"),
        (dict(solver="adam"), ValueError,
         r"unknown solver 'adam'; valid options are \['implicit', 'penalty', 'pool', 'unrolled', 'value_function'\]"),
        (dict(inner="vae"), ValueError, r"unknown inner loss 'vae'; valid options are"),
        (dict(init="zeros"), ValueError, r"unknown init 'zeros'; valid options are \['kmeans'"),
        (dict(preprocessing="pca"), ValueError, "unknown preprocessing 'pca'"),
        (dict(baselines=("pca",)), ValueError, "unknown baseline 'pca'"),
        (dict(transfer=("K=abc",)), ValueError, "transfer K must be a positive integer; got 'abc'"),
        (dict(transfer=("inner=vae",)), ValueError, "unknown transfer inner loss 'vae'"),
        (dict(dataset=","), ValueError, "dataset must name a dataset"),
        (dict(dataset="mnistt"), ValueError, r"unknown dataset 'mnistt'; valid names are \['digits'"),
        (dict(data_dir="MISSING"), FileNotFoundError, "data_dir .* is not an existing directory"),
        (dict(workdir="A FILE"), ValueError, "exists and is not a directory"),
    ],
)
def test_experiment_run_bad_flags(tmp_path, monkeypatch, kwargs, error, match):
  """Each fails before any training: the workdir stays without config.json or checkpoint."""
  from udd_jax import experiment

  monkeypatch.delenv("UDD_DATA_DIR", raising=False)
  workdir = tmp_path / "run"
  if kwargs.get("data_dir") == "MISSING":
    kwargs = kwargs | dict(data_dir=str(tmp_path / "missing"))
  if kwargs.get("workdir") == "A FILE":
    (tmp_path / "file").write_text("")
    kwargs = kwargs | dict(workdir=str(tmp_path / "file"))
  with pytest.raises(error, match=match):
    experiment.run(**(RUN | dict(workdir=str(workdir)) | kwargs))
  assert not (workdir / "config.json").exists() and not (workdir / "checkpoint.npz").exists()


@pytest.mark.parametrize(
    "app, kwargs, error, match",
    [
        ("compare", dict(budget_seconds=0.0), ValueError, "budget_seconds must be a finite positive"),
        ("compare", dict(solvers=()), ValueError, "solvers is empty"),
        ("compare", dict(solvers=("newton",)), ValueError,
         r"unknown solver 'newton'; valid options are \['implicit', 'penalty', 'pool', 'unrolled', 'value_function'\]"),
        ("compare", dict(eval_seeds=0), ValueError, "eval_seeds must be a positive integer for a comparison"),
        ("compare", dict(n_distill=0), ValueError, "n_distill must be a positive integer"),
        ("compare", dict(inner="vae"), ValueError, "unknown inner loss 'vae'"),
        ("seed_table", dict(points=()), ValueError, "points is empty"),
        ("seed_table", dict(points=(0, 100)), ValueError, "points must be a positive integer; got 0"),
        ("seed_table", dict(diversity=-1.0), ValueError, "diversity must be a finite non-negative"),
        ("seed_table", dict(dataset="mnistt"), ValueError, "unknown dataset 'mnistt'"),
    ],
)
def test_compare_solvers_and_seed_table_bad_flags(tmp_path, app, kwargs, error, match):
  """The two other experiment apps also check their arguments before any training."""
  from udd_jax import experiment

  workdir = tmp_path / "run"
  if app == "compare":
    args = dict(dataset="digits", workdir=str(workdir), n_distill=5, n_hidden=4, budget_seconds=1.0) | kwargs
    call = experiment.compare_solvers
  else:
    args = dict(dataset="digits", workdir=str(workdir), n_distill=5, n_hidden=4, points=(1,)) | kwargs
    call = experiment.seed_table
  with pytest.raises(error, match=match):
    call(**args)
  assert not workdir.exists() or not any(workdir.iterdir())
