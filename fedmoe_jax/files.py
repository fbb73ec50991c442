"""Atomic file writes: a reader (or a resumed run) never sees a half-written file.

Written here because the standard library has no atomic write: the data goes to a temporary file
in the same directory, which `os.replace` then renames over the target (atomic on POSIX).
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np

# What a run directory holds besides checkpoints and TensorBoard events (`metrics.jsonl` is
# `fedmoe_jax.federated.metrics.METRICS_FILE`).
RUN_CONFIG_FILE = "config.json"  # the resolved config (`experiment.prepare_workdir`)
SUMMARY_FILE = "summary.json"  # final scores, comm, memory, expert counts; written last
EXPERTS_FILE = "experts.npz"  # expert maps and activation probabilities per client
PREDICTIONS_FILE = "predictions.jsonl"  # a few decoded test predictions per client


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` (text as UTF-8) to `path` through a temporary file and a rename."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """JSON (indent 1, NumPy scalars and arrays as numbers and lists), written atomically."""
    atomic_write(path, json.dumps(obj, indent=1, default=_json_default) + "\n")


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """`np.savez_compressed`, written atomically."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write(path, buf.getvalue())
