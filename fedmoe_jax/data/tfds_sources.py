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

Labels: AG News class ids (names from the dataset's ClassLabel). SQuAD and XSum have no classes;
their labels are clusters of the model inputs (FedNLP clusters texts for label skew), see
`TextClusters`: fitted on the first `cluster_fit_examples` inputs of our train split, so every split
and every `max_examples` gets the same cluster ids for the same text.
"""

from __future__ import annotations

import argparse
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
    TaskData,
    check_split,
    check_task,
    rc_prompt,
    tc_prompt,
    ts_prompt,
)

VALIDATION_FRACTION = 0.05
_READ_BATCH = 256


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
            " --manual-dir DIR (XSum is a manual download: put xsum-extracts-from-downloads.tar.gz, made by "
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
        f"python -m fedmoe_jax.data.tfds_sources prepare --dataset {spec.name} --data-dir {data_dir}"
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
) -> TaskData:
    """One task's `split` ("train", "validation", "test") from its TFDS dataset prepared in `data_dir`.

    Reads the first `max_examples` examples of the split (all when None) and nothing else, except that
    RC/TS also read the first `cluster_fit_examples` train inputs to fit their `num_clusters` clusters.
    Raises a one-line ValueError for unknown names, unprepared data (with the command that prepares
    it) and unreadable files (naming them).
    """
    spec = DATASETS[TASK_DATASETS[check_task(task)]]
    check_split(split)
    if max_examples is not None and max_examples < 0:
        raise ValueError(f"max_examples must be >= 0 or None, got {max_examples}")
    builder = _open_builder(spec, data_dir)
    rows = _read_split(builder, spec, split, max_examples, data_dir)
    if task == "tc":
        names = tuple(builder.info.features["label"].names)
        inputs = [tc_prompt(_text(r["title"]) + " " + _text(r["description"])) for r in rows]
        labels = np.array([int(r["label"]) for r in rows], np.int32)
        return TaskData(task, inputs, [names[i] for i in labels], labels, names)
    if task == "rc":
        inputs = [rc_prompt(_text(r["question"]), _text(r["context"])) for r in rows]
        references = [[_text(t) for t in r["answers"]["text"]] or [""] for r in rows]
        targets = [refs[0] for refs in references]
    else:
        inputs = [ts_prompt(_text(r["document"])) for r in rows]
        targets = [_text(r["summary"]) for r in rows]
        references = None
    fit_rows = (
        rows
        if split == "train" and len(rows) >= cluster_fit_examples
        else _read_split(builder, spec, "train", cluster_fit_examples, data_dir)
    )
    fit_inputs = [_input(task, r) for r in fit_rows[:cluster_fit_examples]]
    clusters = TextClusters.fit(fit_inputs, num_clusters, seed=cluster_seed)
    names = tuple(f"cluster_{i}" for i in range(num_clusters))
    return TaskData(task, inputs, targets, clusters.assign(inputs), names, references)


def _input(task: str, row: dict) -> str:
    if task == "rc":
        return rc_prompt(_text(row["question"]), _text(row["context"]))
    return ts_prompt(_text(row["document"]))


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


def _read_split(builder, spec: _Dataset, split: str, max_examples: int | None, data_dir: str) -> list[dict]:
    """Decoded rows of our `split`, the first `max_examples` of them, read in batches."""
    tfds_split, part = spec.splits[split]
    info = builder.info.splits[tfds_split]
    n = info.num_examples
    n_val = math.ceil(VALIDATION_FRACTION * n) if part != "all" else 0
    start, stop = (n - n_val, n) if part == "tail" else (0, n - n_val)
    if max_examples is not None:
        stop = min(stop, start + max_examples)
    rows: list[dict] = []
    try:
        source = builder.as_data_source(split=tfds_split)
        for lo in range(start, stop, _READ_BATCH):
            rows.extend(source.__getitems__(list(range(lo, min(stop, lo + _READ_BATCH)))))
    except Exception as e:  # noqa: BLE001  (array_record/protobuf raise RuntimeError, IndexError, ...)
        files = ", ".join(os.fspath(p) for p in info.filepaths)
        raise ValueError(
            f"cannot read the {tfds_split} records of {spec.name} (corrupt or truncated file: {files}): "
            f"{_one_line(e)}; delete {os.path.dirname(files.split(', ')[0])} and run: "
            f"{prepare_command(spec.name, data_dir)}"
        ) from e
    return rows


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedmoe_jax.data.tfds_sources", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="download and prepare a dataset as array_record (needs network)")
    p.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    p.add_argument("--data-dir", required=True)
    p.add_argument("--manual-dir", default=None, help="folder with manually downloaded files (xsum)")
    args = parser.parse_args(argv)
    try:
        path = prepare(args.dataset, args.data_dir, args.manual_dir)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"dataset": args.dataset, "prepared": path}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
