"""The three task types of the paper as text-to-text data, and their metrics.

the paper's tasks: topic classification (TC, AG News, accuracy), extractive reading comprehension
(RC, SQuAD v1.1, F1) and summarisation (TS, XSum, ROUGE-2). Every source (the embedded WordNet
benchmark, TFDS) yields `TaskData`: prompted input strings, target strings, all acceptable
references, and an integer `label` per example that label-skewed (Hetero-TD) partitions use.
The text columns are lists, or `LazySequence`s that make their items on access (TFDS at paper
scale), so a split's strings need not all be in memory.

Metrics use the official definitions: exact match of the label string; SQuAD v1.1 answer
normalisation for EM and F1 (max over references); ROUGE-1/2/L F-measure from `rouge-score`.
"""

from __future__ import annotations

import collections
import dataclasses
import operator
import re
import string
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

Item = TypeVar("Item")

TASKS = ("tc", "rc", "ts")
SPLITS = ("train", "validation", "test")
TASK_NAMES = {"tc": "topic classification", "rc": "reading comprehension", "ts": "summarisation"}
# The score each task reports as its validation score ("acc" in the paper's Algorithm 1).
PRIMARY_METRIC = {"tc": "accuracy", "rc": "f1", "ts": "rouge2"}


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {TASKS}")
    return task


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    return split


def tc_prompt(text: str) -> str:
    return f"topic: {text}"


def rc_prompt(question: str, context: str) -> str:
    return f"question: {question} context: {context}"


def ts_prompt(document: str) -> str:
    return f"summarize: {document}"


class LazySequence(Sequence[Item]):
    """Read-only sequence whose items are made on access; subclasses define `__len__`, `__getitems__`.

    `seq[i]` reads one item, `seq[a:b]` is a `SequenceView` (reads nothing), iteration reads `chunk`
    items per `__getitems__` call. No `==` by value: compare `list(seq)`.
    """

    chunk = 1024

    def __getitems__(self, keys: Sequence[int]) -> list[Item]:
        """The items at `keys` (non-negative, in range), in that order, read together."""
        raise NotImplementedError

    def __getitem__(self, key):
        if isinstance(key, slice):
            return SequenceView(self, range(len(self))[key])
        return self.__getitems__([_index(key, len(self))])[0]

    def __iter__(self) -> Iterator[Item]:
        n = len(self)
        for lo in range(0, n, self.chunk):
            yield from self.__getitems__(range(lo, min(n, lo + self.chunk)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(len={len(self)})"


class SequenceView(LazySequence[Item]):
    """`[fn(base[i]) for i in indices]` (all of `base` when None; `fn` identity when None), lazily.

    Batched reads go to `base.__getitems__` when it has one, so a view of a view reads its root once.
    """

    def __init__(
        self,
        base: Sequence[Any],
        indices: Sequence[int] | np.ndarray | None = None,
        fn: Callable[[Any], Item] | None = None,
    ):
        n = len(base)
        idx = np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
        if idx.ndim != 1:
            raise ValueError(f"SequenceView indices must be 1-D, got shape {idx.shape}")
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"SequenceView indices outside [-{n}, {n})")
        idx = np.where(idx < 0, idx + n, idx)
        if isinstance(base, SequenceView) and (base.fn is None or fn is None):
            base, idx, fn = base.base, base.indices[idx], fn or base.fn
        self.base, self.indices, self.fn = base, idx, fn
        self.indices.flags.writeable = False

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitems__(self, keys: Sequence[int]) -> list[Item]:
        items = read_items(self.base, self.indices[np.asarray(keys, np.int64)].tolist())
        return items if self.fn is None else [self.fn(x) for x in items]


def read_items(seq: Sequence[Item], keys: Sequence[int]) -> list[Item]:
    """`[seq[k] for k in keys]`, in one `seq.__getitems__(keys)` call when `seq` has that method."""
    getitems = getattr(seq, "__getitems__", None)
    if getitems is not None:
        return list(getitems(list(keys)))
    return [seq[k] for k in keys]


def _index(key, n: int) -> int:
    i = operator.index(key)
    if not -n <= i < n:
        raise IndexError(f"index {i} out of range for length {n}")
    return i + n if i < 0 else i


def _one_reference(target: str) -> list[str]:
    return [target]


def _take(column: Sequence[Item], idx: np.ndarray) -> Sequence[Item]:
    return SequenceView(column, idx) if isinstance(column, LazySequence) else [column[i] for i in idx]


@dataclasses.dataclass
class TaskData:
    """One task's examples in one split, columnar. N examples.

    inputs / targets: prompted model input and training target text, `[N]` each.
    references: all acceptable answers per example (RC has several); `[[target]]` by default.
    labels: `<int32>[N]` class (TC) or cluster (RC/TS) ids, used by label-skew partitions.
    label_names: name of each label id.
    Text columns are lists or `LazySequence`s (read on access); lazy columns stay lazy here.
    """

    task: str
    inputs: Sequence[str]
    targets: Sequence[str]
    labels: np.ndarray
    label_names: tuple[str, ...] = ()
    references: Sequence[Sequence[str]] | None = None

    def __post_init__(self):
        check_task(self.task)
        self.labels = np.asarray(self.labels, np.int32)
        n = len(self.inputs)
        if len(self.targets) != n or self.labels.shape != (n,):
            raise ValueError(
                f"TaskData({self.task}): {n} inputs, {len(self.targets)} targets and labels of shape "
                f"{self.labels.shape}; they must all have one entry per example"
            )
        if self.references is None:
            if isinstance(self.targets, LazySequence):
                self.references = SequenceView(self.targets, fn=_one_reference)
            else:
                self.references = [[t] for t in self.targets]
        elif len(self.references) != n:
            raise ValueError(
                f"TaskData({self.task}): {len(self.references)} reference lists for {n} examples"
            )
        if n and self.label_names and (self.labels.min() < 0 or self.labels.max() >= len(self.label_names)):
            raise ValueError(f"TaskData({self.task}): labels outside [0, {len(self.label_names)})")

    def __len__(self) -> int:
        return len(self.inputs)

    def take(self, indices: Sequence[int] | np.ndarray) -> TaskData:
        """The examples at `indices`, in that order (lists for list columns, views for lazy ones)."""
        idx = np.asarray(indices, np.int64)
        return TaskData(
            self.task,
            _take(self.inputs, idx),
            _take(self.targets, idx),
            self.labels[idx],
            self.label_names,
            _take(self.references, idx),
        )

    @property
    def num_labels(self) -> int:
        return len(self.label_names) if self.label_names else int(self.labels.max(initial=-1)) + 1


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Exact match of the (stripped) label string, in percent."""
    _check_lengths(predictions, references)
    hits = [p.strip() in {r.strip() for r in refs} for p, refs in zip(predictions, references)]
    return 100.0 * float(np.mean(hits)) if hits else 0.0


def normalize_answer(text: str) -> str:
    """SQuAD v1.1: lower case, drop punctuation and articles, collapse white space."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = collections.Counter(pred) & collections.Counter(ref)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def squad_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """SQuAD v1.1 `exact_match` and `f1` in percent (max over each example's references)."""
    _check_lengths(predictions, references)
    if not predictions:
        return {"exact_match": 0.0, "f1": 0.0}
    em = [max(squad_exact_match(p, r) for r in refs) for p, refs in zip(predictions, references)]
    f1 = [max(squad_f1(p, r) for r in refs) for p, refs in zip(predictions, references)]
    return {"exact_match": 100.0 * float(np.mean(em)), "f1": 100.0 * float(np.mean(f1))}


def rouge_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """ROUGE-1/2/L F-measure in percent (mean over examples, max over references), `rouge-score`."""
    from rouge_score import rouge_scorer

    _check_lengths(predictions, references)
    if not predictions:
        return {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = collections.defaultdict(float)
    for pred, refs in zip(predictions, references):
        best = collections.defaultdict(float)
        for ref in refs:
            for name, score in scorer.score(ref, pred).items():
                best[name] = max(best[name], score.fmeasure)
        for name, value in best.items():
            totals[name] += value
    return {name: 100.0 * totals[name] / len(predictions) for name in ("rouge1", "rouge2", "rougeL")}


def task_scores(
    task: str, predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> dict[str, float]:
    """All metrics of a task; `PRIMARY_METRIC[task]` names the one the paper reports."""
    check_task(task)
    if task == "tc":
        return {"accuracy": accuracy(predictions, references)}
    if task == "rc":
        return squad_scores(predictions, references)
    return rouge_scores(predictions, references)


def _check_lengths(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    for refs in references:
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError("each example needs a non-empty list of reference strings")
