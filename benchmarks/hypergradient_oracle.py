"""Each solver's hypergradient against a bilevel problem with a closed-form answer (float64).

* implicit and unrolled: inner ridge regression w*(D) = (D^T D + lam I)^-1 D^T t, outer
  1/2 ||B w - c||^2; relative error of dL/dD against the analytic formula.
* penalty and value function: the toy problem of tests/test_bilevel.py, whose penalty
  solution is known for every mu; distance of w from the bilevel solution w*(theta*).
* every solver on a real-data problem with an exact answer: the closed-form learner
  (``inner="linear_ae"``, docs/METHOD.md section 2.4). The implicit hypergradient at W*(D)
  against autodiff through the closed form on MNIST (784 pixels); and the exact bilevel
  objective F(D) (ridge head on the features of W*(D)) before and after 150 steps of each
  solver at the test settings, on the embedded digits.

  python benchmarks/hypergradient_oracle.py
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

jax.config.update("jax_enable_x64", True)

sys.path.insert(0, "tests")
from test_bilevel import SOLVER_CASES, ToyProblem, make_solver, ridge_oracle, ridge_problem, run_solver  # noqa: E402
from test_linear_ae import exact_objective_problem  # noqa: E402

import udd_jax  # noqa: E402
from udd_jax import bilevel, training  # noqa: E402
from udd_jax.inner import LinearAELearner, linear_ae_solution  # noqa: E402


def rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def main():
  # A larger ridge problem (D is 80 x 50), so that the CG tolerance matters.
  D, t, B, c, inner, outer = ridge_problem(seed=0, n=80, p=50, m=30)
  w, expected = ridge_oracle(D, t, B, c)
  print("| solver | setting | relative error of dL/dD |")
  print("|---|---|---|")
  for tol in (1e-4, 1e-8, 1e-12):
    g, stats = bilevel.implicit_hypergradient(inner, w, D, jax.grad(outer)(w), damping=0.0, tol=tol, max_steps=100)
    print(f"| implicit (D 80 x 50) | CG tol {tol:g} ({int(stats.num_steps)} CG steps) | {rel(g, expected):.1e} |")
  for damping in (1e-3, 1e-1):
    g, _ = bilevel.implicit_hypergradient(inner, w, D, jax.grad(outer)(w), damping=damping, tol=1e-12, max_steps=100)
    print(f"| implicit (D 80 x 50) | damping {damping:g} | {rel(g, expected):.1e} |")
  D, t, B, c, inner, outer = ridge_problem(seed=0)
  w, expected = ridge_oracle(D, t, B, c)
  lr = 1.0 / jnp.linalg.eigvalsh(D.T @ D + 0.5 * jnp.eye(4)).max()
  for steps in (10, 100, 1000, 3000):
    g = jax.grad(lambda D: outer(training.unroll(inner, jnp.zeros(4), D, jnp.full((steps,), lr))))(D)
    print(f"| unrolled (D 7 x 4) | T = {steps} GD steps at 1/L | {rel(g, expected):.1e} |")
  g = jax.grad(lambda D: outer(training.unroll(inner, jnp.zeros(4), D, jnp.full((3000,), lr), truncate=100)))(D)
  print(f"| unrolled (D 7 x 4) | T = 3000, truncated to the last 100 | {rel(g, expected):.1e} |")

  print()
  print("| solver | mu | distance of w from w*(theta*) | analytic 2 sqrt(2)/(1 + mu) |")
  print("|---|---|---|---|")
  for name in ("penalty", "value_function"):
    for mu in (1.0, 10.0, 100.0, 1000.0):
      lr = 0.5 / (1.0 + 2.0 * mu)
      options = dict(mu=mu, image_optimizer="sgd", image_lr=lr, model_optimizer="sgd", model_lr=lr)
      if name == "value_function":
        options.update(inner_steps=1, inner_optimizer="sgd", inner_lr=1.0)
      state, _ = run_solver(bilevel.get_solver(name, **options), ToyProblem(), jnp.zeros((1, 1)), 200000)
      err = float(np.linalg.norm(np.asarray(state.params) + 1.0))
      print(f"| {name} | {mu:g} | {err:.3e} | {2 * np.sqrt(2) / (1 + mu):.3e} |")

  closed_form_learner()


def closed_form_learner(reg=0.3):
  (x, y), _ = udd_jax.load_dataset("mnist_10k")
  x = jnp.asarray(x.reshape(len(x), -1), jnp.float64)
  y = jnp.asarray(y)
  for k in (4, 16):
    problem = bilevel.make_problem(n_visible=784, n_hidden=k, n_classes=10, inner=LinearAELearner(reg=reg),
                                   head="softmax", init_scale=0.1)
    heads = jax.tree.map(lambda h: 0.1 * jax.random.normal(jax.random.key(1), h.shape, h.dtype),
                         problem.init_heads(jax.random.key(0), jnp.float64))
    batch = bilevel.sample_batch(jax.random.key(2), [(x, y)], 1024)
    images = x[:20]
    star = linear_ae_solution(images, k, reg=reg)
    expected = jax.grad(lambda d: problem.outer_loss(linear_ae_solution(d, k, reg=reg, signs_like=star.W), heads,
                                                     batch)[0])(images)
    v = jax.grad(lambda w: problem.outer_loss(w, heads, batch)[0])(star)
    inner = lambda w, d: problem.inner_loss(w, d, jax.random.key(0))
    print()
    print(f"MNIST, |D| = 20, K = {k}, reg = {reg}: implicit hypergradient at W*(D) against autodiff through the closed form")
    print("| CG tol | CG steps | relative error of dL/dD |")
    print("|---|---|---|")
    for tol in (1e-4, 1e-8, 1e-12):
      g, stats = bilevel.implicit_hypergradient(inner, star, images, v, damping=0.0, tol=tol, max_steps=2000)
      print(f"| {tol:g} | {int(stats.num_steps)} | {rel(g, expected):.1e} |")

  problem, batch, exact, images = exact_objective_problem(reg)
  print()
  print(f"Digits, |D| = 12, K = 4, reg = {reg}: the exact bilevel objective F(D) under each solver (test settings)")
  print("| solver | F before | F after 150 steps | F after 600 steps |")
  print("|---|---|---|---|")
  for name in SOLVER_CASES:
    after = [float(exact(run_solver(make_solver(name), problem, images, n, batch)[0].images)) for n in (150, 600)]
    print(f"| {name} | {float(exact(images)):.4f} | {after[0]:.4f} | {after[1]:.4f} |")


if __name__ == "__main__":
  main()
