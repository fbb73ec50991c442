"""Several runs of one configuration (seeds) trained in lockstep: one compiled program per round.

Each run keeps its own `FederatedTrainer` (data partition, client states, checkpoints, metrics);
only a round's device work is shared. The runs' cohorts are stacked on a leading runs axis and
trained + aggregated by `make_round_step(runs=True)` (the round program vmapped over runs), so R
seeds cost one dispatch per round instead of R, and an accelerator sees R x C clients at once. The
host work (sampling, batching, validation decoding, client-state updates, checkpoints) stays per
run, in the same order as a run alone, so each run's results equal those of the run trained alone
(same cohort, keys and batches; tested) except where slot widths differ: the group trains every run
at the widest run's slot count S, and a layer's expert capacity follows S.

Shape letters: R runs, C cohort, L MoE layers, E experts, S slots.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fedmoe_jax.federated.loop import make_round_step
from fedmoe_jax.federated.preemption import RunInterrupted, StopSignals
from fedmoe_jax.federated.trainer import FederatedTrainer, say_compiling


def stack_runs(trees: Sequence[Any]) -> Any:
    """Stack R pytrees of equal structure on a new leading runs axis (PRNG key arrays included)."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def run_slice(tree: Any, i: int) -> Any:
    """Run `i`'s part of a pytree with a leading runs axis."""
    return jax.tree.map(lambda a: a[i], tree)


class RunGroup:
    """Train R `FederatedTrainer`s that differ only in their seed (and data), rounds in lockstep.

    Requires aggregating algorithms (not `LocalOnly`) and no mesh; every trainer must share the model
    config, optimizer, loss, algorithm type and round settings other than `seed`. Trainers that were
    resumed at different rounds are first brought level one by one. `memory_cap_bytes` bounds the
    whole group's round: the R runs train in lockstep sub-cohorts small enough to fit together.
    """

    def __init__(self, trainers: Sequence[FederatedTrainer]):
        if not trainers:
            raise ValueError("RunGroup needs at least one trainer")
        first = trainers[0]
        for t in trainers:
            if not t.algorithm.aggregates:
                raise ValueError(f"{t.algorithm.name} keeps personal models without a server; "
                                 "run its seeds one by one")
            if t.mesh is not None:
                raise ValueError("RunGroup vmaps rounds on one device: build its trainers with mesh=None")
            if t.config != first.config or type(t.algorithm) is not type(first.algorithm):
                raise ValueError("the runs of a RunGroup must share the model config and the algorithm")
            if dataclasses.replace(t.settings, seed=first.settings.seed) != first.settings:
                raise ValueError("the runs of a RunGroup may differ only in their seed: "
                                 f"{t.settings} vs {first.settings}")
        self.trainers = list(trainers)
        self._step = make_round_step(first.config, first._optimizer, first._loss_config,
                                     first.algorithm.hooks, None, return_clients=True, runs=True,
                                     memory_cap=first.settings.memory_cap_bytes,
                                     max_update_ratio=first.settings.max_update_ratio)

    @property
    def round(self) -> int:
        return min(t.server.round for t in self.trainers)

    def run_round(self) -> list[dict[str, Any]]:
        """One round of every run; returns each run's metrics row."""
        level = self.round
        if any(t.server.round != level for t in self.trainers):
            raise ValueError("runs are at different rounds; call run() to bring them level first")
        width = max(t.round_width() for t in self.trainers)
        # validation stays outside the vmapped round: the runs' validation batches differ in shape
        preps = [t.prepare_round(width, validate_in_round=False) for t in self.trainers]
        params = stack_runs([t.server.params for t in self.trainers])
        out = self._step(params, *(stack_runs(args) if args[0] is not None else None
                                   for args in zip(*(p.cohort_args for p in preps))))
        rows = []
        for i, (t, prep) in enumerate(zip(self.trainers, preps)):
            trained = t.server_update(run_slice(out.params, i), out.held[i], run_slice(out.metrics, i),
                                      run_slice(out.client_params, i))
            rows.append(t.finish_round(prep, trained))
        return rows

    def run(self, num_rounds: int | None = None, progress: bool = True,
            stop: StopSignals | None = None) -> list[list[dict[str, Any]]]:
        """Run every trainer until `num_rounds` rounds (default: its settings'); returns histories.

        `stop`: as for `FederatedTrainer.run`; every run is checkpointed before `RunInterrupted`."""
        from tqdm import tqdm

        target = self.trainers[0].settings.num_rounds if num_rounds is None else num_rounds
        for t in self.trainers:  # resumed at different rounds: catch up alone
            while t.server.round < min(target, max(u.server.round for u in self.trainers)):
                self._stop_if_requested(stop)
                t.run_round()
        with tqdm(total=target, initial=min(self.round, target), unit="round",
                  desc=f"{self.trainers[0].algorithm.name} x{len(self.trainers)} runs",
                  disable=not progress) as bar:
            if self.round < target:
                say_compiling(bar, self.round + 1)
            while self.round < target:
                self._stop_if_requested(stop)
                rows = self.run_round()
                bar.update(1)
                bar.set_postfix(loss=" ".join(f"{r['train_loss']:.3f}" for r in rows))
        for t in self.trainers:
            t.checkpoint(force=True)
        return [t.history for t in self.trainers]

    def _stop_if_requested(self, stop: StopSignals | None) -> None:
        if stop is None or stop.requested is None:
            return
        for t in self.trainers:
            t.checkpoint(force=True)
        where = [t.checkpoint_dir for t in self.trainers if t.checkpoint_dir is not None]
        raise RunInterrupted(stop.requested, self.round, ", ".join(where) or None)


__all__ = ["RunGroup", "run_slice", "stack_runs"]
