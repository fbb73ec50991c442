"""The records of a federated run: how rounds run (`RunSettings`), a round's host inputs
(`PreparedRound`) and device outputs (`TrainedRound`), and the errors that stop a run on a diverged
update (`NonFiniteUpdate`, `DivergedAggregate`).

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
    # a client update larger than this times the model it received (`loop.update_ratio`) is diverged
    # too, like a NaN one; a round whose aggregate moves the global model by more ends the run
    # (`DivergedAggregate`); 0: no ratio check (non-finite values are always caught)
    max_update_ratio: float = 10.0
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
            "max_update_ratio": self.max_update_ratio >= 0,
            "memory_cap_bytes": self.memory_cap_bytes is None or self.memory_cap_bytes > 0,
            "full_eval_every": self.full_eval_every >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"RunSettings.{name}={getattr(self, name)!r} is invalid "
                                 f"(N = {num_clients} clients)")


def _kept(round_num: int) -> str:
    return (f"nothing of round {round_num} is committed: the global model stays as after round "
            f"{round_num - 1}, and a resume restarts from the latest checkpoint")


class NonFiniteUpdate(RuntimeError):
    """Clients' local updates diverged (`nonfinite`: NaN/inf; `exploding`: finite but over
    `RunSettings.max_update_ratio` times the received model) and `on_nonfinite == "stop"`, or every
    client of the round's did (`every`: nothing is left to aggregate, whatever `on_nonfinite` says).
    Raised before the round is committed."""

    def __init__(self, round_num: int, nonfinite: list[int], exploding: list[int] = (),
                 every: bool = False, max_update_ratio: float = 0.0):
        self.round, self.every = round_num, every
        self.clients = sorted([*nonfinite, *exploding])
        parts = []
        if nonfinite:
            parts.append(f"client(s) {', '.join(map(str, nonfinite))} produced a NaN/inf update")
        if exploding:
            parts.append(f"client(s) {', '.join(map(str, exploding))} produced an update over "
                         f"max_update_ratio={max_update_ratio:g} times the model it received")
        what = " and ".join(parts)
        if every:
            super().__init__(
                f"round {round_num}: every client diverged ({what}), so the round has nothing to "
                f"aggregate; {_kept(round_num)}. Lower the learning rate, and check that the tokenizer "
                "fits the model's vocabulary")
            return
        super().__init__(
            f"round {round_num}: {what}; {_kept(round_num)}. Lower the learning rate, or set "
            "on_nonfinite='exclude' to leave such clients out of aggregation and go on")


class DivergedAggregate(NonFiniteUpdate):
    """The round's new global model holds NaN/inf, or moved by more than `max_update_ratio` times
    the model before it (`loop.update_ratio`; a server optimizer can amplify healthy client updates).
    Raised before the round is committed, whatever `on_nonfinite` says."""

    def __init__(self, round_num: int, ratio: float, max_update_ratio: float):
        self.round, self.every, self.clients, self.ratio = round_num, False, [], ratio
        what = ("holds NaN/inf" if not np.isfinite(ratio) else
                f"moves the global model by {ratio:.3g} times its size (over max_update_ratio="
                f"{max_update_ratio:g})")
        RuntimeError.__init__(
            self, f"round {round_num}: the aggregated update {what}; {_kept(round_num)}. Lower the "
            "server learning rate (server_optimizer) or the learning rate")


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
