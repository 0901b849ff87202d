"""Compile time and time per outer step of the pool at ``distill``'s MNIST setting, old default head against new.

|D| = 100, K = 128, one task (MNIST), 2048 real images per step (``distill``'s batch),
8 learners of 10 inner steps each, float32. The old default fitted a closed-form ridge
head judged by its MSE (``head="ridge"``, 500 outer steps); the new one judges the same
fit by the cross-entropy of its scores at temperature 0.1 (``head="ridge_ce"``, 500
outer steps, as before). Each step is jitted as a ``lax.scan`` over 10 steps, as ``distill`` runs
it; "first call" is the first chunk's time (compile plus 10 steps), the step time the
median of the next calls over 10.

  python benchmarks/pool_default.py --data_dir ../shared/data       # ~1 min on 2 idle cores

Writes benchmarks/results/pool_default.json.
"""

import jax

import _common

HEADS = {"ridge": 500, "ridge_ce": 500}  # head -> the default's outer steps


def main():
  parser = _common.argument_parser(__doc__)
  parser.add_argument("--steps", type=int, default=5, help="timed calls of the 10-step chunk")
  args = parser.parse_args()
  x, y, _ = _common.load_mnist(args.data_dir)
  tasks, n_classes = _common.task_set(x, y, 1)
  meta = _common.machine()
  rows = []
  for head, outer_steps in HEADS.items():
    step, state, _ = _common.make_step("pool", x, tasks, n_classes, n_distill=100, n_hidden=128, batch=2048, head=head)
    timed = _common.time_step(_common.jit_step(step, chunk=10), state, steps=args.steps, warmup=1)
    per_step = timed["median_s"] / 10
    rows.append(dict(head=head, compile_s=timed["compile_s"], step_ms=per_step * 1e3,
                     outer_steps=outer_steps, distillation_s=timed["compile_s"] + (outer_steps - 10) * per_step))
  print(_common.header(meta))
  print(_common.markdown_table(["head", "first call: compile + 10 steps (s)", "ms per outer step (scan of 10)",
                                "default outer steps", "first call + the other steps (s)"],
                               [[r["head"], r["compile_s"], r["step_ms"], r["outer_steps"], r["distillation_s"]] for r in rows]))
  json_path, _ = _common.output_paths("pool_default", quick=False)
  _common.write_json(json_path, meta, rows)


if __name__ == "__main__":
  jax.config.update("jax_enable_x64", False)
  main()
