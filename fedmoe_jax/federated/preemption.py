"""Graceful stop: SIGTERM / SIGINT end a run at the next round boundary with a checkpoint.

Preemptible machines (TPU / cloud spot VMs, Slurm) send SIGTERM before they take a machine away;
Ctrl-C sends SIGINT. While a `StopSignals` context is active, the first such signal only records
the request: the round in flight finishes (a jitted round cannot be cut short, and a half-trained
round could not be checkpointed), the trainer saves its state (`FederatedTrainer.run(stop=...)`)
and raises `RunInterrupted`; the CLI turns that into one line and the conventional exit status
128 + signal (143 for SIGTERM, 130 for SIGINT). Rerunning the same command resumes. A second signal
gives up waiting: the previous handler runs (the default one ends the process at once; the last
checkpoint on disk is still a valid resume point, see `checkpoint.RunCheckpointer`).

The standard library's `signal` is all this needs; orbax's preemption support
(`multihost_utils.reached_preemption_sync_point`) is for multi-host jobs, where every process must
agree on the round to stop at.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunInterrupted(Exception):
    """A run stopped on a signal after `round` finished rounds (or pretraining steps: `unit`),
    its state checkpointed in `where` (None: nothing was saved)."""

    def __init__(self, signum: int, round_num: int, where: str | None = None, unit: str = "round"):
        self.signum, self.round = int(signum), int(round_num)
        self.exit_status = 128 + self.signum
        done = f"stopped by {signal.Signals(self.signum).name} after {unit} {self.round}"
        if where:
            super().__init__(f"{done}; checkpoint of {unit} {self.round} in {where} is saved: run the same "
                             "command again to resume")
        else:
            super().__init__(f"{done}; nothing is saved (no checkpoint directory)")


_ACTIVE: list[StopSignals] = []  # entered contexts, innermost last


def requested_stop() -> int | None:
    """The signal an active `StopSignals` context has recorded, or None: for long loops deep inside
    a run (pretraining on a cache miss) that no `stop` argument reaches."""
    return next((s.requested for s in reversed(_ACTIVE) if s.requested is not None), None)


class StopSignals:
    """Context manager: SIGTERM / SIGINT set `requested` (the signal number) instead of ending the
    process; a second signal runs the handler that was installed before (the default one exits).

    Outside the main thread (where Python cannot install handlers) it does nothing and `requested`
    stays None.
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signals = signals
        self.requested: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self in _ACTIVE:
            _ACTIVE.remove(self)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is None:
            self.requested = signum
            log.warning("received %s: stopping at the next round boundary with a checkpoint (send it "
                        "again to stop at once)", signal.Signals(signum).name)
            return
        previous = self._previous.get(signum, signal.SIG_DFL)
        self.__exit__()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), signum)  # the default action (terminate) now that our handler is gone


__all__ = ["STOP_SIGNALS", "RunInterrupted", "StopSignals", "requested_stop"]
