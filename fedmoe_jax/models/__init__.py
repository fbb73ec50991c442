"""Pure Flax (linen) modules: the MoE layer and the Switch Transformer."""

from fedmoe_jax.models.decoding import DecodeOutput, Decoding, beam_search, greedy_decode
from fedmoe_jax.models.moe import (
    MASK_VALUE,
    Experts,
    MoELayer,
    Router,
    RoutingStats,
    compute_capacity,
    put_experts,
    take_experts,
)
from fedmoe_jax.models.switch import (
    NAMED_CONFIGS,
    SwitchConfig,
    SwitchOutput,
    SwitchTransformer,
    cross_entropy,
    get_config,
    shift_right,
    switch_loss,
)

__all__ = [
    "MASK_VALUE",
    "NAMED_CONFIGS",
    "DecodeOutput",
    "Decoding",
    "Experts",
    "MoELayer",
    "Router",
    "RoutingStats",
    "SwitchConfig",
    "SwitchOutput",
    "SwitchTransformer",
    "beam_search",
    "compute_capacity",
    "cross_entropy",
    "get_config",
    "greedy_decode",
    "put_experts",
    "shift_right",
    "switch_loss",
    "take_experts",
]
