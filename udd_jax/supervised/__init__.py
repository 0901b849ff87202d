"""Supervised dataset distillation baselines (docs/METHOD.md section 7): DD, DC, DSA, DM, MTT, KIP, GTN.

Each method maps labelled real images ``(n, H, W, C)`` to a :class:`SupervisedResult`
(a labelled distilled set); :func:`evaluate_synset` trains networks from scratch on it
(DC-BENCH), :func:`coreset` picks the random / herding / k-center baselines, and
:func:`from_unsupervised` / :func:`feature_probe` put unsupervised distilled sets in the
same table (and every set through the unsupervised protocol). :data:`DISTILLERS` maps each
method's name to its function (:mod:`udd_jax.supervised.methods`); what the methods share
(keys, options, the outer loop) is in :mod:`udd_jax.supervised.base`.
docs/SUPERVISED.md describes each method and how it departs from its paper.
"""

from udd_jax.supervised.artifacts import load_result as load_result
from udd_jax.supervised.artifacts import save_result as save_result
from udd_jax.supervised.augment import dsa as dsa
from udd_jax.supervised.base import Checkpoint as Checkpoint
from udd_jax.supervised.base import Setup as Setup
from udd_jax.supervised.base import run_outer_loop as run_outer_loop
from udd_jax.supervised.base import setup as setup
from udd_jax.supervised.compare import feature_probe as feature_probe
from udd_jax.supervised.compare import from_unsupervised as from_unsupervised
from udd_jax.supervised.compare import nearest_labels as nearest_labels
from udd_jax.supervised.coresets import coreset as coreset
from udd_jax.supervised.dc import distill_dc as distill_dc
from udd_jax.supervised.dd import distill_dd as distill_dd
from udd_jax.supervised.dd import retrain_dd as retrain_dd
from udd_jax.supervised.dm import distill_dm as distill_dm
from udd_jax.supervised.experts import load_experts as load_experts
from udd_jax.supervised.experts import train_experts as train_experts
from udd_jax.supervised.gradient_matching import match_distance as match_distance
from udd_jax.supervised.gtn import distill_gtn as distill_gtn
from udd_jax.supervised.kernels import conv_kernel as conv_kernel
from udd_jax.supervised.kernels import fc_kernel as fc_kernel
from udd_jax.supervised.kernels import get_kernel as get_kernel
from udd_jax.supervised.kip import distill_kip as distill_kip
from udd_jax.supervised.kip import kip_accuracy as kip_accuracy
from udd_jax.supervised.krr import kip_loss as kip_loss
from udd_jax.supervised.krr import krr_predict as krr_predict
from udd_jax.supervised.methods import DISTILLERS as DISTILLERS
from udd_jax.supervised.mtt import distill_mtt as distill_mtt
from udd_jax.supervised.networks import NETWORKS as NETWORKS
from udd_jax.supervised.networks import get_network as get_network
from udd_jax.supervised.result import SupervisedResult as SupervisedResult
from udd_jax.supervised.train import evaluate_synset as evaluate_synset
from udd_jax.supervised.train import train_network as train_network
from udd_jax.supervised.zca import kip_preprocessing as kip_preprocessing
