"""Memory model of a client's training (ours: the paper does not give its mem(.)) and client memory budgets.

The paper gives budgets (18-24 GB) but not the model behind mem(.). Ours [ASSUMPTION]:

    mem(sub-MoE) = params * bytes_per_param * state_multiplier + activations

with `state_multiplier = 4` (weights, gradients, two Adam moments: 16 B per fp32 parameter) and the
activation memory of a training step from Korthikanti et al. 2022 ("Reducing activation
recomputation"): per transformer block `s * b * h * (34 + 5 * a * s / h)` bytes at 16-bit,
scaled by `bytes_per_activation / 2`; decoder blocks count their cross-attention as a second
attention. Parameter counts come from `jax.eval_shape` (nothing is allocated).

An algorithm's extra per-client state during local training adds `extra_copies` copies of the
trained parameters at `bytes_per_param` (no gradients or moments for them):

    mem = mem(sub-MoE) + extra_copies * params * bytes_per_param

with `extra_copies = Algorithm.state_copies`: FedProx 1 (the anchor, the model as received),
SCAFFOLD 2 (the controls c and c_i), FedAvg, randomMoE, FedMoE and local training 0.

Shape letters: N clients, L MoE layers, E experts.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fedmoe_jax.federated.submodel import param_bytes
from fedmoe_jax.models.switch import SwitchConfig, SwitchTransformer

GB = 1e9


def parameter_counts(config: SwitchConfig) -> tuple[int, np.ndarray]:
    """Dense parameters (everything but experts and router columns) and per-expert parameters `[L]`."""
    shapes = jax.eval_shape(lambda: SwitchTransformer(config).init(
        jax.random.key(0), jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32))["params"])
    itemsize = np.dtype(config.jnp_param_dtype).itemsize
    dense, expert = param_bytes(shapes, config)
    return dense // itemsize, expert // itemsize


@dataclasses.dataclass(frozen=True)
class MemoryModel:
    """Training memory of a client's sub-MoE for a given batch and sequence lengths."""

    config: SwitchConfig
    batch_size: int = 8
    input_len: int = 512
    target_len: int = 64
    bytes_per_param: int = 4
    state_multiplier: float = 4.0  # weights + gradients + 2 Adam moments
    bytes_per_activation: int = 4

    def __post_init__(self):
        dense, expert = parameter_counts(self.config)
        object.__setattr__(self, "_dense_params", int(dense))
        object.__setattr__(self, "_expert_params", np.asarray(expert))

    @property
    def dense_bytes(self) -> float:
        """w_d of Eq. 3: dense parameters' training state plus the activations of a step."""
        return self._dense_params * self.bytes_per_param * self.state_multiplier + self.activation_bytes

    @property
    def expert_bytes(self) -> np.ndarray:
        """w_{i,j} of Eq. 3 per layer `[L]`: one expert's training state (its router column included)."""
        return self._expert_params * self.bytes_per_param * self.state_multiplier

    @property
    def activation_bytes(self) -> float:
        cfg, b = self.config, self.batch_size
        scale = self.bytes_per_activation / 2

        def block(s: int, attentions: int) -> float:
            h, a = cfg.d_model, cfg.num_heads
            return s * b * h * (34 + 5 * a * s / h * attentions)

        enc = cfg.num_layers * block(self.input_len, 1)
        dec = cfg.num_decoder_layers * block(self.target_len, 2)
        return float((enc + dec) * scale)

    def submodel_bytes(self, expert_mask: np.ndarray, extra_copies: float = 0) -> float:
        """mem(.) of a sub-MoE given by its expert map `<bool>[L, E]`, plus `extra_copies` copies
        of its parameters (an algorithm's extra state, `Algorithm.state_copies`)."""
        return self.counts_bytes(np.asarray(expert_mask, bool).sum(-1), extra_copies)

    def counts_bytes(self, counts: np.ndarray, extra_copies: float = 0) -> float:
        """`submodel_bytes` of a sub-MoE with `counts [L]` experts per layer."""
        counts = np.asarray(counts, np.int64)
        params = self._dense_params + np.sum(counts * self._expert_params)
        return float(self.dense_bytes + np.sum(counts * self.expert_bytes)
                     + extra_copies * params * self.bytes_per_param)

    def full_model_bytes(self, extra_copies: float = 0) -> float:
        return self.submodel_bytes(np.ones((self.config.num_moe_layers, self.config.num_experts), bool),
                                   extra_copies)


def draw_budgets(num_clients: int, low: float, high: float, seed: int, step: float = GB) -> np.ndarray:
    """Client memory budgets `[N]` uniform over {low, low + step, ..., high} (paper: 18..24 GB)."""
    if not 0 < low <= high:
        raise ValueError(f"budget range must satisfy 0 < low <= high, got {low}, {high}")
    levels = np.arange(low, high + step / 2, step)
    return np.random.default_rng([seed, 7]).choice(levels, num_clients)


def max_expert_totals(memory, budgets: np.ndarray) -> np.ndarray:
    """The most experts (all layers together) each client's whole budget M holds `[N]`: Stage 2's
    growth cap (Stage 1 searches under alpha * M, leaving (1 - alpha) * M to grow into)."""
    free = np.asarray(budgets, np.float64) - memory.dense_bytes
    return np.maximum(np.floor(free / float(np.max(memory.expert_bytes))), 0).astype(np.int64)
