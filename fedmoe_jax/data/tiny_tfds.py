"""Tiny stand-ins for the paper's TFDS datasets (AG News, SQuAD v1.1, XSum), offline.

TFDS builders named like the real ones, with the real feature structure, so `download_and_prepare`
writes the real layout (`ag_news_subset/1.0.0`, `squad/v1.1/3.0.0`, `xsum/1.1.0`, array_record) and
`fedmoe_jax.data.tfds_sources` reads them unchanged. The texts are generated (three topics of words,
numbered titles, questions and summaries): enough to run the paper path end to end on a machine
without network (`fedmoe_jax.tools.tiny_paper`) and to test the loaders, nothing to learn from.

    write_tiny_tfds("runs/tiny_paper/tfds")  # all three, DEFAULT_SIZES examples per split
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import tensorflow_datasets as tfds

AG_NAMES = ["World", "Sports", "Business", "Sci/Tech"]
TOPICS = [
    "football goal striker match league referee penalty stadium coach season".split(),
    "galaxy telescope orbit planet astronomer comet nebula rocket star lunar".split(),
    "bank loan interest market stock investor bond inflation profit tax".split(),
]
# Examples per official split. 30 clients (10 per task) keep a few validation examples each after
# our loaders carve 5% of train into validation (AG News, SQuAD).
DEFAULT_SIZES = {
    "ag_news_subset": {"train": 800, "test": 200},
    "squad": {"train": 800, "validation": 200},
    "xsum": {"train": 800, "validation": 200, "test": 200},
}
_OFFSET = 1_000_000  # row numbers of the k-th split start at k * _OFFSET: no text repeats across splits


def topic_text(i: int, n_words: int = 12) -> str:
    words = TOPICS[i % 3]
    return " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(n_words))


def _ag_rows(n: int, offset: int) -> list[dict]:
    return [{"title": f"Title {offset + i} ü", "description": topic_text(offset + i),
             "label": (offset + i) % 4} for i in range(n)]


def _squad_rows(n: int, offset: int, n_answers: int) -> list[dict]:
    return [{"id": f"q{offset + i}", "title": f"Article {(offset + i) % 3}",
             "context": topic_text(offset + i, 20), "question": f"which word {offset + i}?",
             "answers": {"text": [f"answer {offset + i} {a}" for a in range(n_answers)],
                         "answer_start": list(range(n_answers))}}
            for i in range(n)]


def _xsum_rows(n: int, offset: int) -> list[dict]:
    return [{"document": topic_text(offset + i, 30), "summary": f"summary {offset + i}."} for i in range(n)]


def tiny_rows(sizes: Mapping[str, Mapping[str, int]] = DEFAULT_SIZES) -> dict[str, dict[str, list[dict]]]:
    """`{dataset: {official split: rows}}` with `sizes[dataset][split]` rows each (SQuAD: one answer per
    train question, three per validation question, as the real set)."""
    makers = {
        "ag_news_subset": lambda n, off, split: _ag_rows(n, off),
        "squad": lambda n, off, split: _squad_rows(n, off, 1 if split == "train" else 3),
        "xsum": lambda n, off, split: _xsum_rows(n, off),
    }
    return {name: {split: makers[name](n, k * _OFFSET, split) for k, (split, n) in enumerate(splits.items())}
            for name, splits in sizes.items()}


class _Tiny(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    ROWS: dict = {}  # {split: rows}; `tiny_builder` sets it per instance

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(rows) for split, rows in self.ROWS.items()}

    def _generate_examples(self, rows):
        yield from enumerate(rows)


class FakeAgNewsSubset(_Tiny, skip_registration=True):
    name = "ag_news_subset"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "label": tfds.features.ClassLabel(names=AG_NAMES), "title": tfds.features.Text(),
            "description": tfds.features.Text()}))


class FakeSquad(_Tiny, skip_registration=True):
    name = "squad"
    VERSION = tfds.core.Version("3.0.0")
    # older TFDS releases named the config plain_text; the loader reads both
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="v1.1"), tfds.core.BuilderConfig(name="plain_text")]

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "id": np.str_, "title": tfds.features.Text(), "context": tfds.features.Text(),
            "question": tfds.features.Text(),
            "answers": tfds.features.Sequence({"text": tfds.features.Text(), "answer_start": np.int32})}))


class FakeXsum(_Tiny, skip_registration=True):
    name = "xsum"
    VERSION = tfds.core.Version("1.1.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "document": tfds.features.Text(), "summary": tfds.features.Text()}))


BUILDERS = {"ag_news_subset": FakeAgNewsSubset, "squad": FakeSquad, "xsum": FakeXsum}


def tiny_builder(dataset: str, data_dir: str | os.PathLike, rows: Mapping[str, list[dict]],
                 config: str | None = None) -> tfds.core.GeneratorBasedBuilder:
    """The stand-in builder of `dataset` under `data_dir`, yielding `rows` (`{split: rows}`)."""
    kwargs = {"config": config or "v1.1"} if dataset == "squad" else {}
    builder = BUILDERS[dataset](data_dir=os.fspath(data_dir), **kwargs)
    builder.ROWS = dict(rows)
    return builder


def write_tiny_tfds(data_dir: str | os.PathLike,
                    sizes: Mapping[str, Mapping[str, int]] = DEFAULT_SIZES) -> str:
    """Prepare the stand-ins of `sizes`' datasets as array_record under `data_dir`; returns it."""
    tfds.disable_progress_bar()
    for dataset, rows in tiny_rows(sizes).items():
        tiny_builder(dataset, data_dir, rows).download_and_prepare(file_format="array_record")
    return os.fspath(data_dir)


__all__ = ["AG_NAMES", "DEFAULT_SIZES", "FakeAgNewsSubset", "FakeSquad", "FakeXsum", "tiny_builder",
           "tiny_rows", "topic_text", "write_tiny_tfds"]
