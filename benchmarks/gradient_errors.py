"""Measures the agreement of the closed-form gradients, autodiff and finite differences.

Prints a markdown table (float64) of the largest relative errors found over
several problem shapes: the figures quoted in docs/CORRECTNESS.md.

  python benchmarks/gradient_errors.py
"""

import jax
import jax.numpy as jnp
import numpy as np

import udd_jax

jax.config.update("jax_enable_x64", True)

SHAPES = [(1, 1, 1), (5, 3, 2), (17, 10, 7), (32, 64, 16), (100, 784, 128)]


def problem(n, d, k, seed):
  keys = jax.random.split(jax.random.key(seed), 4)
  params = udd_jax.GRBMParams(
      0.7 * jax.random.normal(keys[0], (d, k)) / np.sqrt(max(d / 10, 1)),
      0.5 * jax.random.normal(keys[1], (k,)),
      0.5 * jax.random.normal(keys[2], (d,)),
  )
  return params, jax.random.uniform(keys[3], (n, d))


def rel(u, v):
  return max(
      float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(v))
  )


def main():
  losses = {
      "ae": (udd_jax.ae_loss, udd_jax.ae_grad_closed_form, udd_jax.ae_penalty_closed_form),
      "score_matching": (
          udd_jax.score_matching_loss,
          udd_jax.score_matching_grad_closed_form,
          udd_jax.score_matching_penalty_closed_form,
      ),
  }
  print("| loss | shape (n, d, K) | closed-form grad vs jax.grad | closed-form penalty vs autodiff | d penalty/dD vs central FD (3 directions) |")
  print("|---|---|---|---|---|")
  rng = np.random.default_rng(0)
  for name, (loss, grad_cf, pen_cf) in losses.items():
    for seed, shape in enumerate(SHAPES):
      params, x = problem(*shape, seed)
      for sigma2 in (1.0, 0.3):
        e_grad = rel(grad_cf(params, x, sigma2=sigma2), jax.grad(loss)(params, x, sigma2=sigma2))
        p_auto = udd_jax.gradient_penalty(loss, params, x, sigma2=sigma2)
        e_pen = abs(float(pen_cf(params, x, sigma2=sigma2) - p_auto)) / float(p_auto)
        pen = jax.jit(lambda d: udd_jax.gradient_penalty(loss, params, d, sigma2=sigma2))
        g = jax.grad(pen)(x)
        e_fd = 0.0
        for _ in range(3):
          v = jnp.asarray(rng.normal(size=x.shape))
          eps = 1e-6
          fd = (pen(x + eps * v) - pen(x - eps * v)) / (2 * eps)
          e_fd = max(e_fd, abs(float(jnp.vdot(g, v) - fd)) / max(abs(float(fd)), 1e-300))
        print(f"| {name} (sigma2={sigma2}) | {shape} | {e_grad:.1e} | {e_pen:.1e} | {e_fd:.1e} |")


if __name__ == "__main__":
  main()
