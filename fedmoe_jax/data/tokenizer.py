"""SentencePiece tokenizer with T5 / Switch Transformer conventions (pad 0, eos 1, unk 2, no bos).

A thin wrapper over the `sentencepiece` library: it loads `spiece.model` from a local Hugging Face
T5 / Switch checkpoint directory (nothing is downloaded), encodes with EOS, pads to fixed-width
batches for `jit`, and trains small T5-compatible models for tests and synthetic runs.

Shape letters: B batch, T tokens.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import sentencepiece as spm

SPIECE_FILE = "spiece.model"
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
_T5_IDS = {"pad": PAD_ID, "eos": EOS_ID, "unk": UNK_ID}


class Tokenizer:
    """SentencePiece tokenizer with T5 ids: `pad_id = 0`, `eos_id = 1`, `unk_id = 2`, no BOS."""

    pad_id = PAD_ID
    eos_id = EOS_ID
    unk_id = UNK_ID

    def __init__(self, processor: spm.SentencePieceProcessor, source: str = "<memory>"):
        ids = {"pad": processor.pad_id(), "eos": processor.eos_id(), "unk": processor.unk_id()}
        if ids != _T5_IDS:
            raise ValueError(
                f"SentencePiece model {source} has special ids {ids}; expected T5 ids {_T5_IDS} "
                "(retrain it with fedmoe_jax.data.train_sentencepiece)"
            )
        self.processor = processor
        self.source = source

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a SentencePiece model file (e.g. `DIR/spiece.model`)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(
                f"SentencePiece model file {path!r} does not exist; pass the path of a .model file"
            )
        with open(path, "rb") as f:
            proto = f.read()
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError):
            raise ValueError(
                f"{path!r} is not a valid SentencePiece model (it does not parse as a ModelProto); "
                f"use the {SPIECE_FILE} of a T5/Switch checkpoint or train one with train_sentencepiece"
            ) from None
        return cls(processor, source=repr(path))

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | os.PathLike) -> Tokenizer:
        """Load `spiece.model` from a local Hugging Face T5 / Switch checkpoint directory."""
        checkpoint_dir = os.fspath(checkpoint_dir)
        if not os.path.isdir(checkpoint_dir):
            raise ValueError(
                f"checkpoint directory {checkpoint_dir!r} does not exist; download it first, e.g. "
                f"`huggingface-cli download google/switch-base-8 --local-dir {checkpoint_dir}`"
            )
        path = os.path.join(checkpoint_dir, SPIECE_FILE)
        if not os.path.isfile(path):
            raise ValueError(
                f"checkpoint directory {checkpoint_dir!r} has no {SPIECE_FILE}; expected the "
                f"SentencePiece model at {path!r} (as in google/switch-base-* or t5-* on the Hub)"
            )
        return cls.from_file(path)

    @property
    def vocab_size(self) -> int:
        """Number of SentencePiece pieces (T5: 32000; the model's embedding may be larger)."""
        return self.processor.get_piece_size()

    def __len__(self) -> int:
        return self.vocab_size

    def _encode_one(self, ids: list[int], max_length: int | None, add_eos: bool) -> list[int]:
        if add_eos:
            ids = ids + [self.eos_id]
        if max_length is not None and len(ids) > max_length:
            ids = ids[: max_length - 1] + [self.eos_id] if add_eos else ids[:max_length]
        return ids

    def encode(
        self, text: str | Sequence[str], max_length: int | None = None, add_eos: bool = True
    ) -> list[int] | list[list[int]]:
        """Token ids of a string (a list of ids) or of a list of strings (a list of lists).

        With `max_length`, longer sequences are truncated; the EOS (when added) is kept as the last id.
        """
        least = 2 if add_eos else 1
        if max_length is not None and max_length < least:
            raise ValueError(f"max_length={max_length} leaves no room for a token; use at least {least}")
        if isinstance(text, str):
            return self._encode_one(self.processor.encode(text), max_length, add_eos)
        texts = list(text)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("encode expects a string or a list of strings")
        return [self._encode_one(ids, max_length, add_eos) for ids in self.processor.encode(texts)]

    def encode_batch(
        self, texts: Sequence[str], max_length: int, add_eos: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Fixed-width batch: `ids <int32>[B, T]` right-padded with `pad_id`, `mask <int32>[B, T]`.

        T = `max_length` (one shape per bucket, so `jit` compiles once); longer texts are truncated
        with the EOS kept.
        """
        if isinstance(texts, str):
            raise ValueError("encode_batch expects a list of strings; use encode for a single string")
        rows = self.encode(list(texts), max_length=max_length, add_eos=add_eos)
        ids = np.full((len(rows), max_length), self.pad_id, np.int32)
        mask = np.zeros((len(rows), max_length), np.int32)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return ids, mask

    def decode(self, ids: Any) -> str | list[str]:
        """Text of ids `[T]` (a list of texts for `[B, T]` or a list of id lists): stops at EOS, skips pad.

        Ids outside the SentencePiece vocabulary (negative label fillers, T5's sentinel and
        embedding-padding rows past `vocab_size`) are skipped as well.
        """
        if isinstance(ids, list | tuple) and ids and not np.isscalar(ids[0]):
            return [self.decode(row) for row in ids]
        arr = np.asarray(ids)
        if arr.ndim == 2:
            return [self.decode(row) for row in arr]
        if arr.ndim != 1:
            raise ValueError(f"decode expects ids of shape [T] or [B, T], got {arr.shape}")
        out: list[int] = []
        for i in arr.tolist():
            if i == self.eos_id:
                break
            if i != self.pad_id and 0 <= i < self.vocab_size:
                out.append(int(i))
        return self.processor.decode(out)

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source}, vocab_size={self.vocab_size})"


def train_sentencepiece(
    texts: Iterable[str],
    model_prefix_or_path: str | os.PathLike,
    vocab_size: int,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    seed: int = 0,
    **options: Any,
) -> str:
    """Train a T5-compatible SentencePiece model (pad 0, eos 1, unk 2, no bos); return its path.

    `model_prefix_or_path` is a prefix (`DIR/spiece` writes `DIR/spiece.model` and `.vocab`) or a
    path ending in `.model`. Training is deterministic: one thread, every sentence, fixed seed.
    Extra `options` go to `sentencepiece.SentencePieceTrainer.train`.
    """
    prefix = os.fspath(model_prefix_or_path)
    if prefix.endswith(".model"):
        prefix = prefix[: -len(".model")]
    parent = os.path.dirname(prefix)
    if parent and not os.path.isdir(parent):
        raise ValueError(f"output directory {parent!r} does not exist; create it before training")
    sentences = [t for t in texts if t]
    if not sentences:
        raise ValueError("train_sentencepiece got no non-empty texts; pass a list of sentences")
    spm.set_random_generator_seed(seed)
    kwargs: dict[str, Any] = dict(
        model_prefix=prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    kwargs.update(options)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), **kwargs)
    except RuntimeError as e:
        raise ValueError(f"SentencePiece training failed: {str(e).strip()}") from None
    return prefix + ".model"
