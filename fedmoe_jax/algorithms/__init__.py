"""Federated algorithms on the engine: FedAvg (base), and FedMoE and the baselines (later)."""

from fedmoe_jax.algorithms.base import Algorithm, CohortReport, record_report

__all__ = ["Algorithm", "CohortReport", "record_report"]
