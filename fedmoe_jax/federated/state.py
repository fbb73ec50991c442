"""Federated run state: the server's and every client's, stacked over clients.

Per-client state is one set of `[N, ...]` arrays (not a dict of client objects): expert maps,
the latest activation probabilities and validation scores, the improvement counters FedMoE's
recommendation needs, and an algorithm-specific `extra` pytree (e.g. SCAFFOLD controls).
The cohort's rows are read with `take` and written back with `put` each round.

Shape letters: N clients, C cohort, L MoE layers, E experts.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import numpy as np

PyTree = Any


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
        """A copy with the cohort's rows replaced by `rows` (`[C, ...]`)."""
        idx = np.asarray(cohort)

        def put(full, part):
            if isinstance(full, np.ndarray):
                out = full.copy()
                out[idx] = part
                return out
            return full.at[idx].set(part)

        return jax.tree.map(put, self, rows)


@flax.struct.dataclass
class ServerState:
    """Global parameters, the server optimizer's state and the number of finished rounds."""

    params: PyTree
    opt_state: PyTree
    round: int = flax.struct.field(pytree_node=False, default=0)
    extra: PyTree = None  # algorithm state kept by the server (e.g. SCAFFOLD's control variate)
