"""Per-round metrics: `metrics.jsonl` (one JSON object per round, with `round`) and TensorBoard.

Rows are appended and flushed after every round, and every run checkpoint holds the rows up to its
round too. On resume from round r the file is rewritten with the checkpoint's rows, so it always
matches the checkpointed state whatever happened to it: rows past r are dropped (no duplicated
rounds), and a row lost or cut short is restored. Numeric top-level
fields also go to TensorBoard (tensorboardX) under `train/`, `val/`, `comm/`, `experts/`. The paper's
analysis metrics over finished runs (CVI, average improvement, time-to-target) are in
`fedmoe_jax.tools.reports.analysis`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedmoe_jax.files import finite_json, json_default

METRICS_FILE = "metrics.jsonl"
log = logging.getLogger(__name__)
_JSON_DEFAULT = functools.partial(json_default, strict=True)  # NumPy values; anything else: TypeError


def weighted_means(values: Sequence[float], weights: Sequence[float]) -> dict[str, float]:
    """Example-weighted and client-weighted (plain) means over clients, NaNs ignored."""
    v = np.asarray(values, np.float64)
    w = np.asarray(weights, np.float64)
    ok = ~np.isnan(v)
    if not ok.any():
        return {"example_weighted": math.nan, "client_weighted": math.nan}
    ew = float(np.average(v[ok], weights=w[ok])) if w[ok].sum() > 0 else math.nan
    return {"example_weighted": ew, "client_weighted": float(v[ok].mean())}


def json_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """`row` as `metrics.jsonl` holds it: strict JSON (a non-finite number, a mean over no clients,
    is null, not NaN; NumPy values as Python ones)."""
    return json.loads(json.dumps(finite_json(row), allow_nan=False, default=_JSON_DEFAULT))


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
            row = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:  # no newline after it: an interrupted append
                log.warning("%s: dropping a cut-off last line (%d bytes)", path, len(line))
                continue
            raise ValueError(f"{path} line {i + 1} is not JSON; repair or delete the file") from None
        if not isinstance(row, dict) or "round" not in row:
            raise ValueError(f"{path} line {i + 1} is not a metrics row (a JSON object with a round); "
                             "repair or delete the file")
        rows.append(row)
    return rows


class MetricsWriter:
    """Append-only round metrics for one run directory."""

    def __init__(self, workdir: str, resume_round: int = 0, tensorboard: bool = True,
                 rows: Sequence[Mapping[str, Any]] | None = None):
        """`rows`: the rows of rounds 1..`resume_round` as the checkpoint resumed from holds them; the
        file is rewritten with them. None (a checkpoint written before checkpoints held their rows):
        the file's own rows up to `resume_round` are kept, and a missing one is warned about."""
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, METRICS_FILE)
        if rows is not None:
            kept = [json_row(row) for row in rows if row.get("round", 0) <= resume_round]
        else:
            kept = [row for row in read_metrics(workdir) if row.get("round", 0) <= resume_round]
            missing = sorted(set(range(1, resume_round + 1)) - {row["round"] for row in kept})
            if missing:
                log.warning("%s lacks the row(s) of round(s) %s, and the checkpoint resumed from does "
                            "not hold them", self.path, ", ".join(map(str, missing)))
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
        self._file.write(json.dumps(json_row(row), sort_keys=True) + "\n")
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
