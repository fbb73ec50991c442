"""What the federated engine needs of a MoE model: any Flax MoE model, not only the Switch Transformer.

The engine gathers, trains and aggregates parameter trees. It finds each MoE layer by its parameter
path (`moe_layer_paths`): under that path, `router/kernel` is `[D, E]` (one column per expert) and
every other leaf holds the experts stacked on axis 0 (`[E, ...]`), as `fedmoe_jax.models.MoELayer`
stores them. Everything else in the tree is dense (FedAvg). A model brings three more things: how
to build itself with S expert slots (a client's gathered sub-MoE), its training loss on a batch, and
optionally an evaluation. `fedmoe_jax.models.objective.SwitchMoE` is the Switch Transformer's;
`docs/engine.md` shows a decoder-only model of one's own.

Shape letters: B batch, L MoE layers, E experts (S slots in a narrowed model).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np

from fedmoe_jax.models.decoding import Decoding
from fedmoe_jax.models.moe import RoutingStats
from fedmoe_jax.models.objective import LossConfig, SwitchMoE
from fedmoe_jax.models.switch import SwitchConfig

Array = jax.Array
PyTree = Any


@runtime_checkable
class MoELayout(Protocol):
    """Where the experts are: E per MoE layer, and each MoE layer's parameter path (L of them)."""

    @property
    def num_experts(self) -> int: ...

    @property
    def moe_layer_paths(self) -> tuple[tuple[str, ...], ...]: ...


@runtime_checkable
class FederatedModel(MoELayout, Protocol):
    """A MoE model the engine can train as sub-MoEs. Must be hashable (it keys compiled programs).

    narrow(valid): the model applied to gathered sub-MoEs `valid <bool>[..., L, S]` (S expert slots).
    loss(params, batch, expert_mask [L, S], rng) -> (loss, (metrics dict of scalars, RoutingStats [L, S])),
      the training loss of one batch with the router restricted to `expert_mask`; `metrics["loss"]`
      is reported per client.
    evaluate(params, batch, expert_mask, max_length) -> (loss_sum, num_tokens, RoutingStats, tokens or
      None): optional, for validation inside rounds.
    """

    @property
    def num_moe_layers(self) -> int: ...

    def narrow(self, valid: np.ndarray) -> FederatedModel: ...

    def loss(self, params: PyTree, batch: Mapping[str, Array], expert_mask: Array, rng: Array
             ) -> tuple[Array, tuple[dict[str, Array], RoutingStats]]: ...


def as_federated_model(model: FederatedModel | SwitchConfig, loss_config: LossConfig | None = None,
                       decoding: Decoding | None = None) -> FederatedModel:
    """`model` itself, or a `SwitchConfig` wrapped as `SwitchMoE(config, loss_config, decoding)`."""
    if isinstance(model, SwitchConfig):
        return SwitchMoE(model, loss_config or LossConfig(), decoding or Decoding())
    if loss_config is not None and loss_config != LossConfig():
        raise ValueError("loss_config applies to a SwitchConfig; a FederatedModel brings its own loss")
    if decoding is not None and decoding != Decoding():
        raise ValueError("decoding applies to a SwitchConfig; a FederatedModel brings its own evaluate")
    if not isinstance(model, FederatedModel):
        raise TypeError(f"{type(model).__name__} is not a FederatedModel: it needs num_experts, "
                        "num_moe_layers, moe_layer_paths, narrow(valid) and loss(params, batch, "
                        "expert_mask, rng)")
    return model


__all__ = ["FederatedModel", "MoELayout", "as_federated_model"]
