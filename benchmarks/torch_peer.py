"""The penalty and implicit outer steps in plain PyTorch (CPU) against udd_jax's, in one run.

Same maths, same sizes: |D| = 100 images of 784 pixels, K = 128, one task (MNIST digits,
linear softmax head, L2 1e-4), a batch of 256 real images drawn inside each step, float32.

* penalty: tied-AE inner loss 0.5 mean_i ||a - x_i + W sigmoid(W^T x_i + b)||^2 on D,
  outer = CE(head(sigmoid(W^T x + b))) + l2/2 ||head W||^2 + mu/2 ||grad_w L_in(w; D)||^2
  (double backward), Adam(1e-2) on D and Adam(1e-3) on (w, head): ``udd_jax.Penalty(mu=1.0)``
  (a constant mu) with its other defaults.
* implicit: ``udd_jax.Implicit()`` with its defaults: warm-started inner Adam(1e-2) steps
  until ||grad|| <= 1e-4 or 100 steps, 5 Adam(1e-2) steps on the head at w*, CG
  (tol 1e-5, at most 50 iterations, truncated at negative curvature) on damped (1e-3)
  Hessian-vector products, dL/dD = -(d^2 L_in / dD dw) u, Adam(1e-2) on D. PyTorch builds
  its HVPs by double backward through one retained graph of grad_w L_in (reverse over
  reverse); JAX by forward over reverse. ``--fixed_work`` makes both run every iteration.

PyTorch runs eagerly, and with ``torch.compile`` where that works (the attempt and any
failure are recorded). The contenders are timed in interleaved rounds, so that a change
in load hits them alike; each figure is the median over all timed steps.

Check: from the same initial state and the same batches, the JAX and PyTorch steps must
give the same objective, outer loss and penalty (relative difference <= ``--rtol``,
default 1e-4) for ``--check_steps`` consecutive steps (so Adam's updates agree too); the
script exits with status 1 if the penalty check fails. The implicit step's outer loss and
inner value are compared and reported the same way (informative: its stopping rules may
take a different number of iterations in float32).

PyTorch is a benchmark-only extra (``pip install .[bench]``); the library never imports it.
Prints a markdown table, writes benchmarks/results/torch_peer.json and torch_peer.png.

  python benchmarks/torch_peer.py --data_dir ../shared/data            # full: ~2-4 min (torch.compile ~1 min)
  python benchmarks/torch_peer.py --data_dir ../shared/data --quick    # smoke run: 2 rounds of 3 steps, no torch.compile
"""

import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import _common
from udd_jax import bilevel

try:
  import torch
  import torch.nn.functional as F
except ImportError:  # pragma: no cover
  sys.exit("torch_peer.py needs PyTorch: pip install 'torch==2.13.0' (or pip install -e '.[bench]').")

L2 = 1e-4  # SoftmaxHead's default


def to_torch(a):
  return torch.from_numpy(np.array(a, dtype=np.float32 if np.asarray(a).dtype.kind == "f" else np.int64))


def _adam(params, lr, impl):
  """torch.optim.Adam (same update as optax.adam: eps 1e-8 outside the square root, bias correction)."""
  kwargs = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[impl]
  return torch.optim.Adam(params, lr=lr, **kwargs)


def _apply(optimizer, params, grads):
  for p, g in zip(params, grads):
    p.grad = g
  optimizer.step()


def ae_loss(W, b, a, D):
  r = a - D + torch.sigmoid(D @ W + b) @ W.T
  return 0.5 * (r * r).sum(1).mean()


def head_loss(hW, hb, feats, y):
  return F.cross_entropy(feats @ hW + hb, y) + 0.5 * L2 * (hW * hW).sum()


class Sampler:
  """A batch of real images drawn with replacement, as udd_jax.sample_batch does."""

  def __init__(self, x, y, batch, seed=0):
    self.x, self.y, self.batch = x, y, batch
    self.gen = torch.Generator().manual_seed(seed)

  def __call__(self):
    idx = torch.randint(0, self.x.shape[0], (self.batch,), generator=self.gen)
    return self.x[idx], self.y[idx]


class TorchPenalty:
  """``udd_jax.Penalty`` (mu constant, no diversity term) with tensors and torch.optim.Adam."""

  def __init__(self, images, W, b, a, hW, hb, *, mu, image_lr=1e-2, model_lr=1e-3, adam="default", compiled=None):
    self.D = images.clone().requires_grad_(True)
    self.model = [t.clone().requires_grad_(True) for t in (W, b, a, hW, hb)]
    self.opt_D, self.opt_model = _adam([self.D], image_lr, adam), _adam(self.model, model_lr, adam)
    self.mu = mu
    self.grads = compiled or self.objective_and_grads

  def objective_and_grads(self, D, W, b, a, hW, hb, xb, yb):
    gW, gb, ga = torch.autograd.grad(ae_loss(W, b, a, D), (W, b, a), create_graph=True)
    penalty = (gW * gW).sum() + (gb * gb).sum() + (ga * ga).sum()
    outer = head_loss(hW, hb, torch.sigmoid(xb @ W + b), yb)
    objective = outer + 0.5 * self.mu * penalty
    grads = torch.autograd.grad(objective, (D, W, b, a, hW, hb))
    return objective.detach(), outer.detach(), penalty.detach(), grads

  def step(self, xb, yb):
    objective, outer, penalty, grads = self.grads(self.D, *self.model, xb, yb)
    _apply(self.opt_D, [self.D], grads[:1])
    _apply(self.opt_model, self.model, grads[1:])
    return dict(objective=float(objective.detach()), outer_loss=float(outer.detach()), penalty=float(penalty.detach()))


def functional_objective_and_grads(mu):
  """The penalty step's gradients with torch.func (grad of a function that calls grad), for torch.compile."""
  from torch.func import grad

  def objective_fn(D, W, b, a, hW, hb, xb, yb):
    gW, gb, ga = grad(lambda W, b, a: ae_loss(W, b, a, D), argnums=(0, 1, 2))(W, b, a)
    penalty = (gW * gW).sum() + (gb * gb).sum() + (ga * ga).sum()
    outer = head_loss(hW, hb, torch.sigmoid(xb @ W + b), yb)
    return outer + 0.5 * mu * penalty, (outer, penalty)

  def fn(D, W, b, a, hW, hb, xb, yb):
    grads, (objective, (outer, penalty)) = torch.func.grad_and_value(objective_fn, argnums=(0, 1, 2, 3, 4, 5),
                                                                      has_aux=True)(D, W, b, a, hW, hb, xb, yb)
    return objective, outer, penalty, grads

  return fn


class TorchImplicit:
  """``udd_jax.Implicit`` with tensors: warm-started inner Adam, head steps, truncated CG on HVPs."""

  def __init__(self, images, W, b, a, hW, hb, *, inner_steps, inner_tol, damping, cg_tol, cg_steps, head_steps,
               warm_start_adjoint, inner_lr=1e-2, head_lr=1e-2, image_lr=1e-2, adam="default"):
    self.D = images.clone().requires_grad_(True)
    self.w = [t.clone().requires_grad_(True) for t in (W, b, a)]
    self.heads = [t.clone().requires_grad_(True) for t in (hW, hb)]
    self.opt_inner = _adam(self.w, inner_lr, adam)  # its state persists: the warm start of optax's inner state
    self.opt_heads, self.opt_D = _adam(self.heads, head_lr, adam), _adam([self.D], image_lr, adam)
    self.inner_steps, self.inner_tol, self.damping = inner_steps, inner_tol, damping
    self.cg_tol, self.cg_steps, self.head_steps = cg_tol, cg_steps, head_steps
    self.warm_start_adjoint, self.u = warm_start_adjoint, None

  def step(self, xb, yb):
    D, w = self.D, self.w
    Dc = D.detach()
    # Inner solve: the same loop as udd_jax.training.inner_solve (gradient at the start, then step / gradient).
    g = torch.autograd.grad(ae_loss(*w, Dc), w)
    gnorm, i = float(torch.sqrt(sum((t * t).sum() for t in g))), 0
    while i < self.inner_steps and gnorm > self.inner_tol:
      _apply(self.opt_inner, w, g)
      g = torch.autograd.grad(ae_loss(*w, Dc), w)
      gnorm, i = float(torch.sqrt(sum((t * t).sum() for t in g))), i + 1
    inner_steps = i
    # Heads at w*, features fixed.
    with torch.no_grad():
      feats = torch.sigmoid(xb @ w[0] + w[1])
    for _ in range(self.head_steps):
      _apply(self.opt_heads, self.heads, torch.autograd.grad(head_loss(*self.heads, feats, yb), self.heads))
    hW, hb = (h.detach() for h in self.heads)
    outer = head_loss(hW, hb, torch.sigmoid(xb @ w[0] + w[1]), yb)
    v = torch.autograd.grad(outer, w, allow_unused=True, materialize_grads=True)  # the outer loss ignores a
    # One graph of grad_w L_in(w*, D), kept for every HVP and for the mixed derivative in D.
    gw = torch.autograd.grad(ae_loss(*w, D), w, create_graph=True)

    def matvec(t):
      hv = torch.autograd.grad(gw, w, grad_outputs=t, retain_graph=True)
      return [h + self.damping * ti for h, ti in zip(hv, t)]

    dot = lambda u, z: sum((ui * zi).sum() for ui, zi in zip(u, z))
    # CG from the previous step's adjoint, kept only if its residual beats zero's (as udd_jax does).
    bb = dot(v, v)
    threshold = self.cg_tol**2 * bb
    x, r, rs = [torch.zeros_like(t) for t in v], list(v), bb
    if self.warm_start_adjoint and self.u is not None:
      r_warm = [vi - ai for vi, ai in zip(v, matvec(self.u))]
      rs_warm = dot(r_warm, r_warm)
      if rs_warm < bb:
        x, r, rs = list(self.u), r_warm, rs_warm
    p, k, negative = list(r), 0, False
    while k < self.cg_steps and rs > threshold and not negative:
      ap = matvec(p)
      pap = dot(p, ap)
      negative = bool(pap <= 0)
      if negative:  # first iteration: a step along p of length ||p|| / ||A p||; later: stop where it is
        alpha = torch.sqrt(dot(p, p)) / torch.clamp(torch.sqrt(dot(ap, ap)), min=1e-30) if k == 0 else 0.0
      else:
        alpha = rs / pap
      x = [xi + alpha * pi for xi, pi in zip(x, p)]
      r = [ri - alpha * ai for ri, ai in zip(r, ap)]
      rs_new = dot(r, r)
      p = [ri + (rs_new / rs) * pi for ri, pi in zip(r, p)]
      rs, k = rs_new, k + 1
    self.u = [xi.detach() for xi in x]
    (g_D,) = torch.autograd.grad(gw, D, grad_outputs=x)
    with torch.no_grad():  # at the D of this step, as udd_jax reports it (Dc shares D's storage)
      inner_value = ae_loss(*w, Dc)
    _apply(self.opt_D, [D], [-g_D])
    return dict(outer_loss=float(outer.detach()), inner_value=float(inner_value), inner_steps=inner_steps, cg_steps=k)


def jax_contender(name, x, y, batch, **options):
  """The library's jitted, donated step (batch drawn inside), and its initial state."""
  tasks, n_classes = _common.task_set(x, y, 1)
  step, state, problem = _common.make_step(name, x, tasks, n_classes, batch=batch, **options)
  return _common.jit_step(step), state, problem


def torch_inputs(state):
  return (to_torch(state.images), *(to_torch(t) for t in state.params), to_torch(state.heads.W[0]),
          to_torch(state.heads.b[0]))


def check(x, y, state, problem, solver, make_torch, steps, batch_size):
  """Runs the JAX and the torch step from one state on the same batches; max relative differences."""
  peer = make_torch(*torch_inputs(state))
  state = jax.tree.map(jnp.copy, state)
  jitted = jax.jit(lambda s, b: solver.step(problem, s, b))
  worst, records = {}, []
  for i in range(steps):
    batch = bilevel.sample_batch(jax.random.key(1000 + i), ((x, y),), batch_size)
    state, metrics = jitted(state, batch)
    got = peer.step(to_torch(batch.x[0]), torch.from_numpy(np.asarray(batch.y[0], np.int64)))
    rec = {}
    for k, v in got.items():
      if k in metrics and k not in ("inner_steps", "cg_steps"):
        ref = float(metrics[k])
        rec[k] = abs(v - ref) / max(abs(ref), 1e-30)
        worst[k] = max(worst.get(k, 0.0), rec[k])
      elif k in metrics:
        rec[k] = (float(metrics[k]), v)
    records.append(rec)
  return worst, records


def time_interleaved(contenders, rounds, steps):
  """Per-step times of each contender, taken in alternating rounds; returns medians and all times."""
  times = {name: [] for name in contenders}
  extras = {name: [] for name in contenders}
  for _ in range(rounds):
    for name, run in contenders.items():
      for _ in range(steps):
        t0 = time.perf_counter()
        extra = run()
        times[name].append(time.perf_counter() - t0)
        if extra:
          extras[name].append(extra)
  return times, extras


def plot(rows, path, title):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 3.8))
  names = [r["contender"] for r in rows]
  ax.barh(names, [r["step_ms"] for r in rows], color=["C0" if n.startswith("jax") else "C1" for n in names])
  ax.set_xscale("log")
  ax.set_xlabel("median step (ms, log)")
  ax.invert_yaxis()
  _common.save_figure(fig, title, path)


def main():
  parser = _common.argument_parser(__doc__)
  parser.add_argument("--batch", type=int, default=_common.BATCH)
  parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
  parser.add_argument("--steps", type=int, default=20, help="penalty steps per contender per round")
  parser.add_argument("--implicit_steps", type=int, default=3, help="implicit steps per contender per round")
  parser.add_argument("--check_steps", type=int, default=3)
  parser.add_argument("--rtol", type=float, default=1e-4)
  parser.add_argument("--fixed_work", action="store_true", help="implicit: inner_tol=0, cg_tol=0 in both")
  parser.add_argument("--no_compile", action="store_true", help="skip torch.compile")
  parser.add_argument("--adam", default="default", choices=["default", "foreach", "fused"], help="torch Adam implementation")
  parser.add_argument("--threads", type=int, nargs="+", default=None,
                      help="torch thread counts to time eager PyTorch with (default: torch's own and 1)")
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: 2 rounds of 3 steps (1 implicit), torch on 1 thread, no torch.compile")
  args = parser.parse_args()
  if args.quick:
    args.rounds, args.steps, args.implicit_steps, args.check_steps, args.no_compile = 2, 3, 1, 2, True
    args.threads = args.threads or [1]
  default_threads = torch.get_num_threads()
  threads = list(dict.fromkeys(args.threads or [default_threads, 1]))

  meta = _common.machine()
  x, y, source = _common.load_mnist(args.data_dir)
  meta |= dict(data=source, n_distill=_common.N_DISTILL, n_hidden=_common.N_HIDDEN, batch=args.batch, dtype="float32",
               rounds=args.rounds, quick=args.quick, adam=args.adam, fixed_work=args.fixed_work, torch_threads=threads,
               contended=_common.contended(meta))
  print(_common.header(meta) + f"; torch {torch.__version__} with {torch.get_num_threads()} threads")
  implicit_options = dict(inner_tol=0.0, cg_tol=0.0) if args.fixed_work else {}
  xt, yt = to_torch(np.asarray(x)), torch.from_numpy(np.asarray(y, np.int64))
  sampler = Sampler(xt, yt, args.batch)

  # --- Same maths: the check. ---
  # A constant mu: the peer has no schedule (the class default is distill's geometric one).
  penalty_options = dict(mu=1.0)
  solvers = {"penalty": bilevel.get_solver("penalty", **penalty_options),
             "implicit": bilevel.get_solver("implicit", **implicit_options)}
  jax_steps, states, problems = {}, {}, {}
  for name in solvers:
    options = implicit_options if name == "implicit" else penalty_options
    jax_steps[name], states[name], problems[name] = jax_contender(name, x, y, args.batch, **options)
  mu = float(solvers["penalty"].mu)
  # The peer takes the JAX solver's own settings (its optimisers' rates are the class defaults, 1e-2).
  torch_implicit_options = {k: getattr(solvers["implicit"], k) for k in (
      "inner_steps", "inner_tol", "damping", "cg_tol", "cg_steps", "head_steps", "warm_start_adjoint")}
  make = {
      "penalty": lambda *t: TorchPenalty(*t, mu=mu, adam=args.adam),
      "implicit": lambda *t: TorchImplicit(*t, adam=args.adam, **torch_implicit_options),
  }
  checks = {}
  torch.set_num_threads(min(threads))  # only the values matter here
  for name in solvers:
    worst, records = check(x, y, states[name], problems[name], solvers[name], make[name], args.check_steps, args.batch)
    checks[name] = dict(max_relative_difference=worst, per_step=records,
                        agree=all(v <= args.rtol for v in worst.values()))
    print(f"check {name}: max relative differences over {args.check_steps} steps "
          + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()) + (" OK" if checks[name]["agree"] else " DIFFER"))

  torch.set_num_threads(default_threads)

  # --- torch.compile of the penalty step. ---
  compile_info = dict(attempted=not args.no_compile)
  contenders_penalty = {}
  if not args.no_compile:
    for variant, fn in (("autograd", None), ("torch.func", functional_objective_and_grads(mu))):
      try:
        peer = TorchPenalty(*torch_inputs(states["penalty"]), mu=mu, adam=args.adam)
        compiled = torch.compile(fn or peer.objective_and_grads)
        peer.grads = compiled
        ref = TorchPenalty(*torch_inputs(states["penalty"]), mu=mu, adam=args.adam)
        xb, yb = sampler()
        t0 = time.perf_counter()
        got = peer.step(xb, yb)
        compile_info[variant] = dict(ok=True, first_call_s=time.perf_counter() - t0,
                                     graph_breaks=sum(torch._dynamo.utils.counters["graph_break"].values()))
        want = ref.step(xb, yb)
        compile_info[variant]["relative_difference"] = max(abs(got[k] - want[k]) / abs(want[k]) for k in want)
        contenders_penalty[f"torch.compile ({variant})"] = peer
        print(f"torch.compile ({variant}): ok, first call {compile_info[variant]['first_call_s']:.1f} s, "
              f"{compile_info[variant]['graph_breaks']} graph break(s)")
      except Exception as e:  # noqa: BLE001 - any failure of torch.compile is a finding to record
        compile_info[variant] = dict(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:500] if str(e) else ''}",
                                     traceback=traceback.format_exc()[-3000:])
        print(f"torch.compile ({variant}): FAILED: {compile_info[variant]['error']}")
      torch._dynamo.reset()
      torch._dynamo.utils.counters.clear()

  # --- Timing, interleaved. ---
  state_p = jax.tree.map(jnp.copy, states["penalty"])
  state_i = jax.tree.map(jnp.copy, states["implicit"])
  box = {"penalty": state_p, "implicit": state_i}

  def jax_run(name):
    def run():
      box[name], metrics = jax_steps[name](box[name])
      jax.block_until_ready((box[name], metrics))
      return {k: float(metrics[k]) for k in ("inner_steps", "cg_steps") if k in metrics}
    return run

  def torch_run(peer, threads, implicit=False):
    def run():
      if torch.get_num_threads() != threads:  # switches only between contenders' blocks of steps
        torch.set_num_threads(threads)
      out = peer.step(*sampler())
      return {k: out[k] for k in ("inner_steps", "cg_steps")} if implicit else None
    return run

  for run in (jax_run("penalty"), jax_run("implicit")):  # compile and warm up
    run()
    run()
  penalty, implicit = {"jax penalty": jax_run("penalty")}, {"jax implicit": jax_run("implicit")}
  for n in threads:
    peer_p = TorchPenalty(*torch_inputs(states["penalty"]), mu=mu, adam=args.adam)
    peer_i = TorchImplicit(*torch_inputs(states["implicit"]), adam=args.adam, **torch_implicit_options)
    penalty[f"torch eager, {n} thread(s): penalty"] = torch_run(peer_p, n)
    implicit[f"torch eager, {n} thread(s): implicit"] = torch_run(peer_i, n, implicit=True)
  penalty |= {f"{k}, {n} thread(s): penalty": torch_run(v, n) for k, v in contenders_penalty.items() for n in threads}
  for run in list(penalty.values()) + list(implicit.values())[1:]:  # warm up
    run()
  times, extras = time_interleaved(penalty, args.rounds, args.steps)
  t_imp, e_imp = time_interleaved(implicit, args.rounds, args.implicit_steps)
  times |= t_imp
  extras |= e_imp
  torch.set_num_threads(default_threads)

  medians = {k: statistics.median(v) for k, v in times.items()}
  rows = []
  for name, med in medians.items():
    solver = name.split()[-1]
    row = dict(contender=name, solver=solver, step_ms=med * 1e3, min_ms=min(times[name]) * 1e3, n=len(times[name]),
               ratio_to_jax=med / medians[f"jax {solver}"])
    for k in ("inner_steps", "cg_steps"):
      if extras[name]:
        row[k] = float(np.mean([e[k] for e in extras[name]]))
    rows.append(row)
  best_eager = {solver: min(v for k, v in medians.items() if k.startswith("torch eager") and k.endswith(solver))
                for solver in ("penalty", "implicit")}
  ratios = dict(best_torch_eager_over_jax_penalty=best_eager["penalty"] / medians["jax penalty"],
                best_torch_eager_over_jax_implicit=best_eager["implicit"] / medians["jax implicit"],
                jax_implicit_over_jax_penalty=medians["jax implicit"] / medians["jax penalty"])
  ratios |= {f"{r['contender']} / jax": r["ratio_to_jax"] for r in rows if not r["contender"].startswith("jax")}
  headers = ["contender", "median step (ms)", "min step (ms)", "steps timed", "time / JAX's", "inner steps", "CG its"]
  print(_common.markdown_table(headers, [[r["contender"], r["step_ms"], r["min_ms"], r["n"], r["ratio_to_jax"],
                                          r.get("inner_steps"), r.get("cg_steps")] for r in rows]))
  targets = dict(
      penalty_3x_faster_than_best_torch_eager=ratios["best_torch_eager_over_jax_penalty"] >= 3,
      penalty_at_most_8ms=medians["jax penalty"] <= 8e-3,
      implicit_within_3x_of_penalty=ratios["jax_implicit_over_jax_penalty"] <= 3,
  )
  print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
  print("targets (reported, not asserted): " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in targets.items()))
  json_path, png_path = _common.output_paths("torch_peer", args.quick)
  _common.write_json(json_path, meta, rows, ratios=ratios, targets=targets, checks=checks, torch_compile=compile_info)
  plot(rows, png_path, f"penalty and implicit steps, JAX vs PyTorch CPU; {meta['cpu']} x{meta['cpus_usable']}"
                       f"{' (CONTENDED)' if meta['contended'] else ''}")
  if not checks["penalty"]["agree"]:
    print(f"FAIL: the PyTorch penalty step differs from JAX's by more than rtol={args.rtol}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  main()
