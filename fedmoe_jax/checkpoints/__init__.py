"""Checkpoint import/export: Hugging Face SwitchTransformers safetensors <-> params."""

from fedmoe_jax.checkpoints.hf_switch import (
    config_from_hf,
    config_to_hf,
    load_hf_switch,
    save_hf_switch,
    to_hf_state,
)

__all__ = ["config_from_hf", "config_to_hf", "load_hf_switch", "save_hf_switch", "to_hf_state"]
