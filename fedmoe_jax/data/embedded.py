"""The benchmarks shipped in the package: TC / RC / TS `TaskData` and their tokenizers.

Works offline on a fresh install. Two folders of the same format: `fedmoe_jax/data/benchmark/`
(`benchmark_dir()`: WordNet + Debian, built by `fedmoe_jax.data.benchmark`; the experiments' default)
and `fedmoe_jax/data/embedded/` (the original WordNet-only benchmark, built by `fedmoe_jax.data.wordnet`;
these loaders' default folder). Files are read with `importlib.resources`; each is checked against
the SHA-256 in `manifest.json`. `data_dir` (or the environment variable `FEDMOE_JAX_EMBEDDED_DIR`)
points the loaders at another copy, e.g. `benchmark_dir()` or a fresh rebuild.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import pathlib
from collections.abc import Iterable
from importlib.resources.abc import Traversable

import sentencepiece as spm

from fedmoe_jax.data.tasks import SPLITS, TASKS, TaskData, check_split, check_task
from fedmoe_jax.data.tokenizer import SPIECE_FILE, Tokenizer
from fedmoe_jax.data.wordnet import BUILD_COMMAND, MANIFEST_FILE, data_file_name, decode_records

ENV_VAR = "FEDMOE_JAX_EMBEDDED_DIR"
PathLike = str | os.PathLike | None


def embedded_dir(data_dir: PathLike = None) -> Traversable:
    """The folder read: `data_dir`, else `$FEDMOE_JAX_EMBEDDED_DIR`, else the package's copy."""
    if data_dir is None:
        data_dir = os.environ.get(ENV_VAR) or None
    if data_dir is not None:
        return pathlib.Path(data_dir)
    return importlib.resources.files("fedmoe_jax.data").joinpath("embedded")


def benchmark_dir() -> str:
    """The package's copy of the WordNet + Debian benchmark (`data.source="benchmark"`)."""
    return str(importlib.resources.files("fedmoe_jax.data").joinpath("benchmark"))


def load_manifest(data_dir: PathLike = None) -> dict:
    """`manifest.json`: sizes per task and split, label names, SHA-256 and size of every file."""
    folder = embedded_dir(data_dir)
    path = folder.joinpath(MANIFEST_FILE)
    try:
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ValueError(f"embedded benchmark manifest {path} is missing; {_fix()}") from None
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or not {"files", "sizes", "label_names"} <= manifest.keys():
        raise ValueError(f"embedded benchmark manifest {path} is corrupt; {_fix()}")
    return manifest


def _fix() -> str:
    return f"reinstall fedmoe_jax or rebuild the data with `{BUILD_COMMAND}`"


def _read_verified(name: str, manifest: dict, data_dir: PathLike) -> bytes:
    path = embedded_dir(data_dir).joinpath(name)
    expected = manifest["files"].get(name, {}).get("sha256")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"embedded benchmark file {path} is missing; {_fix()}") from None
    if expected is None or hashlib.sha256(data).hexdigest() != expected:
        raise ValueError(f"embedded benchmark file {path} is corrupt (SHA-256 mismatch); {_fix()}")
    return data


def label_names(manifest: dict, task: str) -> tuple[str, ...]:
    """The task's label names: one list shared by the tasks (format 1) or a list per task (format 2)."""
    names = manifest["label_names"]
    return tuple(names[task] if isinstance(names, dict) else names)


def _load(task: str, split: str, manifest: dict, data_dir: PathLike) -> TaskData:
    name = data_file_name(task, split)
    data = _read_verified(name, manifest, data_dir)
    try:
        records = decode_records(data)
        return TaskData(
            task,
            [r["input"] for r in records],
            [r["target"] for r in records],
            [r["label"] for r in records],
            label_names(manifest, task),
            [r["references"] for r in records] if task == "rc" else None,
        )
    except (OSError, EOFError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"embedded benchmark file {name} does not decode ({e}); {_fix()}") from None


def load_embedded(task: str, split: str, data_dir: PathLike = None) -> TaskData:
    """One task (`tc`, `rc`, `ts`) in one split (`train`, `validation`, `test`), N examples.

    `labels <int32>[N]`: for the shipped WordNet benchmark the lexicographer categories (0..44,
    `label_names` = `wordnet.LEXNAMES`); other builds name theirs in `manifest.json`.
    """
    check_task(task)
    check_split(split)
    return _load(task, split, load_manifest(data_dir), data_dir)


def load_embedded_benchmark(
    tasks: Iterable[str] = TASKS, splits: Iterable[str] = SPLITS, data_dir: PathLike = None
) -> dict[str, dict[str, TaskData]]:
    """`{task: {split: TaskData}}` for the given tasks and splits (all nine by default)."""
    tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    for task in tasks:
        check_task(task)
    for split in splits:
        check_split(split)
    manifest = load_manifest(data_dir)
    return {t: {s: _load(t, s, manifest, data_dir) for s in splits} for t in tasks}


def embedded_tokenizer(data_dir: PathLike = None) -> Tokenizer:
    """The SentencePiece tokenizer trained on the benchmark's training texts (T5 ids, 4096 pieces)."""
    data = _read_verified(SPIECE_FILE, load_manifest(data_dir), data_dir)
    processor = spm.SentencePieceProcessor()
    processor.LoadFromSerializedProto(data)
    return Tokenizer(processor, source=f"embedded {SPIECE_FILE}")
