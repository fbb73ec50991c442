"""The algorithm interface the federated loop calls, and FedAvg over sub-MoEs.

An algorithm says which experts each client holds at the start, what local training adds
(`LocalHooks`: a loss term, a gradient correction), what per-client state it keeps, and how that
state changes after a round. Everything else (sampling, gathering, vectorized training, modular
aggregation, evaluation, checkpoints) is the loop's, so FedAvg, FedProx, SCAFFOLD, randomMoE and
FedMoE stay small modules instead of forks of the loop.

Shape letters: N clients, C cohort, L MoE layers, E experts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from fedmoe_jax.federated.state import ClientStates
from fedmoe_jax.models.switch import SwitchConfig

PyTree = Any
Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LocalHooks:
    """Algorithm-specific pieces of local training (all optional).

    loss_term(params, anchor, extra) -> scalar added to the loss (FedProx: mu/2 ||w - w_global||^2).
    grad_correction(grads, extra) -> grads, applied before the optimizer.
    update_correction(updates, extra) -> updates, applied to the optimizer's output (the step added
      to the params; SCAFFOLD: u - lr (c - c_i), which under SGD is the gradient g - c_i + c).
    `anchor` is the sub-MoE as received; `extra` is the client's algorithm state (any pytree).
    """

    loss_term: Callable[[PyTree, PyTree, PyTree], Array] | None = None
    grad_correction: Callable[[PyTree, PyTree], PyTree] | None = None
    update_correction: Callable[[PyTree, PyTree], PyTree] | None = None


@dataclasses.dataclass
class CohortReport:
    """What the cohort sent back in one round (host arrays, unpadded, `[C, ...]`)."""

    round: int
    cohort: np.ndarray  # <int32>[C] client ids
    train_loss: np.ndarray  # <f32>[C]
    num_examples: np.ndarray  # [C] aggregation weights
    val_scores: np.ndarray  # <f32>[C] primary validation metric (NaN when not evaluated)
    val_probs: np.ndarray  # <f32>[C, L, E] activation probabilities on validation data
    client_params: PyTree = None  # trained narrow sub-MoEs [C, ...], when the algorithm asks
    num_steps: np.ndarray | None = None  # <int32>[C] real local steps of each client
    val_losses: np.ndarray | None = None  # <f32>[C] validation loss (NaN when not evaluated)


class Algorithm:
    """FedAvg over sub-MoEs: every client holds every expert unless a subclass says otherwise."""

    name = "fedavg"
    hooks: LocalHooks = LocalHooks()
    needs_client_params = False
    comm_multiplier = 1  # transfers per round relative to the sub-MoE (SCAFFOLD: 2, with controls)
    # extra copies of the trained parameters a client holds in local training (`MemoryModel`)
    state_copies = 0
    # False: no server; each client keeps its own model in `states.extra` (`[N, ...]` full trees)
    aggregates = True
    # float32 copies of the whole model the server keeps per registered client in `states.extra`
    # (SCAFFOLD's c_i, local's personal models): host memory N x this x the model's bytes
    client_model_copies = 0

    def initial_expert_maps(self, config: SwitchConfig, num_clients: int, seed: int) -> np.ndarray:
        """`<bool>[N, L, E]` the sub-MoE each client starts with."""
        return np.ones((num_clients, config.num_moe_layers, config.num_experts), bool)

    def initial_profiles(self, config: SwitchConfig, num_clients: int) -> np.ndarray | None:
        """`<f32>[N, L, E]` activation profiles the clients start with (None: none until evaluated)."""
        return None

    def init_extra(self, num_clients: int, params: PyTree) -> PyTree:
        """Per-client algorithm state, leaves `[N, ...]` (None if none)."""
        return None

    def init_server_extra(self, params: PyTree) -> PyTree:
        """Algorithm state the server keeps (None if none)."""
        return None

    def cohort_extra(self, states: ClientStates, cohort: np.ndarray, server_extra: PyTree) -> PyTree:
        """The `extra` argument of the cohort's local training, leaves `[C, ...]`."""
        return None

    def local_extra(self, states: ClientStates, clients: np.ndarray, server_extra: PyTree) -> PyTree:
        """The `extra` of local training outside a round (fine-tuning never-sampled clients before
        their test), leaves `[C, ...]`; unlike `cohort_extra` it records nothing for the round."""
        return None

    def update_server(self, server_extra: PyTree, report: CohortReport, params: PyTree) -> PyTree:
        """New server-side algorithm state after a round (`params`: the new global parameters)."""
        return server_extra

    def update_clients(self, states: ClientStates, report: CohortReport) -> ClientStates:
        """New client states after a round (default: record scores and probabilities)."""
        return record_report(states, report)

    def round_log(self) -> dict[str, Any]:
        """Fields the round just finished adds to its `metrics.jsonl` row (FedMoE: its `events`); called
        once per round after `update_clients`, so an algorithm may hand over and forget what it logged."""
        return {}

    def summary_fields(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        """Fields the algorithm adds to `summary.json`, from the run's metrics rows `history`."""
        return {}


def improves(score: np.ndarray, loss: np.ndarray, best_score: np.ndarray, best_loss: np.ndarray,
             loss_tie_break: bool = False) -> np.ndarray:
    """`<bool>[C]`: `score > best_score`, or with `loss_tie_break` an equal score at a lower loss.

    The tie-break is ours (not the paper's): while the generated outputs of a small model are all
    wrong, every validation score is 0 and "better than the best" never holds; the teacher-forced
    loss still tells an improving client from a stale one. NaN losses never win a tie.
    """
    better = score > best_score
    if loss_tie_break:
        better = better | ((score == best_score) & (loss < best_loss))
    return better


def record_report(states: ClientStates, report: CohortReport, loss_tie_break: bool = False
                  ) -> ClientStates:
    """Store the cohort's latest probabilities and scores; count rounds without improvement.

    A client improves when its score beats its best (`improves`; with `loss_tie_break`, an equal
    score at a lower validation loss counts too).
    """
    rows = states.take(report.cohort)
    evaluated = ~np.isnan(report.val_scores)
    c = len(report.cohort)
    losses = (np.full(c, np.nan, np.float32) if report.val_losses is None
              else np.asarray(report.val_losses, np.float32))
    improved = evaluated & improves(report.val_scores, losses, rows.best_score, rows.best_loss,
                                    loss_tie_break)
    rows = rows.replace(
        probs=np.where(evaluated[:, None, None], report.val_probs, rows.probs).astype(np.float32),
        score=np.where(evaluated, report.val_scores, rows.score).astype(np.float32),
        best_score=np.where(improved, report.val_scores, rows.best_score).astype(np.float32),
        best_loss=np.where(improved, losses, rows.best_loss).astype(np.float32),
        stale_rounds=np.where(improved, 0, rows.stale_rounds + evaluated).astype(np.int32),
        participations=rows.participations + 1,
    )
    return states.put(report.cohort, rows)
