"""Config -> run: the only reader of the ml_collections config (schema, validation, build, run)."""

from fedmoe_jax.errors import ConfigError
from fedmoe_jax.experiment.build import (
    Experiment,
    build,
    check,
    client_budgets,
    initial_params,
    loss_config,
    prepare_workdir,
    runtime_overrides,
    setup,
)
from fedmoe_jax.experiment.config import default_config, validate
from fedmoe_jax.experiment.run import run_experiment, run_experiments, vectorizable

__all__ = [
    "ConfigError",
    "Experiment",
    "build",
    "check",
    "client_budgets",
    "default_config",
    "initial_params",
    "loss_config",
    "prepare_workdir",
    "run_experiment",
    "run_experiments",
    "runtime_overrides",
    "setup",
    "validate",
    "vectorizable",
]
