"""One API style across the two halves (issue 25): the former names are refused with the new ones."""

import numpy as np
import pytest

import udd_jax
from udd_jax.supervised import base, coresets, dc, dd, dm, experts, gtn, kip, mtt, table, train
from udd_jax.supervised.result import SupervisedResult

X, Y = np.zeros((4, 3, 3, 1)), np.array([0, 1, 0, 1])


@pytest.mark.parametrize(
    "call, old, new",
    [
        (lambda **kw: dc.distill_dc(X, Y, ipc=1, **kw), "key", "seed"),
        (lambda **kw: dc.distill_dc(X, Y, ipc=1, seed=0, **kw), "lr_images", "image_lr"),
        (lambda **kw: dc.distill_dc(X, Y, ipc=1, seed=0, **kw), "lr_network", "network_lr"),
        (lambda **kw: dm.distill_dm(X, Y, ipc=1, **kw), "key", "seed"),
        (lambda **kw: dm.distill_dm(X, Y, ipc=1, seed=0, **kw), "lr_images", "image_lr"),
        (lambda **kw: dd.distill_dd(X, Y, ipc=1, seed=0, **kw), "lr_images", "image_lr"),
        (lambda **kw: dd.distill_dd(X, Y, ipc=1, seed=0, **kw), "lr_step_sizes", "step_size_lr"),
        (lambda **kw: dd.retrain_dd(SupervisedResult(X, Y, {"method": "dd"}), **kw), "key", "seed"),
        (lambda **kw: mtt.distill_mtt(X, Y, ipc=1, seed=0, expert_dir="none", **kw), "lr_images", "image_lr"),
        (lambda **kw: mtt.distill_mtt(X, Y, ipc=1, seed=0, expert_dir="none", **kw), "lr_lr", "student_lr_lr"),
        (lambda **kw: gtn.distill_gtn(X, Y, ipc=1, seed=0, **kw), "lr_generator", "generator_lr"),
        (lambda **kw: gtn.distill_gtn(X, Y, ipc=1, seed=0, **kw), "lr_curriculum", "curriculum_lr"),
        (lambda **kw: gtn.distill_gtn(X, Y, ipc=1, seed=0, **kw), "lr_inner_lr", "inner_lr_lr"),
        (lambda **kw: kip.distill_kip(X, Y, ipc=1, **kw), "key", "seed"),
        (lambda **kw: coresets.coreset(X, Y, 1, method="random", **kw), "key", "seed"),
        (lambda **kw: experts.train_experts(X, Y, n_experts=1, epochs=1, workdir="none", **kw), "key", "seed"),
        (lambda **kw: train.train_network("mlp", X, Y, **kw), "key", "seed"),
        (lambda **kw: train.evaluate_synset(X, Y, (X, Y), **kw), "key", "seed"),
        (lambda **kw: base.setup(X, Y, ipc=1, iterations=1, **kw), "key", "seed"),
        (lambda **kw: udd_jax.supervised.feature_probe(X[..., 0], (X[..., 0], Y), (X[..., 0], Y), **kw), "seeds", "n_seeds"),
        (lambda **kw: table.probe_cells("none", data_dir=None, probe_ipcs=[1], **kw), "seeds", "n_seeds"),
        (lambda **kw: udd_jax.evaluate(X[..., 0], (X[..., 0], Y), (X[..., 0], Y), n_hidden=2, **kw), "seeds", "n_seeds"),
    ],
)
def test_old_argument_names_are_refused_with_the_new_name(call, old, new):
  with pytest.raises(TypeError, match=f"'{old}', which is now called '{new}'"):
    call(**{old: 0})


@pytest.mark.parametrize("distill", [
    lambda: dc.distill_dc(X, Y, ipc=1, seed=0, init="noise"),
    lambda: dm.distill_dm(X, Y, ipc=1, seed=0, init="noise"),
    lambda: kip.distill_kip(X, Y, ipc=1, seed=0, init="noise"),
    lambda: mtt.distill_mtt(X, Y, ipc=1, seed=0, expert_dir="none", init="noise"),
])
def test_init_noise_is_refused_with_random(distill):
  with pytest.raises(ValueError, match="init='noise' is now called init='random'"):
    distill()
