"""The benchmark's workload: `Preset`s (model dims, round shape, sub-MoE sizes) and the `Workload`
every contender trains (random sub-MoEs, token batches and initial parameters).

Shape letters: C clients, K local steps, B batch, S_in / T input / target tokens, L MoE layers,
E experts, S slots.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
import optax

from fedmoe_jax.federated.submodel import bucket_width, expert_slots, narrow_config
from fedmoe_jax.models.switch import SwitchConfig, SwitchTransformer

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Preset:
    """One benchmark workload (model dims, round shape, sub-MoE sizes)."""

    model: SwitchConfig
    batch_size: int
    input_len: int
    target_len: int
    cohort_size: int
    local_steps: int
    min_kept: int  # experts each client keeps per MoE layer, drawn uniformly in [min_kept, max_kept]
    max_kept: int
    learning_rate: float = 1e-3

    def replace(self, **changes: Any) -> Preset:
        return dataclasses.replace(self, **changes)


def _small(**model: Any) -> SwitchConfig:
    # The CPU-scale experiments' routing: dropless (every routed token computed; the torch contender
    # gives HF a capacity of the whole sequence, so it drops nothing either). `--model=dispatch=capacity`
    # routes with capacity factor 2 of the sub-MoE's slots instead (HF: the same absolute capacity).
    base = dict(vocab_size=4096, d_model=128, d_kv=32, d_ff=512, num_heads=4, num_layers=4,
                num_decoder_layers=4, num_experts=16, expert_capacity=None, capacity_factor=2.0,
                dispatch="dropless")
    return SwitchConfig(**{**base, **model})


PRESETS: dict[str, Preset] = {
    # Fixed so that figures stay comparable across commits.
    "cpu-small": Preset(_small(), batch_size=16, input_len=64, target_len=16, cohort_size=8,
                        local_steps=4, min_kept=4, max_kept=8),
    "cpu-medium": Preset(_small(d_model=256, d_ff=1024, num_heads=8, num_layers=6, num_decoder_layers=6,
                                num_experts=32), batch_size=16, input_len=128, target_len=32,
                         cohort_size=8, local_steps=4, min_kept=8, max_kept=16),
    # A few seconds: tests and smoke runs of the benchmark itself.
    "tiny": Preset(_small(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2,
                          num_decoder_layers=2, num_experts=8, relative_attention_num_buckets=8,
                          relative_attention_max_distance=16), batch_size=2, input_len=8, target_len=4,
                   cohort_size=3, local_steps=2, min_kept=2, max_kept=4),
    # switch-base-32 dims in bf16 (paper-like); for accelerators.
    "gpu": Preset(SwitchConfig(num_experts=32, vocab_size=32128, expert_capacity=None, capacity_factor=2.0,
                               dtype="bfloat16"),
                  batch_size=8, input_len=512, target_len=64, cohort_size=8, local_steps=4,
                  min_kept=8, max_kept=16),
}


@dataclasses.dataclass
class Workload:
    """A round's inputs, shared by every contender (host numpy arrays)."""

    preset: Preset
    params: PyTree  # global parameters (E experts)
    maps: np.ndarray  # <bool>[C, L, E]
    width: int  # S
    indices: np.ndarray  # <int32>[C, L, S]
    valid: np.ndarray  # <bool>[C, L, S]
    batches: dict[str, np.ndarray]  # [C, K, B, ...]
    step_mask: np.ndarray  # <bool>[C, K]
    weights: np.ndarray  # <f32>[C]
    seed: int

    @property
    def narrow_config(self) -> SwitchConfig:
        return narrow_config(self.preset.model, self.valid)

    def client_keys(self) -> jax.Array:
        root = jax.random.key(self.seed)
        return jax.random.wrap_key_data(np.stack([jax.random.key_data(jax.random.fold_in(root, c))
                                                  for c in range(len(self.maps))]))


def make_workload(preset: Preset, seed: int = 0, params: PyTree | None = None) -> Workload:
    """Random sub-MoEs, random token batches (every token real) and random initial parameters."""
    cfg, c, k, b = preset.model, preset.cohort_size, preset.local_steps, preset.batch_size
    rng = np.random.default_rng(seed)
    maps = np.zeros((c, cfg.num_moe_layers, cfg.num_experts), bool)
    for i in range(c):
        for layer in range(cfg.num_moe_layers):
            kept = rng.integers(preset.min_kept, preset.max_kept + 1)
            maps[i, layer, rng.choice(cfg.num_experts, kept, replace=False)] = True
    width = bucket_width(int(maps.sum(-1).max()), cfg.num_experts)
    indices, valid = (np.asarray(a) for a in expert_slots(maps, width))
    vocab = cfg.vocab_size
    batches = {
        "inputs": rng.integers(2, vocab, (c, k, b, preset.input_len)).astype(np.int32),
        "input_mask": np.ones((c, k, b, preset.input_len), np.int32),
        "targets": rng.integers(2, vocab, (c, k, b, preset.target_len)).astype(np.int32),
        "target_mask": np.ones((c, k, b, preset.target_len), np.int32),
        "example_mask": np.ones((c, k, b), bool),
    }
    if params is None:
        model = SwitchTransformer(cfg)
        params = jax.jit(lambda key: model.init(key, batches["inputs"][0, 0], batches["targets"][0, 0])[
            "params"])(jax.random.key(seed))
    return Workload(preset, params, maps, width, indices, valid, batches, np.ones((c, k), bool),
                    np.full(c, float(b * k), np.float32), seed)


def optimizer(preset: Preset) -> optax.GradientTransformation:
    return optax.adamw(preset.learning_rate, weight_decay=0.01)
