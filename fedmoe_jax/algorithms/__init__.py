"""Federated algorithms on the engine: FedAvg (base), FedMoE (Stage 1 + Stage 2), baselines."""

from fedmoe_jax.algorithms.baselines import SCAFFOLD, FedProx, LocalOnly, RandomMoE
from fedmoe_jax.algorithms.fedmoe import FedMoE, search_submodel
from fedmoe_jax.federated.algorithm import Algorithm, CohortReport, record_report

__all__ = [
    "SCAFFOLD",
    "Algorithm",
    "CohortReport",
    "FedMoE",
    "FedProx",
    "LocalOnly",
    "RandomMoE",
    "record_report",
    "search_submodel",
]
