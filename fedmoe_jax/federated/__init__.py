"""The federated engine: sub-MoE slots, modular aggregation (more in later modules)."""

from fedmoe_jax.federated.aggregate import masked_weighted_mean, scatter_weighted_mean
from fedmoe_jax.federated.submodel import (
    aggregate_cohort,
    bucket_width,
    expert_slots,
    gather_submodel,
    moe_layer_paths,
    scatter_submodel,
)

__all__ = [
    "aggregate_cohort",
    "bucket_width",
    "expert_slots",
    "gather_submodel",
    "masked_weighted_mean",
    "moe_layer_paths",
    "scatter_submodel",
    "scatter_weighted_mean",
]
