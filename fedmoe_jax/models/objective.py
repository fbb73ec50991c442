"""The one training objective of a Switch Transformer, and the engine's view of that model.

`seq2seq_loss` is Eq. (1) on a batch of the per-client arrays: padding examples masked out, decoder
inputs shifted right, label-smoothed cross-entropy plus the load-balance and z-losses of the MoE
layers. Every loop that trains a Switch model (federated rounds, Stage 1's LoRA rounds, pretraining)
calls it. `SwitchMoE` wraps a `SwitchConfig` with its loss weights into the small object the federated
engine trains (`fedmoe_jax.federated.model.FederatedModel`): where the MoE layers are, how to narrow the
model to S expert slots, the loss, and evaluation with greedy or beam decoding (`Decoding`).

Shape letters: B batch, S_in input tokens, T target tokens, L MoE layers, E experts (or slots).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedmoe_jax.models.decoding import Decoding
from fedmoe_jax.models.moe import RoutingStats
from fedmoe_jax.models.switch import (
    SwitchConfig,
    SwitchOutput,
    SwitchTransformer,
    cross_entropy,
    shift_right,
    switch_loss,
)

Array = jax.Array
PyTree = Any


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Weights of Eq. (1): label smoothing, load balance (its alpha), router z-loss."""

    label_smoothing: float = 0.1
    lb_loss_weight: float = 0.001
    z_loss_weight: float = 0.001


def batch_masks(batch: Mapping[str, Array]) -> tuple[Array, Array]:
    """Encoder / decoder token masks `[B, S_in]`, `[B, T]` with padding examples (`example_mask`, when
    the batch has one) zeroed."""
    enc, dec = batch["input_mask"], batch["target_mask"]
    if "example_mask" in batch:
        ex = batch["example_mask"].astype(jnp.float32)
        enc, dec = enc * ex[:, None], dec * ex[:, None]
    return enc, dec


def seq2seq_apply(model: SwitchTransformer, params: PyTree, batch: Mapping[str, Array],
                  expert_mask: Array | None = None, rng: Array | None = None
                  ) -> tuple[SwitchOutput, Array, Array]:
    """Teacher-forced forward pass on one batch: `(output, encoder mask [B, S_in], decoder mask [B, T])`
    (`batch_masks`); dropout and router jitter from `rng` (None: deterministic)."""
    config = model.config
    enc, dec = batch_masks(batch)
    decoder_inputs = shift_right(batch["targets"], config.decoder_start_token_id, config.pad_token_id)
    if rng is None:
        return model.apply({"params": params}, batch["inputs"], decoder_inputs, enc, dec,
                           expert_mask=expert_mask), enc, dec
    dropout_rng, jitter_rng = jax.random.split(rng)
    return model.apply({"params": params}, batch["inputs"], decoder_inputs, enc, dec,
                       expert_mask=expert_mask, deterministic=False,
                       rngs={"dropout": dropout_rng, "jitter": jitter_rng}), enc, dec


def seq2seq_loss(model: SwitchTransformer, params: PyTree, batch: Mapping[str, Array],
                 loss_config: LossConfig = LossConfig(), expert_mask: Array | None = None,
                 rng: Array | None = None) -> tuple[Array, tuple[dict[str, Array], RoutingStats]]:
    """Eq. (1) on one batch: `(loss, (metrics, routing))`.

    batch: `inputs`, `input_mask [B, S_in]`, `targets`, `target_mask [B, T]` (int), optionally
    `example_mask [B]`. expert_mask: `<bool>[L, E]` the sub-MoE (None: every expert). rng: dropout and
    router jitter (training mode); None applies the model deterministically. metrics: loss, ce,
    lb_loss, z_loss; routing: `RoutingStats [L, E]` of the batch.
    """
    out, _, dec = seq2seq_apply(model, params, batch, expert_mask, rng)
    loss, metrics = switch_loss(out, batch["targets"], dec, loss_config.label_smoothing,
                                loss_config.lb_loss_weight, loss_config.z_loss_weight)
    return loss, (metrics, out.routing)


def capacity_bound(valid: np.ndarray, top_k: int = 1) -> int:
    """The fewest experts a real client keeps in any layer of `valid <bool>[..., L, S]`: S when every
    slot is kept, else rounded down to a power of two (few distinct programs), at least `top_k`.
    Clients with an empty layer are padding and do not count. Sizes the capacity-factor slot buffer
    (`SwitchConfig.capacity_min_experts`).
    """
    width = int(np.shape(valid)[-1])
    counts = np.asarray(valid, bool).sum(-1).reshape(-1, np.shape(valid)[-2])  # [clients, L]
    real = counts.min(-1) > 0
    fewest = int(counts[real].min()) if real.any() else width
    if fewest >= width:
        return width
    return min(max(1 << (fewest.bit_length() - 1), top_k), fewest)


def narrow_config(config: SwitchConfig, valid: np.ndarray) -> SwitchConfig:
    """The model a cohort's gathered sub-MoEs `valid <bool>[..., L, S]` are applied with: S experts,
    and with a capacity factor a slot buffer that holds the capacity of its smallest client."""
    width = int(np.shape(valid)[-1])
    bound = 0
    if config.dispatch == "capacity" and config.expert_capacity is None:
        bound = capacity_bound(valid, config.top_k)
    return config.replace(num_experts=width, capacity_min_experts=bound)


@dataclasses.dataclass(frozen=True)
class SwitchMoE:
    """A Switch Transformer as the federated engine trains it (`FederatedModel`); hashable, so it keys
    compiled programs. `config.num_experts` is E for the global model, S for a narrowed one;
    `decoding`: how `evaluate` generates (greedy by default)."""

    config: SwitchConfig
    loss_config: LossConfig = LossConfig()
    decoding: Decoding = Decoding()

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @property
    def num_moe_layers(self) -> int:
        return self.config.num_moe_layers

    @property
    def moe_layer_paths(self) -> tuple[tuple[str, ...], ...]:
        return self.config.moe_layer_paths

    def narrow(self, valid: np.ndarray) -> SwitchMoE:
        """The model of gathered sub-MoEs `valid <bool>[..., L, S]` (`narrow_config`)."""
        return dataclasses.replace(self, config=narrow_config(self.config, valid))

    def loss(self, params: PyTree, batch: Mapping[str, Array], expert_mask: Array, rng: Array
             ) -> tuple[Array, tuple[dict[str, Array], RoutingStats]]:
        """Training loss (dropout and jitter from `rng`; None: deterministic): `seq2seq_loss`."""
        return seq2seq_loss(SwitchTransformer(self.config), params, batch, self.loss_config, expert_mask,
                            rng)

    def evaluate(self, params: PyTree, batch: Mapping[str, Array], expert_mask: Array,
                 max_length: int = 0) -> tuple[Array, Array, RoutingStats, Array | None]:
        """Deterministic evaluation of one batch: `(loss_sum, num_tokens, routing [L, E], tokens)`, the
        unsmoothed cross-entropy summed over real target tokens, and with `max_length > 0` the
        predictions `tokens [B, max_length]` of `self.decoding` (else None)."""
        model = SwitchTransformer(self.config)
        out, enc, dec = seq2seq_apply(model, params, batch, expert_mask)
        n_tokens = dec.sum()
        loss_sum = cross_entropy(out.logits, batch["targets"], dec) * n_tokens
        task = batch["task"][0] if "task" in batch else None  # a client's batch is one task
        tokens = (self.decoding(model, params, batch["inputs"], enc, max_length, expert_mask, task).tokens
                  if max_length else None)
        return loss_sum, n_tokens, out.routing, tokens


__all__ = ["LossConfig", "SwitchMoE", "batch_masks", "capacity_bound", "narrow_config", "seq2seq_apply",
           "seq2seq_loss"]
