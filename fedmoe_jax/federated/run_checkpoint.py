"""Run checkpoints over orbax `CheckpointManager`: verified restore, corruption fallback, resume guard.

Each saved round holds three items: `state` (any pytree of arrays: parameters, optax states, typed
PRNG keys, flax dataclasses), `meta` (JSON: round, metric history, config fingerprints, sampler
info) and `integrity` (JSON: per-leaf path, dtype, shape and sha256, a sha256 of `meta`, and a
sha256 of itself). Orbax writes each step to a temporary directory and renames it when complete,
so a kill mid-write leaves the previous steps intact. Restoring goes newest first; a step that
fails to load or to verify (orbax reads some tampered bytes without error) is skipped with a
warning naming it, and the step before is tried.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from fedmoe_jax.files import DiskFull, is_disk_full, says_disk_full

PyTree = Any

log = logging.getLogger(__name__)

# Meta keys that define a run; a resume that changes any of them is refused (num_rounds may change).
COMPAT_KEYS = ("seed", "method", "model", "data", "partition")


class CheckpointError(ValueError):
    """An unusable checkpoint directory (all steps corrupt, different run, different state layout)."""


class _Corrupt(Exception):
    """A step that cannot be trusted; restore falls back to the previous step."""


def abstract_like(tree: PyTree, sharding: jax.sharding.Sharding | None = None) -> PyTree:
    """Restore target for `tree`: `ShapeDtypeStruct` leaves, optionally all placed on `sharding`."""

    def leaf(x):
        s = ocp.utils.to_shape_dtype_struct(x)
        if sharding is None or not isinstance(s, jax.ShapeDtypeStruct):
            return s
        return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)

    return jax.tree.map(leaf, tree)


def _lookup(meta: Mapping[str, Any], key: str) -> Any:
    """`meta[key]`, with dotted keys reaching into nested dicts; a sentinel when absent."""
    value: Any = meta
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return _MISSING
        value = value[part]
    return value


_MISSING = object()


def _short(value: Any) -> str:
    text = "<missing>" if value is _MISSING else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def check_compatible(
    saved_meta: Mapping[str, Any],
    current_meta: Mapping[str, Any],
    keys: Sequence[str] = COMPAT_KEYS,
    workdir: str | os.PathLike | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """Raise `CheckpointError` (a `ValueError`) naming the `keys` whose values differ.

    Only `keys` are compared (dotted keys reach into nested dicts), so settings that may change on
    resume (e.g. `num_rounds`) are left out of them. Values are compared after a JSON round trip.
    `defaults` (same layout as the metas): what a value absent on one side stands for. A dict value
    is compared with its default dict underneath on both sides, so a setting added to the code after
    a checkpoint was written matches that checkpoint as long as it keeps its default.
    """
    saved = json.loads(json.dumps(dict(saved_meta), default=str))
    current = json.loads(json.dumps(dict(current_meta), default=str))
    base = json.loads(json.dumps(dict(defaults or {}), default=str))

    def with_default(value: Any, default: Any) -> Any:
        if isinstance(value, Mapping) and isinstance(default, Mapping):
            return {**default, **value}
        return default if value is _MISSING else value

    diffs = []
    for k in keys:
        default = _lookup(base, k)
        diffs.append((k, with_default(_lookup(saved, k), default),
                      with_default(_lookup(current, k), default)))
    diffs = [(k, a, b) for k, a, b in diffs if a is not b and a != b]
    if not diffs:
        return
    where = f" in {os.fspath(workdir)}" if workdir is not None else ""
    detail = "; ".join(f"{k}: saved {_short(a)}, now {_short(b)}" for k, a, b in diffs)
    names = ", ".join(k for k, _, _ in diffs)
    raise CheckpointError(
        f"the checkpoint{where} belongs to a different run ({names} differ: {detail}); "
        f"resume with the config that wrote it, or start fresh with a new workdir"
    )


def _json_sha(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _describe(x: Any) -> tuple[str, list[int]]:
    """(dtype, shape) of a leaf, concrete or abstract; typed PRNG keys as their key data."""
    if _is_key(x):
        x = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        x = np.asarray(x)
    return str(np.dtype(x.dtype)), [int(d) for d in x.shape]


def _layout(tree: PyTree) -> list[list]:
    """[path, dtype, shape] per leaf, in flattening order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [[jax.tree_util.keystr(path), *_describe(leaf)] for path, leaf in flat]


def _leaf_records(tree: PyTree) -> list[list]:
    """[path, dtype, shape, sha256 of the bytes] per leaf; sha256 is None for arrays this process
    cannot fully address (multi-host shards)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    leaves = [jax.random.key_data(x) if _is_key(x) else x for _, x in flat]
    local = [not isinstance(x, jax.Array) or x.is_fully_addressable for x in leaves]
    host = jax.device_get([x for x, ok in zip(leaves, local) if ok])
    host_iter = iter(host)
    records = []
    for (path, leaf), ok in zip(flat, local):
        digest = None
        if ok:
            data = np.ascontiguousarray(np.asarray(next(host_iter))).reshape(-1)
            digest = hashlib.sha256(data.view(np.uint8)).hexdigest()
        records.append([jax.tree_util.keystr(path), *_describe(leaf), digest])
    return records


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    text = text[0] if text else ""
    text = f"{type(error).__name__}: {text}" if not isinstance(error, _Corrupt) else text
    return text if len(text) <= 200 else text[:197] + "..."


def _state_bytes(state: PyTree) -> int:
    """Bytes this process writes for `state`: each array once (a global array's share per process)."""
    per_process = max(jax.process_count(), 1)
    return int(sum(getattr(x, "nbytes", 0) // per_process for x in jax.tree.leaves(state)))


def _check_free_space(directory: str, round: int, need: int) -> None:
    """`DiskFull` before anything is written when the disk holding `directory` has less free space than
    a step of `need` bytes takes (plus 10 % and 64 KiB for orbax's metadata): the common case of a full
    disk ends with one line and no partial step. A disk that fills during the write is caught by
    `_disk_full_as_one_error`."""
    free = shutil.disk_usage(directory).free
    if free < need * 1.1 + (1 << 16):
        raise DiskFull(f"the checkpoint of round {round} in {directory} (about {need / 1e6:.1f} MB; "
                       f"{free / 1e6:.1f} MB free)", "No space left on device")


class _DropDiskFullRecords(logging.Filter):
    """Drops the log records (with their tracebacks) orbax's writer threads emit for a full disk:
    the `DiskFull` raised in their place says it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not says_disk_full(record.getMessage())


@contextlib.contextmanager
def _disk_full_as_one_error(directory: str, round: int | None):
    """A disk that fills while checkpoint `round` is written becomes one `DiskFull`; the step's partial
    temporary folder is removed (its space is freed) and earlier steps are untouched. (Tensorstore's
    writes still in flight print "Event loop is closed" tracebacks straight to stderr afterwards; the
    command lines silence stderr once they have printed the one line, `cli_common.exit_if_disk_full`.)"""
    quiet = _DropDiskFullRecords()
    absl_log = logging.getLogger("absl")
    absl_log.addFilter(quiet)
    try:
        yield
    except Exception as error:
        if not is_disk_full(error):
            raise
        for name in os.listdir(directory):
            if name.split(".")[0] == str(round) and "tmp" in name:
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        raise DiskFull(f"the checkpoint of round {round} in {directory}", error) from None
    finally:
        absl_log.removeFilter(quiet)


def read_step_part(directory: str | os.PathLike, step: int, part: str) -> tuple[PyTree, dict]:
    """`(tree, meta)`: the `part` of checkpoint step `step`'s state in `directory` (a top-level key of
    a saved dict, e.g. "params"), restored without a target (NumPy arrays, plain containers) and
    verified leaf by leaf against the step's integrity record, as `restore_latest` verifies. Read
    only: no `CheckpointManager` is opened, so a process still writing to `directory` is undisturbed.
    For one part of a state whose other parts (optimizer states) the caller cannot rebuild.
    `CheckpointError` when the step is missing or damaged."""
    root = os.path.join(os.path.abspath(os.fspath(directory)), str(step))
    try:
        with open(os.path.join(root, "meta", "metadata")) as f:
            meta = json.load(f)
        with open(os.path.join(root, "integrity", "metadata")) as f:
            integrity = json.load(f)
        body = {k: v for k, v in integrity.items() if k != "sha256"}
        if integrity.get("sha256") != _json_sha(body) or body.get("meta_sha256") != _json_sha(meta):
            raise _Corrupt("meta or integrity record does not match its checksum")
        state = ocp.StandardCheckpointer().restore(os.path.join(root, "state"))
        tree = jax.tree.map(np.asarray, state[part])
    except Exception as e:  # noqa: BLE001 - any failure makes the step unusable
        raise CheckpointError(f"checkpoint step {step} in {directory} is missing or damaged "
                              f"({_first_line(e)})") from None
    prefix = f"[{part!r}]"
    want = {r[0]: r for r in body["leaves"] if r[0].startswith(prefix)}
    have = {r[0]: r for r in _leaf_records({part: tree})}
    if set(want) != set(have) or any(want[k][3] not in (None, have[k][3]) for k in want):
        raise CheckpointError(f"checkpoint step {step} in {directory}: {part} does not match its integrity "
                              "record")
    return tree, meta


class RunCheckpointer:
    """Saves and restores a run's `(round, state, meta)` in `directory` (one orbax step per round).

    `save_every`: `save` writes only rounds divisible by it unless `force=True`. Saves block until
    written unless `async_save=True` (then call `wait()` before reading the files).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        max_to_keep: int = 3,
        save_every: int = 1,
        async_save: bool = False,
    ):
        if max_to_keep < 1 or save_every < 1:
            raise ValueError(f"max_to_keep ({max_to_keep}) and save_every ({save_every}) must be >= 1")
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every = save_every
        self.async_save = async_save
        self.skipped: list[tuple[int, str]] = []  # (step, reason) skipped by the last restore
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                create=True,
                cleanup_tmp_directories=True,
                enable_async_checkpointing=async_save,
            ),
        )

    def latest_round(self) -> int | None:
        """The newest round on disk that the last restore did not skip as corrupt (not verified
        otherwise; `restore_latest` may still fall back past it)."""
        corrupt = {s for s, _ in self.skipped}
        return max((s for s in self._manager.all_steps() if s not in corrupt), default=None)

    def all_rounds(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, round: int, state: PyTree, meta: Mapping[str, Any], force: bool = False) -> bool:
        """Save `state` and JSON `meta` as step `round`; returns whether a checkpoint was written.

        Steps the last restore skipped as corrupt are deleted first; any other existing step at or
        after `round` is an error (a run must resume, not overwrite).
        """
        round = int(round)
        if not force and round % self.save_every:
            return False
        meta = json.loads(json.dumps(dict(meta)))  # what is hashed is what is written
        self._drop_stale(round)
        integrity: dict[str, Any] = {"format": 1, "leaves": _leaf_records(state),
                                     "meta_sha256": _json_sha(meta)}
        integrity["sha256"] = _json_sha(integrity)
        _check_free_space(self.directory, round, _state_bytes(state) + len(json.dumps(meta))
                          + len(json.dumps(integrity)))
        with _disk_full_as_one_error(self.directory, round):
            saved = self._manager.save(
                round,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    meta=ocp.args.JsonSave(meta),
                    integrity=ocp.args.JsonSave(integrity),
                ),
                force=True,
            )
            if not self.async_save:
                self._manager.wait_until_finished()
        return bool(saved)

    def _drop_stale(self, round: int) -> None:
        steps = set(self._manager.all_steps())
        corrupt = {s for s, _ in self.skipped} & steps
        unknown = sorted(s for s in steps if s >= round and s not in corrupt)
        if unknown:
            raise CheckpointError(
                f"{self.directory} already has checkpoint round(s) {unknown} >= {round}; "
                f"resume from it with restore_latest(), or start fresh with a new workdir"
            )
        for step in sorted(corrupt):
            log.warning("deleting corrupt checkpoint step %d in %s before saving round %d",
                        step, self.directory, round)
            self._manager.delete(step)
        # forgotten once deleted: a good step saved again under that number is kept
        self.skipped = [(s, reason) for s, reason in self.skipped if s not in corrupt]

    def restore_latest(
        self,
        abstract_state: PyTree,
        current_meta: Mapping[str, Any] | None = None,
        keys: Sequence[str] = COMPAT_KEYS,
        defaults: Mapping[str, Any] | None = None,
    ) -> tuple[int, PyTree, dict] | None:
        """`(round, state, meta)` of the newest step that restores and verifies, or None if none exist.

        `abstract_state`: the restore target (`abstract_like(tree)`, or `jax.eval_shape` output with
        shardings); it fixes container types (optax NamedTuples), dtypes and placement. With
        `current_meta`, `check_compatible` (with `defaults`) runs on the saved meta before any state
        is read.
        Raises `CheckpointError` if the saved state's layout differs from the target, or if every
        step is corrupt.
        """
        self._manager.wait_until_finished()
        self._manager.reload()
        self.skipped = []
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            return None
        target_layout = _layout(abstract_state)
        for step in steps:
            try:
                meta, integrity = self._read_json(step)
            except Exception as error:  # noqa: BLE001 - any failure makes this step unusable
                self._skip(step, error)
                continue
            if current_meta is not None:
                check_compatible(meta, current_meta, keys, self.directory, defaults)
            self._check_layout(step, integrity["leaves"], target_layout)
            try:
                state = self._read_state(step, abstract_state, integrity["leaves"])
            except CheckpointError:
                raise
            except Exception as error:  # noqa: BLE001
                self._skip(step, error)
                continue
            return step, state, meta
        listed = ", ".join(str(s) for s, _ in self.skipped)
        raise CheckpointError(
            f"no valid checkpoint in {self.directory}: step(s) {listed} are corrupt "
            f"(first: {self.skipped[0][1]}); start fresh with a new workdir"
        )

    def _skip(self, step: int, error: BaseException) -> None:
        reason = _first_line(error)
        self.skipped.append((step, reason))
        log.warning("skipping corrupt checkpoint step %d in %s (%s); falling back to the previous step",
                    step, self.directory, reason)

    def _read_json(self, step: int) -> tuple[dict, dict]:
        items = self._manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), integrity=ocp.args.JsonRestore())
        )
        meta, integrity = items["meta"], items["integrity"]
        if not isinstance(integrity, dict) or not isinstance(meta, dict):
            raise _Corrupt("meta or integrity record missing")
        body = {k: v for k, v in integrity.items() if k != "sha256"}
        if integrity.get("sha256") != _json_sha(body) or not isinstance(body.get("leaves"), list):
            raise _Corrupt("integrity record does not match its checksum")
        if body.get("meta_sha256") != _json_sha(meta):
            raise _Corrupt("meta does not match its checksum")
        return meta, body

    def _check_layout(self, step: int, saved: list[list], target: list[list]) -> None:
        saved_layout = [list(r[:3]) for r in saved]
        if saved_layout == target:
            return
        for i in range(max(len(saved_layout), len(target))):
            a = saved_layout[i] if i < len(saved_layout) else None
            b = target[i] if i < len(target) else None
            if a != b:
                break
        show = lambda r: "nothing" if r is None else f"{r[0]} {r[1]}{r[2]}"  # noqa: E731
        raise CheckpointError(
            f"checkpoint step {step} in {self.directory} holds a differently shaped state "
            f"(saved {show(a)}, expected {show(b)}); resume with the config that wrote it, "
            f"or start fresh with a new workdir"
        )

    def _read_state(self, step: int, abstract_state: PyTree, saved: list[list]) -> PyTree:
        items = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
        state = items["state"]
        got = _leaf_records(state)
        for want, have in zip(saved, got, strict=True):
            if want[:3] != have[:3]:
                raise CheckpointError(
                    f"checkpoint step {step} leaf {want[0]} was saved as {want[1]}{want[2]} but restores "
                    f"as {have[1]}{have[2]} (64-bit leaves need jax_enable_x64 or a numpy target)"
                )
            if want[3] is not None and have[3] is not None and want[3] != have[3]:
                raise _Corrupt(f"leaf {want[0]} does not match its sha256")
        return state

    def wait(self) -> None:
        """Block until pending (async) saves are on disk."""
        with _disk_full_as_one_error(self.directory, self._manager.latest_step()):
            self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> RunCheckpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
