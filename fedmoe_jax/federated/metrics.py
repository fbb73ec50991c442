"""Per-round metrics: `metrics.jsonl` (one JSON object per round, with `round`) and TensorBoard.

Rows are appended and flushed after every round. On resume from round r, rows past r are dropped
first, so the file always matches the checkpointed state (no duplicated rounds). Numeric top-level
fields also go to TensorBoard (tensorboardX) under `train/`, `val/`, `comm/`, `experts/`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

METRICS_FILE = "metrics.jsonl"
log = logging.getLogger(__name__)


def weighted_means(values: Sequence[float], weights: Sequence[float]) -> dict[str, float]:
    """Example-weighted and client-weighted (plain) means over clients, NaNs ignored."""
    v = np.asarray(values, np.float64)
    w = np.asarray(weights, np.float64)
    ok = ~np.isnan(v)
    if not ok.any():
        return {"example_weighted": math.nan, "client_weighted": math.nan}
    ew = float(np.average(v[ok], weights=w[ok])) if w[ok].sum() > 0 else math.nan
    return {"example_weighted": ew, "client_weighted": float(v[ok].mean())}


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All rows of `workdir/metrics.jsonl` (empty if none).

    A last line cut short (the process was killed while appending it) is dropped with a warning:
    its round was not checkpointed yet and is run again. Any other unreadable line is a ValueError."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:  # no newline after it: an interrupted append
                log.warning("%s: dropping a cut-off last line (%d bytes)", path, len(line))
                continue
            raise ValueError(f"{path} line {i + 1} is not JSON; repair or delete the file") from None
    return rows


class MetricsWriter:
    """Append-only round metrics for one run directory."""

    def __init__(self, workdir: str, resume_round: int = 0, tensorboard: bool = True):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, METRICS_FILE)
        kept = [row for row in read_metrics(workdir) if row.get("round", 0) <= resume_round]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(row, sort_keys=True) + "\n" for row in kept)
        os.replace(tmp, self.path)
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_round + 1)

    def write(self, row: Mapping[str, Any]) -> None:
        if "round" not in row:
            raise ValueError("a metrics row needs a 'round'")
        self._file.write(json.dumps(row, sort_keys=True, default=_jsonable) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = int(row["round"])
            for key, value in row.items():
                if key != "round" and isinstance(value, int | float) and not isinstance(value, bool):
                    self._tb.add_scalar(_tb_name(key), value, step)
            self._tb.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tb_name(key: str) -> str:
    for prefix, group in (("train", "train"), ("val", "val"), ("bytes", "comm"), ("expert", "experts")):
        if key.startswith(prefix):
            return f"{group}/{key}"
    return f"misc/{key}"


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"cannot write {type(x).__name__} to metrics.jsonl")


# ----------------------------------------------------------------------------------------------
# Paper-level summaries (the paper's reported metrics, its claims and average improvement)
# ----------------------------------------------------------------------------------------------


def rounds_to_target(scores: Sequence[float], target: float) -> int | None:
    """First round (1-based) whose score reaches `target`, or None (`scores` per round, NaN = none)."""
    for r, value in enumerate(scores, start=1):
        if value is not None and not math.isnan(value) and value >= target:
            return r
    return None


def time_to_target_speedup(method: Sequence[float], baseline: Sequence[float], fraction: float,
                           reference: float | None = None) -> float | None:
    """Speedup of `method` over `baseline` to reach `fraction` of the relative target performance.

    The target is `fraction * reference`, `reference` defaulting to the best score either curve
    reaches (the paper's "relative target performance" is not defined further).
    Returns rounds(baseline) / rounds(method), or None if either never reaches it.
    """
    if reference is None:
        finite = [v for v in list(method) + list(baseline) if v is not None and not math.isnan(v)]
        if not finite:
            return None
        reference = max(finite)
    target = fraction * reference
    r_method, r_base = rounds_to_target(method, target), rounds_to_target(baseline, target)
    if r_method is None or r_base is None:
        return None
    return r_base / r_method


def coefficient_of_variation(values: Sequence[float], ddof: int = 0) -> float:
    """c_v = sigma / mu (population std by default)."""
    v = np.asarray(values, np.float64)
    return float(np.std(v, ddof=ddof) / np.mean(v))


def composite_variation_index(scores: Mapping[str, Sequence[float]], ddof: int = 0) -> float:
    """CVI: the mean over tasks of each task's c_v across settings (the paper's reported metrics; its exact
    definition is underspecified, see the paper's claims)."""
    return float(np.mean([coefficient_of_variation(v, ddof) for v in scores.values()]))


def average_improvement(method: Mapping[str, float], baselines: Mapping[str, Mapping[str, float]],
                        signed: bool = False) -> tuple[str, float]:
    """The paper's average improvement: for each baseline b the mean over tasks of |f - b| / b (percent);
    the paper reports the baseline with the smallest value, the "best-performing baseline".

    `signed=True` keeps the sign of f - b (a deficit counts as negative; the paper's rule does not),
    the minimum being then over the signed values: give one baseline to get its signed value.
    """
    diff = (lambda x: x) if signed else abs
    gaps = {
        name: 100.0 * float(np.mean([diff(method[t] - b[t]) / b[t] for t in method]))
        for name, b in baselines.items()
    }
    best = min(gaps, key=gaps.get)
    return best, gaps[best]
