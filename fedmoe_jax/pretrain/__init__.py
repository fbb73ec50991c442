"""Pretraining of the CPU-scale Switch Transformer (T5 span corruption on a shipped corpus), cached.

    python -m fedmoe_jax.pretrain --config=configs/pretrain.py --workdir=runs/pretrain

`train` holds the training loop, `cache` the cache of pretrained models (and the models shipped with
the package), `cli` the config -> run -> report path of the command above. The recipe, the cache and
the measurements: docs/pretraining.md. The span corruption itself is `fedmoe_jax.data.span_corruption`.
"""

from fedmoe_jax.pretrain.cache import (
    BENCHMARK_STEPS,
    DEFAULT_CACHE_DIR,
    DEFAULT_STEPS,
    ENTRY_FILE,
    ISA_FLAGS,
    RECIPE_VERSION,
    RUNTIME_FIELDS,
    SHIPPED_DIR,
    PretrainedModelMissing,
    build_environment,
    cache_key,
    entry_name,
    partial_dir,
    pretrained_entry,
    pretrained_params,
)
from fedmoe_jax.pretrain.cli import model_config, run_pretrain
from fedmoe_jax.pretrain.train import (
    DEFAULTS,
    HEALTH_BATCHES,
    MIN_INPUT_GAP,
    injected_optimizer,
    input_dependence,
    learning_rate_schedule,
    pretrain,
    train_config,
)

__all__ = [
    "BENCHMARK_STEPS",
    "DEFAULTS",
    "DEFAULT_CACHE_DIR",
    "DEFAULT_STEPS",
    "ENTRY_FILE",
    "HEALTH_BATCHES",
    "ISA_FLAGS",
    "MIN_INPUT_GAP",
    "RECIPE_VERSION",
    "RUNTIME_FIELDS",
    "SHIPPED_DIR",
    "PretrainedModelMissing",
    "build_environment",
    "cache_key",
    "entry_name",
    "injected_optimizer",
    "input_dependence",
    "learning_rate_schedule",
    "model_config",
    "partial_dir",
    "pretrain",
    "pretrained_entry",
    "pretrained_params",
    "run_pretrain",
    "train_config",
]
