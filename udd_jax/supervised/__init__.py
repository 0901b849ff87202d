"""Supervised dataset distillation baselines (SPEC section 7): DD, DC, DSA, DM, MTT, KIP, GTN.

Each method maps labelled real images ``(n, H, W, C)`` to a :class:`SupervisedResult`
(a labelled distilled set); ``evaluate_synset`` trains networks from scratch on it.
"""

from udd_jax.supervised.networks import NETWORKS as NETWORKS
from udd_jax.supervised.networks import get_network as get_network
from udd_jax.supervised.result import SupervisedResult as SupervisedResult
