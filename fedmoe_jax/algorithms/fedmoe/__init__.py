"""FedMoE: Stage 1 (activation probabilities from a LoRA fine-tune, the Eq. 3 search for each client's
sub-MoE) and Stage 2 (modular aggregation by the engine, global expert recommendation)."""

from fedmoe_jax.algorithms.fedmoe.recommendation import (
    FedMoE,
    cosine_similarity,
    estimated_importance,
    recommend,
    reference_set,
)
from fedmoe_jax.algorithms.fedmoe.search import search_submodel, static_prediction

__all__ = [
    "FedMoE",
    "cosine_similarity",
    "estimated_importance",
    "recommend",
    "reference_set",
    "search_submodel",
    "static_prediction",
]
