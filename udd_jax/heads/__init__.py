"""Task heads: linear softmax (default) and closed-form ridge, vmapped over tasks."""

from udd_jax.heads.linear import HEADS as HEADS
from udd_jax.heads.linear import LinearHeadParams as LinearHeadParams
from udd_jax.heads.linear import NewtonLogisticHead as NewtonLogisticHead
from udd_jax.heads.linear import RidgeHead as RidgeHead
from udd_jax.heads.linear import SoftmaxHead as SoftmaxHead
from udd_jax.heads.linear import get_head as get_head
from udd_jax.heads.linear import multitask_loss as multitask_loss
