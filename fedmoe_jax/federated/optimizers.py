"""The local optimizers of experiments and pretraining, by name.

A thin choice between two optax optimizers (no optimizer code of ours): AdamW, the default of the
federated experiments (ours: the paper names no optimizer), and Adafactor as T5 and Switch were
trained with: factored second moments, each update scaled by its parameter's RMS and clipped at
RMS 1. With AdamW, the CPU-scale Switch model did not learn to use its encoder in pretraining
(`fedmoe_jax.pretrain`), which is why both are selectable.
"""

from __future__ import annotations

import optax

OPTIMIZERS = ("adamw", "adafactor")


def make_optimizer(name: str, learning_rate: float | optax.Schedule,
                   weight_decay: float = 0.0) -> optax.GradientTransformation:
    """`optax.adamw(learning_rate, weight_decay=)` or `optax.adafactor(learning_rate,
    multiply_by_parameter_scale=True, clipping_threshold=1.0, weight_decay_rate=)` (decoupled decay;
    0 = none). The rate may be an optax schedule or, under `optax.inject_hyperparams`, an array."""
    if name == "adamw":
        return optax.adamw(learning_rate, weight_decay=weight_decay)
    if name == "adafactor":
        return optax.adafactor(learning_rate, multiply_by_parameter_scale=True, clipping_threshold=1.0,
                               weight_decay_rate=weight_decay or None)
    raise ValueError(f"optimizer={name!r}; use one of {OPTIMIZERS}")
