"""Atomic file writes: a reader (or a resumed run) never sees a half-written file; JSON helpers.

Written here because the standard library has no atomic write: the data goes to a temporary file
in the same directory, which `os.replace` then renames over the target (atomic on POSIX). The JSON
helpers (NumPy values as JSON, strict JSON, reading nested keys) are shared by the engine and the
offline tools; `workdir_lock` keeps two runs out of one folder; `DiskFull` is the one error a full
disk becomes, wherever the write failed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

# What a run directory holds besides checkpoints and TensorBoard events (`metrics.jsonl` is
# `fedmoe_jax.federated.metrics.METRICS_FILE`).
RUN_CONFIG_FILE = "config.json"  # the resolved config (`experiment.prepare_workdir`)
SUMMARY_FILE = "summary.json"  # final scores, comm, memory, expert counts; written last
EXPERTS_FILE = "experts.npz"  # expert maps and activation probabilities per client
PREDICTIONS_FILE = "predictions.jsonl"  # a few decoded test predictions per client
STAGE1_FILE = "stage1.npz"  # FedMoE's Stage 1: activation probabilities, maps (`experiment.fedmoe_start`)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` (text as UTF-8) to `path` through a temporary file and a rename."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def json_default(x: Any, strict: bool = False) -> Any:
    """`json.dumps`'s `default`: NumPy scalars and arrays as numbers and lists; anything else as its
    `str()`, or a TypeError with `strict` (`functools.partial(json_default, strict=True)`)."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if strict:
        raise TypeError(f"cannot write {type(x).__name__} as JSON")
    return str(x)


def finite_json(x: Any) -> Any:
    """`x` with mappings as dicts (keys as strings), tuples as lists, NumPy scalars as numbers and
    non-finite floats as None: what strict JSON (`allow_nan=False`) can hold."""
    if isinstance(x, Mapping):
        return {str(k): finite_json(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        x = x.tolist()
    if isinstance(x, list | tuple):
        return [finite_json(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def json_kind(x: Any) -> str:
    """The JSON name of a decoded value's type: object, array, string, number, boolean or null."""
    if x is None:
        return "null"
    if isinstance(x, bool):
        return "boolean"
    return {dict: "object", list: "array", str: "string", int: "number", float: "number"}.get(type(x),
                                                                                          type(x).__name__)


def write_json(path: str | os.PathLike, obj: Any, finite: bool = False) -> None:
    """JSON (indent 1, NumPy scalars and arrays as numbers and lists), written atomically.
    `finite`: strict JSON instead, non-finite numbers as null (`finite_json`)."""
    if finite:
        text = json.dumps(finite_json(obj), indent=1, allow_nan=False)
    else:
        text = json.dumps(obj, indent=1, default=json_default)
    atomic_write(path, text + "\n")


def json_get(doc: Any, *keys: str) -> Any:
    """`doc[k1][k2]...` of a parsed JSON document (a run's summary, say), None where a key is missing
    or a level is not a mapping."""
    for k in keys:
        if not isinstance(doc, Mapping):
            return None
        doc = doc.get(k)
    return doc


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """`np.savez_compressed`, written atomically."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write(path, buf.getvalue())


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike | None) -> Iterator[None]:
    """Hold an exclusive lock on the folder `workdir` (created if missing) for the block, so that a
    second run on the same folder stops at once with `ConfigError` instead of interleaving its
    checkpoints and metrics with the first's. `flock` on the folder itself: no lock file is left
    behind, and the kernel drops the lock when the process dies, however it dies. None: no lock."""
    from fedmoe_jax.errors import ConfigError

    if workdir is None:
        yield
        return
    try:
        os.makedirs(workdir, exist_ok=True)
        fd = os.open(workdir, os.O_RDONLY)
    except OSError as e:
        raise ConfigError(f"workdir {workdir} cannot be created or opened ({e.strerror}); "
                          "pass a writable --workdir") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"workdir {workdir} is in use by another run (it holds the folder's lock); "
                              "wait for that run to end, or pass another --workdir") from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


class DiskFull(OSError):
    """A write failed because the disk (or the user's quota) is full; its message is one line: what
    was being written, and that earlier checkpoints are intact."""

    def __init__(self, what: str, cause: BaseException | str):
        reason = "Disk quota exceeded" if "quota" in str(cause).lower() or getattr(
            cause, "errno", None) == errno.EDQUOT else "No space left on device"
        super().__init__(errno.ENOSPC, f"the disk is full ({reason}) while writing {what}; free space "
                                       "and run the same command again: the checkpoints of earlier "
                                       "rounds are intact")

    def __str__(self) -> str:
        return self.strerror


# How a full disk reads when it arrives as text (tensorstore, under orbax, raises ValueError).
_DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "os_error_code='28'",
                   "os_error_code='122'")


def says_disk_full(text: str) -> bool:
    """Whether an error message or log line says the disk or quota is full."""
    return any(t in text.lower() for t in _DISK_FULL_TEXT)


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or an exception it was raised from) says the disk or quota is full: an
    `OSError` with `ENOSPC` / `EDQUOT`, or any error whose text says so (`says_disk_full`)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if says_disk_full(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


def write_report(folder: str | os.PathLike, stem: str, result: Any, markdown: str) -> None:
    """`folder/stem.json` (the result, indent 1) and `folder/stem.md` (its Markdown), atomically; the
    folder is created if missing."""
    os.makedirs(folder, exist_ok=True)
    text = json.dumps(result, indent=1, default=json_default)
    atomic_write(os.path.join(folder, f"{stem}.json"), text + "\n")
    atomic_write(os.path.join(folder, f"{stem}.md"), markdown)


def unwritable(path: str | os.PathLike, folder: bool = False) -> str | None:
    """Why `path` cannot be written (a file; with `folder`, a folder, made if missing), or None if it can.
    Checked before long work, so a bad output path fails before it, not after; nothing is created."""
    path = os.path.abspath(path)
    if os.path.isdir(path) != folder and os.path.exists(path):
        return f"{path} is {'a file' if folder else 'a folder'}"
    probe = path if folder else os.path.dirname(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not a writable folder"
    return None
