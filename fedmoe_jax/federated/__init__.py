"""The federated engine, generic over MoE models (`FederatedModel`): sub-MoE slots, local training,
modular aggregation, rounds, sharding, the trainer."""

from fedmoe_jax.federated.aggregate import masked_weighted_mean, scatter_weighted_mean
from fedmoe_jax.federated.model import FederatedModel, MoELayout, as_federated_model
from fedmoe_jax.federated.submodel import (
    aggregate_cohort,
    bucket_width,
    expert_slots,
    gather_submodel,
    moe_layer_paths,
    scatter_submodel,
)

__all__ = [
    "FederatedModel",
    "MoELayout",
    "as_federated_model",
    "aggregate_cohort",
    "bucket_width",
    "expert_slots",
    "gather_submodel",
    "masked_weighted_mean",
    "moe_layer_paths",
    "scatter_submodel",
    "scatter_weighted_mean",
]
