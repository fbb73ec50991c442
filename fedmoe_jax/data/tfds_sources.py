"""The paper's datasets from TFDS as `TaskData`: AG News (TC), SQuAD v1.1 (RC), XSum (TS).

Datasets are prepared once as `array_record` on a machine with network (`prepare`, or this module's
command line) and read here by random access through `tfds.builder_from_directory(...)
.as_data_source(split)`: no TensorFlow, no network, and only the examples asked for are decoded.
Layout under `data_dir`, as TFDS writes it: `ag_news_subset/1.0.0`, `squad/v1.1/3.0.0` (older TFDS
releases named the config `plain_text`; both are read), `xsum/1.1.0`.

Splits (TFDS file order, which TFDS shuffles deterministically when it prepares a dataset):
  ag_news_subset  train = official train minus its last 5% (rounded up); validation = that last 5%;
                  test = official test.            (120,000 -> 114,000 / 6,000 / 7,600)
  squad           train / validation carved from official train the same way; test = official
                  validation (the v1.1 dev set).   (87,599 -> 83,219 / 4,380 / 10,570)
  xsum            the official train / validation / test.

Lazy by default: the text columns of the returned `TaskData` are `LazySequence`s over the data
source (records read and converted on access, in batches, a small LRU cache of converted rows);
only the labels are arrays. Loading streams the split once for them (and for the clusters).

Labels: AG News class ids (names from the dataset's ClassLabel). SQuAD and XSum have no classes;
their labels are clusters of the model inputs (FedNLP clusters texts for label skew), see
`TextClusters`: fitted on the first `cluster_fit_examples` inputs of our train split, so every split
and every `max_examples` gets the same cluster ids for the same text.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import sys
import zlib
from collections.abc import Sequence

import numpy as np

from fedmoe_jax.data.tasks import (
    SPLITS,
    LazySequence,
    TaskData,
    check_split,
    check_task,
    rc_prompt,
    tc_prompt,
    ts_prompt,
)

VALIDATION_FRACTION = 0.05
_READ_BATCH = 256
_CACHE_ROWS = 2048  # converted rows a lazy split keeps (LRU): one tokenizer chunk's inputs and targets


@dataclasses.dataclass(frozen=True)
class _Dataset:
    name: str
    configs: tuple[str, ...]  # config directories to look for, in order ("" = no config level)
    version: str
    features: tuple[str, ...]  # top-level features the loader reads
    # our split -> (TFDS split, part): "all", "head" (all but the carved validation) or "tail" (it).
    splits: dict[str, tuple[str, str]]
    prepare_note: str = ""

    def dir_candidates(self, data_dir: str) -> list[str]:
        return [os.path.join(data_dir, self.name, c) for c in self.configs]


_CARVED = {"train": ("train", "head"), "validation": ("train", "tail")}
DATASETS = {
    "ag_news_subset": _Dataset(
        "ag_news_subset",
        ("",),
        "1.0.0",
        ("title", "description", "label"),
        {**_CARVED, "test": ("test", "all")},
    ),
    "squad": _Dataset(
        "squad",
        ("v1.1", "plain_text"),
        "3.0.0",
        ("question", "context", "answers"),
        {**_CARVED, "test": ("validation", "all")},
    ),
    "xsum": _Dataset(
        "xsum",
        ("",),
        "1.1.0",
        ("document", "summary"),
        {s: (s, "all") for s in SPLITS},
        prepare_note=(
            " --manual_dir=DIR (XSum is a manual download: put xsum-extracts-from-downloads.tar.gz, made by "
            "the scripts of github.com/EdinburghNLP/XSum, in DIR; TFDS's xsum builder needs "
            "`pip install tensorflow` on the preparing machine)"
        ),
    ),
}
TASK_DATASETS = {"tc": "ag_news_subset", "rc": "squad", "ts": "xsum"}
_TFDS_NAMES = {"ag_news_subset": "ag_news_subset", "squad": "squad/v1.1", "xsum": "xsum"}


def prepare_command(dataset: str, data_dir: str) -> str:
    """The shell command that prepares `dataset` under `data_dir` (run it where there is network)."""
    spec = _dataset(dataset)
    return (
        f"python -m fedmoe_jax.data.tfds_sources prepare --dataset={spec.name} --data_dir={data_dir}"
        + spec.prepare_note
    )


def prepare(dataset: str, data_dir: str, manual_dir: str | None = None) -> str:
    """Download and prepare `dataset` as array_record under `data_dir`; returns the prepared directory."""
    import tensorflow_datasets as tfds

    spec = _dataset(dataset)
    if spec.name == "xsum":
        import tensorflow_datasets.summarization.xsum  # noqa: F401  (registers the legacy builder)
    builder = tfds.builder(_TFDS_NAMES[spec.name], data_dir=data_dir)
    config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    try:
        builder.download_and_prepare(file_format="array_record", download_config=config)
    except ImportError as e:  # TFDS imports some modules only when preparing and does not declare them
        if not e.name:
            raise
        raise ValueError(
            f"preparing {spec.name} needs the Python package {e.name}: pip install {e.name}"
        ) from e
    return os.fspath(builder.data_dir)


def load_tfds_task(
    task: str,
    split: str,
    data_dir: str,
    max_examples: int | None = None,
    *,
    num_clusters: int = 10,
    cluster_seed: int = 0,
    cluster_fit_examples: int = 2000,
    lazy: bool = True,
) -> TaskData:
    """One task's `split` ("train", "validation", "test") from its TFDS dataset prepared in `data_dir`.

    Reads the first `max_examples` examples of the split (all when None) and nothing else, except that
    RC/TS also read the first `cluster_fit_examples` train inputs to fit their `num_clusters` clusters.
    `lazy`: text columns read from the data source on access (else lists; same content).
    Raises a one-line ValueError for unknown names, unprepared data (with the command that prepares
    it) and unreadable files (naming them).
    """
    spec = DATASETS[TASK_DATASETS[check_task(task)]]
    check_split(split)
    if max_examples is not None and max_examples < 0:
        raise ValueError(f"max_examples must be >= 0 or None, got {max_examples}")
    builder = _open_builder(spec, data_dir)
    names = tuple(builder.info.features["label"].names) if task == "tc" else ()
    rows = _split_rows(builder, spec, split, max_examples, data_dir, _converter(task, names))
    table = None if lazy else list(rows.stream())
    if table is None:
        inputs, targets, references = (_Column(rows, field) for field in range(3))
    else:
        inputs, targets, references = ([r[field] for r in table] for field in range(3))
    if task == "tc":
        labels = np.fromiter((r[3] for r in table or rows.stream()), np.int32, len(rows))
        return TaskData(task, inputs, targets, labels, names, references)
    if split == "train" and len(rows) >= cluster_fit_examples:
        fit_inputs = list(inputs[:cluster_fit_examples])
    else:
        fit = _split_rows(builder, spec, "train", cluster_fit_examples, data_dir, _converter(task, names))
        fit_inputs = [r[0] for r in fit.stream()]
    clusters = TextClusters.fit(fit_inputs, num_clusters, seed=cluster_seed)
    names = tuple(f"cluster_{i}" for i in range(num_clusters))
    return TaskData(task, inputs, targets, clusters.assign(inputs), names, references)


_Row = tuple[str, str, list[str], int]  # (input, target, references, class id or -1)


def _converter(task: str, names: tuple[str, ...]):
    """Decoded TFDS record -> `_Row` of `task`."""

    def tc(r) -> _Row:
        label = int(r["label"])
        text = _text(r["title"]) + " " + _text(r["description"])
        return tc_prompt(text), names[label], [names[label]], label

    def rc(r) -> _Row:
        references = [_text(t) for t in r["answers"]["text"]] or [""]
        return rc_prompt(_text(r["question"]), _text(r["context"])), references[0], references, -1

    def ts(r) -> _Row:
        summary = _text(r["summary"])
        return ts_prompt(_text(r["document"])), summary, [summary], -1

    return {"tc": tc, "rc": rc, "ts": ts}[task]


class _Rows:
    """Converted `_Row`s of records `[start, stop)` of a TFDS split, read on demand.

    Missing rows are read in sorted batches of `_READ_BATCH` through the data source's `__getitems__`;
    the last `_CACHE_ROWS` converted rows stay in an LRU cache, so the columns of one row read it once.
    """

    def __init__(self, read, start: int, stop: int, convert):
        self._read, self.start, self.stop, self._convert = read, start, stop, convert
        self._cache: collections.OrderedDict[int, _Row] = collections.OrderedDict()

    def __len__(self) -> int:
        return self.stop - self.start

    def get(self, keys: Sequence[int]) -> list[_Row]:
        """Rows at `keys` (0-based within the split, in range), in that order."""
        found: dict[int, _Row] = {}
        for k in keys:
            if k in self._cache:
                self._cache.move_to_end(k)
                found[k] = self._cache[k]
        missing = sorted({k for k in keys if k not in found})
        for lo in range(0, len(missing), _READ_BATCH):
            batch = missing[lo : lo + _READ_BATCH]
            for k, record in zip(batch, self._read([self.start + k for k in batch])):
                found[k] = self._convert(record)
        for k in missing[-_CACHE_ROWS:]:
            self._cache[k] = found[k]
        while len(self._cache) > _CACHE_ROWS:
            self._cache.popitem(last=False)
        return [found[k] for k in keys]

    def stream(self):
        """All rows in order, `_READ_BATCH` at a time."""
        for lo in range(0, len(self), _READ_BATCH):
            yield from self.get(range(lo, min(len(self), lo + _READ_BATCH)))


class _Column(LazySequence):
    """One field of `_Rows`: 0 inputs, 1 targets, 2 references."""

    def __init__(self, rows: _Rows, field: int):
        self.rows, self.field = rows, field

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, keys: Sequence[int]) -> list:
        n = len(self.rows)
        keys = [int(k) for k in keys]
        if any(not 0 <= k < n for k in keys):
            raise IndexError(f"keys outside [0, {n})")
        return [r[self.field] for r in self.rows.get(keys)]


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _dataset(name: str) -> _Dataset:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; use one of {tuple(DATASETS)}")
    return DATASETS[name]


def _version_dir(spec: _Dataset, data_dir: str) -> str | None:
    """The prepared version directory: the expected version if there, else the newest prepared one."""
    for root in spec.dir_candidates(data_dir):
        if not os.path.isdir(root):
            continue
        prepared = [
            v
            for v in os.listdir(root)
            if re.fullmatch(r"\d+\.\d+\.\d+", v)
            and os.path.isfile(os.path.join(root, v, "dataset_info.json"))
        ]
        if spec.version in prepared:
            return os.path.join(root, spec.version)
        if prepared:
            return os.path.join(root, max(prepared, key=lambda v: tuple(map(int, v.split(".")))))
    return None


def is_prepared(dataset: str, data_dir: str) -> bool:
    """Whether `dataset` ("ag_news_subset", "squad", "xsum") has a prepared version under `data_dir`."""
    return _version_dir(_dataset(dataset), data_dir) is not None


def _open_builder(spec: _Dataset, data_dir: str):
    import tensorflow_datasets as tfds

    path = _version_dir(spec, data_dir)
    if path is None:
        looked = os.path.join(spec.dir_candidates(data_dir)[0], spec.version, "dataset_info.json")
        raise ValueError(
            f"TFDS dataset {spec.name} is not prepared in {data_dir} (no {looked}); on a machine with "
            f"network run: {prepare_command(spec.name, data_dir)}"
        )
    try:
        builder = tfds.builder_from_directory(path)
    except Exception as e:  # noqa: BLE001  (TFDS raises many types for bad metadata)
        raise ValueError(
            f"cannot read the TFDS metadata in {path} (corrupt dataset_info.json or features.json?): "
            f"{_one_line(e)}; delete {path} and run: {prepare_command(spec.name, data_dir)}"
        ) from e
    file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
    if file_format != "array_record":
        raise ValueError(
            f"{path} was prepared as {file_format}, but reading without TensorFlow needs array_record; "
            f"delete it and run: {prepare_command(spec.name, data_dir)}"
        )
    missing = [f for f in spec.features if f not in builder.info.features.keys()]
    needed = {s for s, _ in spec.splits.values()}
    if missing or not needed <= set(builder.info.splits.keys()):
        raise ValueError(
            f"{path} is not {spec.name}: it needs features {spec.features} and splits {sorted(needed)}, "
            f"has {tuple(builder.info.features.keys())} and {sorted(builder.info.splits.keys())}"
        )
    return builder


def _split_rows(
    builder, spec: _Dataset, split: str, max_examples: int | None, data_dir: str, convert
) -> _Rows:
    """`_Rows` of our `split`, the first `max_examples` of them; nothing is read yet."""
    tfds_split, part = spec.splits[split]
    info = builder.info.splits[tfds_split]
    n = info.num_examples
    n_val = math.ceil(VALIDATION_FRACTION * n) if part != "all" else 0
    start, stop = (n - n_val, n) if part == "tail" else (0, n - n_val)
    if max_examples is not None:
        stop = min(stop, start + max_examples)
    source = None

    def read(keys: list[int]) -> list:
        nonlocal source
        try:
            if source is None:
                source = builder.as_data_source(split=tfds_split)
            return source.__getitems__(keys)
        except Exception as e:  # noqa: BLE001  (array_record/protobuf raise RuntimeError, IndexError, ...)
            files = ", ".join(os.fspath(p) for p in info.filepaths)
            raise ValueError(
                f"cannot read the {tfds_split} records of {spec.name} (corrupt or truncated file: {files}): "
                f"{_one_line(e)}; delete {os.path.dirname(files.split(', ')[0])} and run: "
                f"{prepare_command(spec.name, data_dir)}"
            ) from e

    return _Rows(read, start, stop, convert)


def _one_line(error: Exception) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())[:300]


# --------------------------------------------------------------------------------------------
# Text clustering (labels for label-skew partitions of tasks without classes)
# --------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"\w+")


def hashed_tfidf_rows(
    texts: Sequence[str], num_features: int, max_words: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per text: (sorted hashed-word ids, 1 + log(count)) over its first `max_words` lower-case words.

    Words hash with CRC-32 (stable across processes and machines, unlike `hash`).
    """
    rows = []
    for text in texts:
        words = _TOKEN.findall(text.lower())[:max_words]
        ids = np.array([zlib.crc32(w.encode("utf-8")) % num_features for w in words], np.int64)
        uniq, counts = np.unique(ids, return_counts=True)
        rows.append((uniq, 1.0 + np.log(counts)))
    return rows


@dataclasses.dataclass
class TextClusters:
    """Spherical k-means on L2-normalised hashed TF-IDF vectors; deterministic for a seed.

    `fit` learns IDF weights and `k` unit centroids (k-means++ seeding with `np.random.default_rng(seed)`,
    then Lloyd iterations until assignments stop changing, at most `max_iter`); `assign` maps any texts
    to their most cosine-similar centroid (ties: lowest id; texts with no words: cluster 0).
    """

    idf: np.ndarray  # <float64>[H] H = num_features
    centroids: np.ndarray  # <float64>[k, H], unit rows
    max_words: int

    @classmethod
    def fit(
        cls,
        texts: Sequence[str],
        k: int = 10,
        seed: int = 0,
        num_features: int = 2**18,
        max_words: int = 256,
        max_iter: int = 50,
    ) -> TextClusters:
        if k < 1 or len(texts) < k:
            raise ValueError(f"cannot fit {k} text clusters to {len(texts)} texts; need k >= 1 and k texts")
        rows = hashed_tfidf_rows(texts, num_features, max_words)
        df = np.bincount(np.concatenate([ids for ids, _ in rows]), minlength=num_features)
        idf = np.log((1.0 + len(texts)) / (1.0 + df))
        self = cls(idf, np.zeros((k, num_features)), max_words)
        ids, vals, row_of = self._csr(rows)
        rng = np.random.default_rng(seed)
        chosen = [int(rng.integers(len(texts)))]
        for _ in range(1, k):  # k-means++ with cosine distance
            self.centroids = self._dense([(ids[row_of == c], vals[row_of == c]) for c in chosen])
            dist = np.clip(1.0 - self._similarity(ids, vals, row_of, len(texts)).max(axis=0), 0.0, None)
            dist[chosen] = 0.0
            p = dist / dist.sum() if dist.sum() > 0 else np.full(len(texts), 1.0 / len(texts))
            chosen.append(int(rng.choice(len(texts), p=p)))
        self.centroids = self._dense([(ids[row_of == c], vals[row_of == c]) for c in chosen])
        labels = None
        for _ in range(max_iter):
            new = self._similarity(ids, vals, row_of, len(texts)).argmax(axis=0)
            if labels is not None and np.array_equal(new, labels):
                break
            labels = new
            for c in range(k):
                member = labels[row_of] == c
                if member.any():  # an empty cluster keeps its centroid
                    total = np.bincount(ids[member], weights=vals[member], minlength=num_features)
                    self.centroids[c] = total / max(np.linalg.norm(total), 1e-12)
        return self

    def assign(self, texts: Sequence[str], batch: int = 4096) -> np.ndarray:
        """<int32>[N] cluster id of each text."""
        out = []
        for lo in range(0, len(texts), batch):
            chunk = texts[lo : lo + batch]
            rows = hashed_tfidf_rows(chunk, self.idf.shape[0], self.max_words)
            ids, vals, row_of = self._csr(rows)
            out.append(self._similarity(ids, vals, row_of, len(chunk)).argmax(axis=0))
        return np.concatenate(out).astype(np.int32) if out else np.zeros(0, np.int32)

    def _csr(self, rows):
        """Concatenated (ids, unit TF-IDF values, row index) of the non-zeros of `rows`."""
        ids = [i for i, _ in rows]
        vals = [v * self.idf[i] for i, v in rows]
        vals = [v / n if (n := np.linalg.norm(v)) > 0 else v for v in vals]
        row_of = np.repeat(np.arange(len(rows)), [len(i) for i in ids])
        return (
            np.concatenate(ids) if ids else np.zeros(0, np.int64),
            np.concatenate(vals) if vals else np.zeros(0),
            row_of,
        )

    def _dense(self, rows) -> np.ndarray:
        out = np.zeros((len(rows), self.idf.shape[0]))
        for r, (i, v) in enumerate(rows):
            out[r, i] = v
        return out

    def _similarity(self, ids, vals, row_of, n) -> np.ndarray:
        """<float64>[k, n] cosine similarity of each centroid to each row."""
        return np.stack([np.bincount(row_of, weights=c[ids] * vals, minlength=n) for c in self.centroids])


def cluster_texts(texts: Sequence[str], k: int = 10, seed: int = 0) -> np.ndarray:
    """<int32>[N] cluster ids of `texts` from `TextClusters` fitted on them."""
    return TextClusters.fit(texts, k, seed).assign(texts)


def _define_flags(fv) -> None:
    from absl import flags

    flags.DEFINE_enum("dataset", None, sorted(DATASETS), "The dataset to prepare.", flag_values=fv)
    flags.DEFINE_string("data_dir", None, "Where TFDS writes it (the runs' data.dir).", flag_values=fv)
    flags.DEFINE_string("manual_dir", None, "Folder with manually downloaded files (xsum).", flag_values=fv)
    for name in ("dataset", "data_dir"):
        flags.mark_flag_as_required(name, flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m fedmoe_jax.data.tfds_sources prepare --dataset=NAME --data_dir=DIR [--manual_dir=M]`."""
    from fedmoe_jax.cli_common import tool_command

    _, fv = tool_command(argv, "fedmoe_jax.data.tfds_sources", ["prepare"], _define_flags,
                         "prepare: download and prepare a dataset as array_record (needs network)")
    try:
        path = prepare(fv.dataset, fv.data_dir, fv.manual_dir)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"dataset": fv.dataset, "prepared": path}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
