"""Federated run state: the server's and every client's, stacked over clients.

Per-client state is one set of `[N, ...]` arrays (not a dict of client objects): expert maps,
the latest activation probabilities and validation scores, the improvement counters FedMoE's
recommendation needs, and an algorithm-specific `extra` pytree (e.g. SCAFFOLD controls).
The cohort's rows are read with `take` and written back with `put` each round.

Shape letters: N clients, C cohort, L MoE layers, E experts.
"""

from __future__ import annotations

import os
from typing import Any

import flax
import jax
import numpy as np

from fedmoe_jax.errors import ConfigError

PyTree = Any
# At most this share of the machine's physical memory goes to per-client model copies (the rest: the
# round itself, the data, a checkpoint being written)
CLIENT_STATE_MEMORY_SHARE = 0.5


def host_memory_bytes() -> int:
    """Physical memory of this machine in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_client_state_memory(name: str, copies: int, num_clients: int, params: PyTree,
                              available: int | None = None) -> int:
    """Bytes of `copies` float32 model copies per registered client (`Algorithm.client_model_copies`);
    raises `ConfigError` (one line, before anything is allocated) when they exceed
    `CLIENT_STATE_MEMORY_SHARE` of `available` (default: this machine's physical memory)."""
    per_client = copies * 4 * sum(int(np.size(leaf)) for leaf in jax.tree.leaves(params))
    need = num_clients * per_client
    memory = available if available is not None else host_memory_bytes()
    limit = CLIENT_STATE_MEMORY_SHARE * memory
    if need > limit:
        raise ConfigError(
            f"{name} keeps {copies} model cop{'y' if copies == 1 else 'ies'} per registered client: "
            f"{num_clients} clients x {per_client / 2**20:.1f} MiB = {need / 2**30:.1f} GiB of host memory, "
            f"over {CLIENT_STATE_MEMORY_SHARE:.0%} of this machine's {memory / 2**30:.1f} GiB; use at most "
            f"{int(limit // max(per_client, 1))} clients (data.num_clients) or a method "
            "without per-client model state")
    return need


@flax.struct.dataclass
class ClientStates:
    """Stacked state of all N clients (host numpy arrays, except `extra` which may live on device)."""

    expert_maps: np.ndarray  # <bool>[N, L, E] the sub-MoE of each client
    probs: np.ndarray  # <f32>[N, L, E] latest activation probabilities (validation data; Stage 1's p
    # until the first evaluation for FedMoE; all zero: no profile yet)
    score: np.ndarray  # <f32>[N] latest validation score (NaN before the first)
    best_score: np.ndarray  # <f32>[N] best validation score so far (-inf before the first)
    best_loss: np.ndarray  # <f32>[N] validation loss of that best evaluation (+inf before the first)
    stale_rounds: np.ndarray  # <int32>[N] participations since the best score last improved
    frozen: np.ndarray  # <bool>[N] structure fixed for good (after a rollback)
    participations: np.ndarray  # <int32>[N] rounds the client was sampled in
    extra: PyTree = None  # algorithm state, leaves [N, ...]

    @classmethod
    def create(cls, expert_maps: np.ndarray, extra: PyTree = None, probs: np.ndarray | None = None
               ) -> ClientStates:
        """Round-0 state; `probs [N, L, E]` seeds the activation profiles (zeros: none yet)."""
        maps = np.asarray(expert_maps, bool)
        if maps.ndim != 3:
            raise ValueError(f"expert_maps must be [N, L, E], got shape {maps.shape}")
        if not maps.any(-1).all():
            raise ValueError("every client must keep at least one expert in every MoE layer")
        n = maps.shape[0]
        if probs is None:
            probs = np.zeros(maps.shape, np.float32)
        elif np.shape(probs) != maps.shape:
            raise ValueError(f"probs has shape {np.shape(probs)}; expected {maps.shape} like the expert maps")
        return cls(
            expert_maps=maps,
            probs=np.asarray(probs, np.float32).copy(),
            score=np.full(n, np.nan, np.float32),
            best_score=np.full(n, -np.inf, np.float32),
            best_loss=np.full(n, np.inf, np.float32),
            stale_rounds=np.zeros(n, np.int32),
            frozen=np.zeros(n, bool),
            participations=np.zeros(n, np.int32),
            extra=extra,
        )

    @property
    def num_clients(self) -> int:
        return self.expert_maps.shape[0]

    def expert_counts(self) -> np.ndarray:
        """Total experts per client over all MoE layers `[N]` (the paper's Table 2)."""
        return self.expert_maps.sum((1, 2))

    def take(self, cohort: np.ndarray) -> ClientStates:
        """The cohort's rows `[C, ...]` of every field."""
        return jax.tree.map(lambda a: a[np.asarray(cohort)], self)

    def put(self, cohort: np.ndarray, rows: ClientStates) -> ClientStates:
        """The states with the cohort's rows replaced by `rows` (`[C, ...]`).

        The metadata fields are copied (`[N, L, E]` at most: a round's cost stays independent of N in
        practice); host `extra` leaves, which may be a model copy per client (`[N, ...]` of the whole
        model), are written in place, so a round costs O(C) of them, not O(N): the `extra` of the
        states this is called on changes too."""
        idx = np.asarray(cohort)

        def put(full, part, in_place=False):
            if isinstance(full, np.ndarray):
                out = full if in_place else full.copy()
                out[idx] = part
                return out
            return full.at[idx].set(part)

        extra = jax.tree.map(lambda f, p: put(f, p, in_place=True), self.extra, rows.extra)
        meta = jax.tree.map(put, self.replace(extra=None), rows.replace(extra=None))
        return meta.replace(extra=extra)

    def extra_bytes(self) -> int:
        """Bytes of the per-client algorithm state `extra` (all N clients)."""
        return int(sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(self.extra)))


@flax.struct.dataclass
class ServerState:
    """Global parameters, the server optimizer's state and the number of finished rounds."""

    params: PyTree
    opt_state: PyTree
    round: int = flax.struct.field(pytree_node=False, default=0)
    extra: PyTree = None  # algorithm state kept by the server (e.g. SCAFFOLD's control variate)
