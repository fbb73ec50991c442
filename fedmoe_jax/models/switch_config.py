"""The Switch Transformer's configuration: `SwitchConfig` (every field validated), the named configs of
the paper's models and of the CPU-scale and test models, and `get_config`.

Shape letters: E experts per MoE layer, L MoE layers (encoder first, then decoder).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from fedmoe_jax.models.dispatch import DROPLESS_IMPLS
from fedmoe_jax.models.moe import DISPATCH_MODES, DROPPED_TOKEN_MODES, get_activation

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Rematerialization of each block in training (`SwitchConfig.remat`): what the backward pass keeps.
#   none: every activation (fastest, most memory); full: only the block inputs, the rest recomputed;
#   dots: the outputs of matmuls without batch dimensions (projections, dense FFNs), elementwise work
#   and the batched attention / expert einsums recomputed (jax.checkpoint_policies).
# Fields that change how a step is computed, not what it computes (up to float rounding): left out
# of `SwitchConfig.identity`, so setting them, or adding such a field, never renames a pretrained
# cache entry or a shipped model and never blocks resuming a run.
COMPUTE_ONLY_FIELDS = ("remat", "capacity_min_experts", "dropless_impl", "block_rows")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class SwitchConfig:
    """Hyperparameters of a Switch Transformer; field names follow Hugging Face's config."""

    vocab_size: int = 32128
    d_model: int = 768
    d_kv: int = 64
    d_ff: int = 3072
    num_heads: int = 12
    num_layers: int = 12
    num_decoder_layers: int = 12
    encoder_sparse_step: int = 2
    decoder_sparse_step: int = 2
    num_experts: int = 8
    top_k: int = 1
    expert_capacity: int | None = 64
    capacity_factor: float | None = None
    # The fewest experts an expert_mask of a call allows (0: top_k): sizes the capacity-factor slot
    # buffer of a restricted layer (MoELayer.capacity); the engine sets it from the cohort's maps.
    capacity_min_experts: int = 0
    dispatch: str = "capacity"
    # How the dropless dispatch runs the experts (the same function either way; MoELayer):
    # "auto" (blocks on CPU, ragged_dot on accelerators), "blocks", "ragged"; block_rows 0: automatic.
    dropless_impl: str = "auto"
    block_rows: int = 0
    dropped_token_mode: str = "zero"
    renormalize_gates: bool = False
    router_jitter_noise: float = 0.01
    router_bias: bool = False
    router_z_loss_coef: float = 0.001
    router_aux_loss_coef: float = 0.001
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: str = "relu"
    gated_ffn: bool = False
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"  # a key of REMAT_POLICIES; the values do not change, only memory and time

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        positive = ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_experts", "top_k",
                    "relative_attention_num_buckets", "relative_attention_max_distance")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SwitchConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_layers", "num_decoder_layers", "encoder_sparse_step",
                     "decoder_sparse_step"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"SwitchConfig.{name} must be >= 0, got {getattr(self, name)}")
        fewest = self.capacity_min_experts
        if not (fewest == 0 or self.top_k <= fewest <= self.num_experts):
            raise ValueError(f"SwitchConfig.capacity_min_experts={self.capacity_min_experts} must be 0 or "
                             f"between top_k={self.top_k} and num_experts={self.num_experts}")
        if self.top_k > self.num_experts:
            raise ValueError(
                f"SwitchConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}"
            )
        if self.dispatch not in DISPATCH_MODES:
            raise ValueError(f"SwitchConfig.dispatch={self.dispatch!r}; use one of {DISPATCH_MODES}")
        if self.dropless_impl not in DROPLESS_IMPLS:
            raise ValueError(f"SwitchConfig.dropless_impl={self.dropless_impl!r}; "
                             f"use one of {DROPLESS_IMPLS}")
        if self.block_rows < 0:
            raise ValueError(f"SwitchConfig.block_rows={self.block_rows}; use >= 1 (0: automatic)")
        if self.dropped_token_mode not in DROPPED_TOKEN_MODES:
            raise ValueError(
                f"SwitchConfig.dropped_token_mode={self.dropped_token_mode!r}; "
                f"use one of {DROPPED_TOKEN_MODES}"
            )
        if self.dispatch == "capacity" and self.expert_capacity is None and not (
            self.capacity_factor and self.capacity_factor > 0
        ):
            raise ValueError(
                "SwitchConfig with dispatch='capacity' needs expert_capacity or a positive "
                "capacity_factor"
            )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"SwitchConfig.{name}={getattr(self, name)!r}; use one of "
                                 f"{sorted(DTYPES)}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"SwitchConfig.remat={self.remat!r}; use one of {sorted(REMAT_POLICIES)}")
        get_activation(self.dense_act_fn)
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"SwitchConfig.dropout_rate must be in [0, 1), got {self.dropout_rate}")

    def replace(self, **changes: Any) -> SwitchConfig:
        return dataclasses.replace(self, **changes)

    def identity(self) -> dict[str, Any]:
        """The fields as a dict, less `COMPUTE_ONLY_FIELDS`: what names a pretrained model (cache
        key) and what a checkpoint must match to be resumed."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in COMPUTE_ONLY_FIELDS}

    @staticmethod
    def is_sparse(block: int, sparse_step: int) -> bool:
        """Hugging Face's placement rule for the MoE FFN of block `block`."""
        return (block % sparse_step == 1 or sparse_step == 1) if sparse_step > 0 else False

    @property
    def encoder_moe_blocks(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if self.is_sparse(i, self.encoder_sparse_step))

    @property
    def decoder_moe_blocks(self) -> tuple[int, ...]:
        return tuple(
            i for i in range(self.num_decoder_layers) if self.is_sparse(i, self.decoder_sparse_step)
        )

    @property
    def num_moe_layers(self) -> int:
        """L: MoE layers of the whole model, encoder first."""
        return len(self.encoder_moe_blocks) + len(self.decoder_moe_blocks)

    @property
    def moe_layer_names(self) -> tuple[tuple[str, int], ...]:
        """`(stack, block)` of each MoE layer in the order of the L axis."""
        return tuple(("encoder", i) for i in self.encoder_moe_blocks) + tuple(
            ("decoder", i) for i in self.decoder_moe_blocks
        )

    @property
    def moe_layer_paths(self) -> tuple[tuple[str, ...], ...]:
        """Parameter path of each MoE layer's `MoELayer` (router and stacked experts), L-axis order."""
        return tuple((stack, f"block_{i}", "mlp") for stack, i in self.moe_layer_names)

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    @property
    def jnp_param_dtype(self):
        return DTYPES[self.param_dtype]


def _base(num_experts: int) -> SwitchConfig:
    return SwitchConfig(num_experts=num_experts)


NAMED_CONFIGS: dict[str, SwitchConfig] = {
    **{f"switch-base-{e}": _base(e) for e in (8, 16, 32, 64, 128)},
    # The CPU-scale model of the benchmarks and the embedded-data experiments.
    "switch-small-16": SwitchConfig(
        vocab_size=4096, d_model=128, d_kv=32, d_ff=512, num_heads=4, num_layers=4,
        num_decoder_layers=4, num_experts=16, expert_capacity=64,
    ),
    # For tests: a few thousand parameters, 2 encoder + 2 decoder blocks (one MoE layer each; compile
    # time grows with depth and dominates the test suite).
    "switch-tiny-4": SwitchConfig(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2,
        num_decoder_layers=2, num_experts=4, expert_capacity=8, relative_attention_num_buckets=8,
        relative_attention_max_distance=16, dropout_rate=0.0, router_jitter_noise=0.0,
    ),
    "switch-tiny-8": SwitchConfig(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2,
        num_decoder_layers=2, num_experts=8, expert_capacity=8, relative_attention_num_buckets=8,
        relative_attention_max_distance=16, dropout_rate=0.0, router_jitter_noise=0.0,
    ),
}


def get_config(name: str, **overrides: Any) -> SwitchConfig:
    """A named config (`switch-base-8/16/32/64/128`, `switch-small-16`, `switch-tiny-4/8`)."""
    if name not in NAMED_CONFIGS:
        raise ValueError(f"unknown model config {name!r}; use one of {sorted(NAMED_CONFIGS)}")
    return NAMED_CONFIGS[name].replace(**overrides)
