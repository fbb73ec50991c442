"""The records of a federated run: how rounds run (`RunSettings`), a round's host inputs
(`PreparedRound`) and device outputs (`TrainedRound`), and the error that stops a run on a
non-finite update.

Shape letters: C cohort, L MoE layers, E experts, S slots.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

PyTree = Any


def _field_defaults(cls: type) -> dict[str, Any]:
    """A dataclass's fields that have a plain default: `{name: default}`."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """How rounds run (the paper leaves all of these open)."""

    num_rounds: int = 10
    cohort_size: int = 5
    sampling: str = "uniform"  # "uniform" (Standard settings) or "enforced" (one client per task)
    batch_size: int = 8
    local_steps: int = 4
    seed: int = 0
    eval_every: int = 1  # validate the cohort every this many rounds (0: never)
    eval_batch_size: int = 16
    max_eval_examples: int | None = 64  # per client and round; None: the whole validation split
    # a client whose update holds NaN/inf is always left out of aggregation; "stop" also ends the run
    # (NonFiniteUpdate, before the round is committed), "exclude" records it and goes on
    on_nonfinite: str = "exclude"
    # bytes per device a round may use: the cohort trains in sub-cohorts that fit (None: no cap)
    memory_cap_bytes: int | None = None
    # validate every client's own model (not only the cohort) every this many rounds and after the
    # last: the curve time-to-target is read from (0: never); monitoring only, it changes no state
    full_eval_every: int = 0

    def validate(self, num_clients: int) -> None:
        checks = {
            "num_rounds": self.num_rounds >= 0, "batch_size": self.batch_size >= 1,
            "local_steps": self.local_steps >= 1, "seed": self.seed >= 0,
            "eval_every": self.eval_every >= 0, "eval_batch_size": self.eval_batch_size >= 1,
            "cohort_size": 1 <= self.cohort_size <= num_clients,
            "sampling": self.sampling in ("uniform", "enforced"),
            "on_nonfinite": self.on_nonfinite in ("exclude", "stop"),
            "memory_cap_bytes": self.memory_cap_bytes is None or self.memory_cap_bytes > 0,
            "full_eval_every": self.full_eval_every >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"RunSettings.{name}={getattr(self, name)!r} is invalid "
                                 f"(N = {num_clients} clients)")


class NonFiniteUpdate(RuntimeError):
    """A client's local update held NaN/inf and `RunSettings.on_nonfinite == "stop"`, or every client
    of the round's did (`every`: nothing is left to aggregate, whatever `on_nonfinite` says)."""

    def __init__(self, round_num: int, clients: list[int], every: bool = False):
        self.round, self.clients, self.every = round_num, clients, every
        if every:
            super().__init__(
                f"round {round_num}: every client ({', '.join(map(str, clients))}) produced a NaN/inf "
                "update, so the round has nothing to aggregate (the global model is intact at the last "
                "checkpoint). Lower the learning rate, and check that the tokenizer fits the model's "
                "vocabulary")
            return
        super().__init__(
            f"round {round_num}: client(s) {', '.join(map(str, clients))} produced a NaN/inf update "
            "(left out of aggregation; the global model is intact at the last checkpoint). Lower the "
            "learning rate, or set on_nonfinite='exclude' to leave such clients out and go on")


@dataclasses.dataclass
class PreparedRound:
    """A round's host inputs (`FederatedTrainer.prepare_round`); arrays `[C, ...]` unless padded."""

    round: int
    cohort: np.ndarray  # <int32>[C]
    maps: np.ndarray  # <bool>[C, L, E]
    width: int  # S slots
    indices: np.ndarray  # <int32>[C, L, S]
    valid: np.ndarray  # <bool>[C, L, S]
    weights: np.ndarray  # <f32>[C] aggregation weights (training examples)
    num_steps: np.ndarray  # <int32>[C] real local steps
    cohort_args: tuple  # round_step's cohort arguments, padded to `padded_size` clients
    padded_size: int
    start: float  # time.time() when the round began
    # validation batches `[C, ...]` when the round validates its cohort inside the round program
    eval_batches: dict[str, np.ndarray] | None = None


@dataclasses.dataclass
class TrainedRound:
    """A round's device outputs: the new server state and the cohort's metrics and trained models."""

    params: PyTree
    opt_state: PyTree
    metrics: dict[str, Any]  # [C_padded] each
    client_params: PyTree  # [C_padded, ...], or None when the round validated its cohort itself
    evaluation: tuple | None = None  # (loss, stats, tokens) [C_padded, ...] of `RoundOutput.evaluation`
