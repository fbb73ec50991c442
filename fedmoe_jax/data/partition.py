"""Client partitions of the task data: which task each client learns and which examples it holds.

The paper's federated settings: N clients (30) split over the task types; **T** settings are IID
within a task, **TD** settings add FedNLP-style label skew within a task: for every label, the shares
of the task's clients are drawn from Dirichlet(alpha). Each client gets train / validation / test
examples; one draw per task is applied to all three splits, so a client's validation and test data
look like its train data.

Randomness comes from `np.random.default_rng([seed, task id])`, never global state. Retries are
bounded: an unmeetable `min_examples` raises a one-line ValueError instead of looping forever
(as FedNLP's niid_label). Partitions are saved with the run (npz + json with a sha256) and reloaded
verified.

Shape letters: N clients.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import numbers
import os
import zipfile
from collections.abc import Mapping, Sequence

import numpy as np

from fedmoe_jax.data.tasks import SPLITS, TASKS, TaskData, check_split, check_task
from fedmoe_jax.files import atomic_write

SETTINGS = ("T", "TD")
_FORMAT = "fedmoe_jax.partition/1"

Data = Mapping[str, Mapping[str, TaskData]]


def assign_tasks(
    num_clients: int = 30,
    tasks: Sequence[str] = TASKS,
    ratios: Sequence[float] | Mapping[str, float] | None = None,
) -> np.ndarray:
    """Task index (into `tasks`) of every client, `<int32>[N]`, in contiguous blocks in `tasks` order.

    Even by default; `ratios` (one positive weight per task, or a {task: weight} dict) are rounded by
    largest remainder. Every task gets at least one client, else ValueError.
    """
    tasks = _check_tasks(tasks)
    if isinstance(num_clients, bool) or not isinstance(num_clients, int | np.integer) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    if ratios is None:
        weights = np.ones(len(tasks))
    elif isinstance(ratios, Mapping):
        unknown = sorted(set(ratios) - set(tasks))
        missing = [t for t in tasks if t not in ratios]
        if unknown or missing:
            raise ValueError(
                f"ratios keys must be exactly the tasks {tasks}; unknown {unknown}, missing {missing}"
            )
        weights = np.array([ratios[t] for t in tasks], np.float64)
    else:
        weights = np.asarray(ratios, np.float64)
        if weights.shape != (len(tasks),):
            raise ValueError(f"ratios has {weights.size} entries for {len(tasks)} tasks {tasks}")
    if not np.all(np.isfinite(weights)) or np.any(weights <= 0):
        raise ValueError(f"ratios must be positive and finite, got {weights.tolist()}")
    exact = num_clients * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    # Largest remainder; ties go to the earlier task (stable sort).
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: num_clients - counts.sum()]] += 1
    if np.any(counts == 0):
        empty = [t for t, c in zip(tasks, counts) if c == 0]
        raise ValueError(
            f"{num_clients} clients with ratios {weights.tolist()} leave no client for task(s) {empty}; "
            f"use more clients, larger ratios for those tasks, or drop them from tasks"
        )
    return np.repeat(np.arange(len(tasks), dtype=np.int32), counts)


@dataclasses.dataclass(eq=False)
class Partition:
    """Per-client example indices into each task's data, plus how they were made.

    tasks: task names; `client_tasks <int32>[N]` indexes into them.
    indices: split -> N sorted `<int32>` arrays of example indices into `data[task][split]`.
    source_sizes: task -> split -> number of examples the partition was made for.
    Arrays are read-only so that `fingerprint()` stays valid.
    """

    tasks: tuple[str, ...]
    client_tasks: np.ndarray
    indices: dict[str, tuple[np.ndarray, ...]]
    setting: str
    alpha: float | None
    seed: int
    source_sizes: dict[str, dict[str, int]]
    min_examples: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(SPLITS, 0))

    def __post_init__(self):
        self.tasks = _check_tasks(self.tasks)
        self.client_tasks = _frozen(np.asarray(self.client_tasks), "client_tasks")
        n = self.client_tasks.size
        if self.client_tasks.ndim != 1 or n == 0:
            raise ValueError(
                f"client_tasks must be a non-empty 1-D array, got shape {self.client_tasks.shape}"
            )
        if self.client_tasks.min() < 0 or self.client_tasks.max() >= len(self.tasks):
            raise ValueError(f"client_tasks must index into tasks {self.tasks}")
        if self.setting not in SETTINGS:
            raise ValueError(f"unknown setting {self.setting!r}; use one of {SETTINGS}")
        if set(self.indices) != set(SPLITS):
            raise ValueError(f"indices must have the splits {SPLITS}, got {sorted(self.indices)}")
        self.indices = {
            s: tuple(_frozen(np.asarray(a), f"{s} indices") for a in self.indices[s]) for s in SPLITS
        }
        self.seed = int(self.seed)
        self.alpha = None if self.alpha is None else float(self.alpha)
        self.source_sizes = {t: {s: int(v[s]) for s in SPLITS} for t, v in self.source_sizes.items()}
        self.min_examples = {s: int(self.min_examples[s]) for s in SPLITS}
        for split in SPLITS:
            if len(self.indices[split]) != n:
                raise ValueError(f"{split} indices cover {len(self.indices[split])} clients, expected {n}")
            for t, task in enumerate(self.tasks):
                clients = np.flatnonzero(self.client_tasks == t)
                if clients.size == 0:
                    continue
                if task not in self.source_sizes:
                    raise ValueError(f"source_sizes lacks task {task!r}, which has clients")
                size = self.source_sizes[task][split]
                held = [self.indices[split][c] for c in clients]
                flat = np.concatenate(held) if held else np.zeros(0, np.int32)
                if any(a.ndim != 1 for a in held) or (flat.size and (flat.min() < 0 or flat.max() >= size)):
                    raise ValueError(f"{task} {split} indices must be 1-D and within [0, {size})")
                if np.any(np.bincount(flat, minlength=size) > 1):
                    raise ValueError(f"an example of {task} {split} is held by more than one client")
        self._fingerprint: str | None = None

    @property
    def num_clients(self) -> int:
        return int(self.client_tasks.size)

    def task_of(self, client: int) -> str:
        return self.tasks[int(self.client_tasks[client])]

    def clients_of(self, task: str) -> np.ndarray:
        """Ids of the clients learning `task`, ascending."""
        return np.flatnonzero(self.client_tasks == self.tasks.index(task))

    def client_indices(self, client: int, split: str = "train") -> np.ndarray:
        return self.indices[check_split(split)][client]

    def num_examples(self, split: str = "train") -> np.ndarray:
        """Examples per client in `split`, `<int64>[N]`."""
        return np.array([a.size for a in self.indices[check_split(split)]], np.int64)

    def counts(self) -> dict[str, np.ndarray]:
        """split -> examples per client `[N]`."""
        return {s: self.num_examples(s) for s in SPLITS}

    def check_data(self, data: Data) -> None:
        """ValueError unless `data` has every partitioned task and split with the sizes it was made for."""
        for task, sizes in self.source_sizes.items():
            for split in SPLITS:
                if task not in data or split not in data[task]:
                    raise ValueError(f"data lacks {task}/{split}, which the partition assigns to clients")
                have = len(data[task][split])
                if have != sizes[split]:
                    raise ValueError(
                        f"data {task}/{split} has {have} examples but the partition was made for "
                        f"{sizes[split]}; rebuild the partition with make_partition for this data"
                    )

    def _meta(self) -> dict:
        return {
            "format": _FORMAT,
            "tasks": list(self.tasks),
            "setting": self.setting,
            "alpha": self.alpha,
            "seed": self.seed,
            "min_examples": self.min_examples,
            "source_sizes": self.source_sizes,
        }

    def _arrays(self) -> dict[str, np.ndarray]:
        out = {"client_tasks": self.client_tasks.astype("<i4")}
        for s in SPLITS:
            held = self.indices[s]
            out[f"{s}_offsets"] = np.concatenate([[0], np.cumsum([a.size for a in held])]).astype("<i8")
            out[f"{s}_indices"] = np.concatenate(held).astype("<i4")
        return out

    def fingerprint(self) -> str:
        """sha256 (hex) over the metadata and every index array."""
        if self._fingerprint is None:
            h = hashlib.sha256(json.dumps(self._meta(), sort_keys=True).encode())
            for name, arr in sorted(self._arrays().items()):
                h.update(f"{name}:{arr.dtype.str}:{arr.shape}".encode())
                h.update(np.ascontiguousarray(arr).tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def save(self, path: str | os.PathLike) -> tuple[str, str]:
        """Write `PREFIX.npz` (indices) and `PREFIX.json` (metadata, sha256) atomically; return both paths.

        `path` is the prefix, or either file name; missing parent folders are created.
        """
        npz_path, json_path = _paths(path)
        os.makedirs(os.path.dirname(os.path.abspath(npz_path)), exist_ok=True)
        buf = io.BytesIO()
        np.savez_compressed(buf, **self._arrays())
        meta = dict(self._meta(), num_clients=self.num_clients, fingerprint=self.fingerprint())
        atomic_write(npz_path, buf.getvalue())
        atomic_write(json_path, (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())
        return npz_path, json_path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Partition:
        """Read a saved partition; ValueError if a file is missing, corrupt or does not match its sha256."""
        npz_path, json_path = _paths(path)
        for p in (npz_path, json_path):
            if not os.path.isfile(p):
                raise ValueError(f"partition file {p!r} does not exist; save one with Partition.save")
        try:
            with open(json_path) as f:
                meta = json.load(f)
            if meta.get("format") != _FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {_FORMAT!r}")
            with np.load(npz_path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            indices = {}
            for s in SPLITS:
                off, flat = arrays[f"{s}_offsets"], arrays[f"{s}_indices"]
                if off.ndim != 1 or off[0] != 0 or off[-1] != flat.size or np.any(np.diff(off) < 0):
                    raise ValueError(f"bad {s} offsets")
                indices[s] = tuple(flat[a:b] for a, b in zip(off[:-1], off[1:]))
            part = cls(
                tasks=tuple(meta["tasks"]),
                client_tasks=arrays["client_tasks"],
                indices=indices,
                setting=meta["setting"],
                alpha=meta["alpha"],
                seed=meta["seed"],
                source_sizes=meta["source_sizes"],
                min_examples=meta["min_examples"],
            )
        except (OSError, KeyError, TypeError, IndexError, ValueError, zipfile.BadZipFile) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(
                f"partition {npz_path!r} / {json_path!r} is corrupt ({msg}); recreate it with make_partition"
            ) from None
        if part.fingerprint() != meta.get("fingerprint"):
            raise ValueError(
                f"partition {npz_path!r} does not match the sha256 in {json_path!r} (the files were "
                f"modified or mixed up); recreate it with make_partition"
            )
        return part

    def __repr__(self) -> str:
        per_task = {t: int(np.sum(self.client_tasks == i)) for i, t in enumerate(self.tasks)}
        return (
            f"Partition(setting={self.setting}, alpha={self.alpha}, seed={self.seed}, clients={per_task}, "
            f"train={int(self.num_examples('train').sum())}, sha256={self.fingerprint()[:12]})"
        )


def make_partition(
    data: Data,
    client_tasks: Sequence[int] | np.ndarray,
    setting: str = "T",
    alpha: float = 0.5,
    min_examples: int | Mapping[str, int] = 1,
    seed: int = 0,
    max_retries: int = 100,
    tasks: Sequence[str] = TASKS,
) -> Partition:
    """Split every task's examples over its clients (`client_tasks` from `assign_tasks`).

    T: IID (shuffle, split evenly). TD: per label, client shares ~ Dirichlet(alpha), drawn once per task
    and applied to all splits; redrawn (at most `max_retries` times) until every client has at least
    `min_examples` examples in each split (an int, or a {split: int} dict).
    """
    tasks = _check_tasks(tasks)
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; use one of {SETTINGS}")
    if setting == "TD" and not (isinstance(alpha, numbers.Real) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int | np.integer) or max_retries < 1:
        raise ValueError(f"max_retries must be a positive integer, got {max_retries!r}")
    mins = _check_min_examples(min_examples)
    client_tasks = np.asarray(client_tasks)
    if client_tasks.ndim != 1 or client_tasks.size == 0 or not np.issubdtype(client_tasks.dtype, np.integer):
        raise ValueError("client_tasks must be a non-empty 1-D integer array (see assign_tasks)")
    if client_tasks.min() < 0 or client_tasks.max() >= len(tasks):
        raise ValueError(f"client_tasks values must index into tasks {tasks}")
    client_tasks = client_tasks.astype(np.int32)

    indices: dict[str, list[np.ndarray]] = {s: [np.zeros(0, np.int32)] * client_tasks.size for s in SPLITS}
    sizes: dict[str, dict[str, int]] = {}
    for t, task in enumerate(tasks):
        clients = np.flatnonzero(client_tasks == t)
        if clients.size == 0:
            continue
        splits = _task_splits(data, task)
        sizes[task] = {s: len(d) for s, d in splits.items()}
        for s, d in splits.items():
            if len(d) < mins[s] * clients.size:
                raise ValueError(
                    f"task {task!r} has {len(d)} {s} examples for {clients.size} clients, but "
                    f"min_examples={mins[s]} needs {mins[s] * clients.size}; lower min_examples or give "
                    f"this task fewer clients"
                )
        rng = np.random.default_rng([seed, TASKS.index(task)])
        if setting == "T":
            held = {s: _split_iid(len(d), clients.size, rng) for s, d in splits.items()}
        else:
            held = _split_dirichlet(task, splits, clients.size, alpha, mins, max_retries, rng)
        for s in SPLITS:
            for c, a in zip(clients, held[s]):
                indices[s][c] = a
    return Partition(
        tasks=tasks,
        client_tasks=client_tasks,
        indices={s: tuple(v) for s, v in indices.items()},
        setting=setting,
        alpha=float(alpha) if setting == "TD" else None,
        seed=int(seed),
        source_sizes=sizes,
        min_examples=mins,
    )


def _split_iid(n: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [np.sort(p).astype(np.int32) for p in np.array_split(rng.permutation(n), k)]


def _split_dirichlet(
    task: str,
    splits: Mapping[str, TaskData],
    k: int,
    alpha: float,
    mins: Mapping[str, int],
    max_retries: int,
    rng: np.random.Generator,
) -> dict[str, list[np.ndarray]]:
    labels = {s: d.labels for s, d in splits.items()}
    for s, lab in labels.items():
        if lab.size and lab.min() < 0:
            raise ValueError(f"task {task!r} {s} has negative labels; TD partitions need labels >= 0")
    num_labels = max(int(lab.max(initial=-1)) + 1 for lab in labels.values())
    short = ""
    for _ in range(max_retries):
        shares = rng.dirichlet(np.full(k, float(alpha)), size=max(num_labels, 1))  # [labels, k]
        held, short = {}, ""
        for s in SPLITS:
            held[s] = _apply_shares(labels[s], shares, rng)
            if not short and min(a.size for a in held[s]) < mins[s]:
                short = s
        if not short:
            return held
    sizes = ", ".join(f"{len(d)} {s}" for s, d in splits.items())
    raise ValueError(
        f"task {task!r}: no Dirichlet(alpha={alpha}) draw in {max_retries} tries gave each of its {k} "
        f"clients at least {mins[short]} {short} example(s) ({sizes}; {num_labels} labels); raise alpha, "
        f"lower min_examples, give the task fewer clients, or raise max_retries"
    )


def _apply_shares(labels: np.ndarray, shares: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Split examples label by label: client j gets a `shares[label, j]` fraction of each label."""
    k = shares.shape[1]
    order = rng.permutation(labels.size)
    order = order[np.argsort(labels[order], kind="stable")]  # grouped by label, random within
    per_label = np.bincount(labels, minlength=shares.shape[0])  # [labels]
    cuts = np.floor(np.cumsum(shares, axis=1) * per_label[:, None] + 0.5).astype(np.int64)
    cuts[:, -1] = per_label
    counts = np.diff(cuts, axis=1, prepend=0)  # [labels, k]
    owner = np.repeat(np.tile(np.arange(k), shares.shape[0]), counts.ravel())
    by_owner = order[np.argsort(owner, kind="stable")]
    bounds = np.cumsum(counts.sum(0))[:-1]
    return [np.sort(a).astype(np.int32) for a in np.split(by_owner, bounds)]


def _task_splits(data: Data, task: str) -> dict[str, TaskData]:
    if task not in data:
        raise ValueError(f"data has no task {task!r} but clients are assigned to it; data has {sorted(data)}")
    out = {}
    for s in SPLITS:
        if s not in data[task]:
            raise ValueError(f"data for task {task!r} lacks the {s!r} split; it needs {SPLITS}")
        d = data[task][s]
        if not isinstance(d, TaskData) or d.task != task:
            raise ValueError(f"data[{task!r}][{s!r}] must be a TaskData of task {task!r}")
        out[s] = d
    return out


def _check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    if isinstance(tasks, str):
        raise ValueError(f"tasks must be a sequence of task names, got the string {tasks!r}")
    tasks = tuple(check_task(t) for t in tasks)
    if not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must be non-empty and distinct, got {tasks}")
    return tasks


def _check_min_examples(min_examples: int | Mapping[str, int]) -> dict[str, int]:
    if isinstance(min_examples, Mapping):
        unknown = sorted(set(min_examples) - set(SPLITS))
        if unknown:
            raise ValueError(f"min_examples has unknown splits {unknown}; use {SPLITS}")
        mins = {s: min_examples.get(s, 0) for s in SPLITS}
    else:
        mins = dict.fromkeys(SPLITS, min_examples)
    for s, m in mins.items():
        if isinstance(m, bool) or not isinstance(m, int | np.integer) or m < 0:
            raise ValueError(f"min_examples[{s!r}] must be a non-negative integer, got {m!r}")
    return {s: int(m) for s, m in mins.items()}


def _frozen(a: np.ndarray, what: str) -> np.ndarray:
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{what} must be integers, got dtype {a.dtype}")
    a = a.astype(np.int32, copy=True)
    a.flags.writeable = False
    return a


def _paths(path: str | os.PathLike) -> tuple[str, str]:
    prefix = os.fspath(path)
    for ext in (".npz", ".json"):
        if prefix.endswith(ext):
            prefix = prefix[: -len(ext)]
    return prefix + ".npz", prefix + ".json"


