"""Each solver's hypergradient against a bilevel problem with a closed-form answer (float64).

* implicit and unrolled: inner ridge regression w*(D) = (D^T D + lam I)^-1 D^T t, outer
  1/2 ||B w - c||^2; relative error of dL/dD against the analytic formula.
* penalty and value function: the toy problem of tests/test_bilevel.py, whose penalty
  solution is known for every mu; distance of w from the bilevel solution w*(theta*).

  python benchmarks/hypergradient_oracle.py
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

jax.config.update("jax_enable_x64", True)

sys.path.insert(0, "tests")
from test_bilevel import ToyProblem, ridge_oracle, ridge_problem, run_solver  # noqa: E402

from udd_jax import bilevel, training  # noqa: E402


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


if __name__ == "__main__":
  main()
