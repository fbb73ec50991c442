"""T5 span corruption and the packed pretraining corpus (NumPy and the tokenizer only).

`span_corruption` follows T5's `random_spans_noise_mask` and sentinel preprocessors (Raffel et al.
2020, §3.1.4); `SpanCorruptionStream` packs the embedded benchmark's train texts into chunks and
yields seed-determined, resumable batches. Sentinel i is id `vocab_size - 1 - i`, as T5 numbers
`<extra_id_i>`; corpus tokens with the few ids a chunk can need are mapped to `<unk>` first. How
pretraining uses them: docs/pretraining.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator, Sequence

import numpy as np

# The embedded tokenizer's vocabulary size: T5 numbers sentinels downwards from vocab_size - 1.
EMBEDDED_VOCAB_SIZE = 4096


def noise_span_counts(length: int, noise_density: float = 0.15,
                      mean_span_length: float = 3.0) -> tuple[int, int]:
    """`(noise tokens, noise spans)` of a sequence of `length` tokens, as T5 computes them.

    noise = round(length * density) clipped to [1, length - 1]; spans = round(noise / mean) clipped
    to [1, min(noise, length - noise)] (the upper clip is ours: it keeps both partitions valid for
    extreme densities and never binds at T5's 0.15 / 3). Rounding is half-to-even like `tf.round`.
    A sequence shorter than 2 tokens or a zero density gets no noise: `(0, 0)`.
    """
    if length < 2 or noise_density <= 0.0:
        return 0, 0
    noise = int(np.round(length * noise_density))
    noise = min(max(noise, 1), length - 1)
    spans = int(np.round(noise / mean_span_length))
    spans = min(max(spans, 1), noise, length - noise)
    return noise, spans


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random composition of `num_items` into `num_segments` positive lengths."""
    cuts = np.sort(rng.choice(num_items - 1, num_segments - 1, replace=False) + 1)
    return np.diff(np.concatenate([[0], cuts, [num_items]]))


def random_spans_noise_mask(length: int, noise_density: float = 0.15, mean_span_length: float = 3.0,
                            *, rng: np.random.Generator) -> np.ndarray:
    """bool `[length]`: T5's `random_spans_noise_mask` (no random roll), in NumPy.

    The noise and non-noise tokens are each split into `spans` random positive parts (uniform over
    compositions, as T5's shuffled segment starts), interleaved non-noise first: the sequence starts
    with a kept span and ends with a noise span.
    """
    noise, spans = noise_span_counts(length, noise_density, mean_span_length)
    if spans == 0:
        return np.zeros(length, bool)
    noise_lengths = _random_segmentation(noise, spans, rng)
    keep_lengths = _random_segmentation(length - noise, spans, rng)
    interleaved = np.stack([keep_lengths, noise_lengths], axis=1).reshape(-1)
    return np.repeat(np.tile([False, True], spans), interleaved)


def span_corruption(
    tokens: Sequence[int] | np.ndarray,
    noise_density: float = 0.15,
    mean_span_length: float = 3.0,
    *,
    rng: np.random.Generator,
    sentinel_start: int = EMBEDDED_VOCAB_SIZE - 1,
    eos_id: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """T5 span corruption of one token sequence (no EOS in it) -> `(inputs, targets)`, int32.

    Inputs: the kept tokens with each noise span replaced by one sentinel; targets: each sentinel
    followed by its span's tokens; EOS appended to both. Sentinel i (in order of position) is
    `sentinel_start - i`, as T5's `<extra_id_i>` = vocab_size - 1 - i. `len(inputs) = n - noise +
    spans + 1` and `len(targets) = noise + spans + 1` with `noise_span_counts(n, ...)`.

    Written here after T5's `random_spans_noise_mask`, `noise_span_to_unique_sentinel` and
    `nonnoise_span_to_unique_sentinel` (t5/data/preprocessors.py): the library versions need
    TensorFlow. Deterministic given `rng`'s state.
    """
    tokens = np.asarray(tokens, np.int32).reshape(-1)
    mask = random_spans_noise_mask(tokens.size, noise_density, mean_span_length, rng=rng)
    spans = int(np.count_nonzero(mask[1:] & ~mask[:-1]) + (mask[0] if mask.size else 0))
    if spans and sentinel_start - spans + 1 <= eos_id:
        raise ValueError(f"{spans} sentinels from id {sentinel_start} downwards reach the special ids")
    eos = np.array([eos_id], np.int32)
    prev = np.concatenate([[False], mask[:-1]])
    first = mask & ~prev  # first token of each noise span
    sentinels = sentinel_start - (np.cumsum(first) - 1)
    inputs = np.where(first, sentinels, tokens)[~(mask & prev)]
    # Targets: the span tokens, each span preceded by its sentinel.
    starts = np.flatnonzero(first)
    offsets = np.cumsum(mask)[starts] - 1  # where each span begins in tokens[mask]
    targets = np.insert(tokens[mask], offsets, sentinel_start - np.arange(starts.size))
    return (np.concatenate([inputs, eos]).astype(np.int32),
            np.concatenate([targets, eos]).astype(np.int32))


def corrupted_lengths(length: int, noise_density: float = 0.15,
                      mean_span_length: float = 3.0) -> tuple[int, int]:
    """`(len(inputs), len(targets))` of `span_corruption` on `length` tokens (EOS included)."""
    noise, spans = noise_span_counts(length, noise_density, mean_span_length)
    return length - noise + spans + 1, noise + spans + 1


def chunk_length(input_len: int, target_len: int, noise_density: float = 0.15,
                 mean_span_length: float = 3.0) -> int:
    """Largest number of tokens whose corrupted inputs / targets fit `input_len` / `target_len`.

    T5's `compute_input_and_target_lengths`; 70 for 64 / 16 at density 0.15, mean span 3.
    """
    best = 0
    for n in range(1, 2 * (input_len + target_len)):
        i, t = corrupted_lengths(n, noise_density, mean_span_length)
        if i <= input_len and t <= target_len:
            best = n
    if best < 2:
        raise ValueError(f"input_len={input_len}, target_len={target_len} leave no room for a corrupted "
                         "chunk; use at least 4 and 3")
    return best


# The corpus and the packed example stream


def corpus_texts(data_dir: str | None = None) -> list[str]:
    """The unique texts (inputs and targets) of the embedded benchmark's train splits, in order."""
    from fedmoe_jax.data import load_embedded_benchmark

    bench = load_embedded_benchmark(splits=("train",), data_dir=data_dir)
    texts: list[str] = []
    for task in sorted(bench):
        data = bench[task]["train"]
        texts.extend(data.inputs)
        texts.extend(data.targets)
    return list(dict.fromkeys(t for t in texts if t))


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of the tokenizer's serialized SentencePiece model."""
    return hashlib.sha256(tokenizer.processor.serialized_model_proto()).hexdigest()


class Documents(Sequence[np.ndarray]):
    """Token documents stored end to end: `flat` int32 `[total]` and `offsets` `[N + 1]`.

    A `Sequence` of int32 arrays (document i is `flat[offsets[i]:offsets[i + 1]]`) that packs a
    shuffled epoch with one vectorized gather instead of concatenating N small arrays.
    """

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        self.flat = np.asarray(flat, np.int32)
        self.offsets = np.asarray(offsets, np.int64)

    @classmethod
    def from_arrays(cls, documents: Sequence[Sequence[int]]) -> Documents:
        if isinstance(documents, Documents):
            return documents
        arrays = [np.asarray(d, np.int32).reshape(-1) for d in documents]
        lengths = np.array([a.size for a in arrays], np.int64)
        flat = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
        return cls(flat, np.concatenate([[0], np.cumsum(lengths)]))

    def __len__(self) -> int:
        return self.offsets.size - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        i = range(len(self))[i]
        return self.flat[self.offsets[i]: self.offsets[i + 1]]

    def concatenated(self, order: np.ndarray) -> np.ndarray:
        """The documents in `order`, end to end."""
        starts, lengths = self.offsets[:-1][order], np.diff(self.offsets)[order]
        ends = np.cumsum(lengths)
        index = np.arange(ends[-1] if ends.size else 0) + np.repeat(starts - (ends - lengths), lengths)
        return self.flat[index]


_DOCUMENTS: dict[tuple[str, str | None], Documents] = {}


def embedded_documents(tokenizer, data_dir: str | None = None) -> Documents:
    """The corpus as token documents (no EOS), one per unique train text; cached per tokenizer."""
    key = (tokenizer_fingerprint(tokenizer), None if data_dir is None else os.fspath(data_dir))
    if key not in _DOCUMENTS:
        ids = tokenizer.encode(corpus_texts(data_dir), add_eos=False)
        _DOCUMENTS.clear()  # one corpus in memory (18 MB for the embedded one)
        _DOCUMENTS[key] = Documents.from_arrays([x for x in ids if x])
    return _DOCUMENTS[key]


def packed_chunks(documents: Sequence[np.ndarray], length: int, seed: int, epoch: int) -> np.ndarray:
    """int32 `[N, length]`: the documents shuffled by `(seed, epoch)`, concatenated, cut (rest dropped)."""
    docs = Documents.from_arrays(documents)
    order = np.random.default_rng([seed, epoch]).permutation(len(docs))
    flat = docs.concatenated(order)
    n = flat.size // length
    if n == 0:
        raise ValueError(f"the corpus has {flat.size} tokens: not one chunk of {length}")
    return flat[: n * length].reshape(n, length)


@dataclasses.dataclass(frozen=True)
class SpanCorruptionStream:
    """Endless, seed-determined batches of span-corrupted packed chunks.

    With `reconstruct_fraction` > 0, that share of the examples (drawn per example) keeps the
    corrupted inputs but targets the chunk's first `target_len - 1` tokens, uncorrupted, + EOS:
    copying the visible tokens and filling the masked ones in place (MASS / BART-style
    reconstruction), which span corruption alone never asks for.

    Chunks hold `chunk_length(input_len, target_len)` corpus tokens; corpus tokens equal to one of
    the `num_sentinels` reserved ids (`sentinel_start` downwards) become `unk_id`. Each batch is a
    dict of int32 arrays `inputs`, `input_mask` `[B, input_len]`, `targets`, `target_mask`
    `[B, target_len]` (right-padded with `pad_id`).
    """

    documents: Sequence[np.ndarray]
    input_len: int = 64
    target_len: int = 16
    noise_density: float = 0.15
    mean_span_length: float = 3.0
    sentinel_start: int = EMBEDDED_VOCAB_SIZE - 1
    seed: int = 0
    eos_id: int = 1
    pad_id: int = 0
    unk_id: int = 2
    reconstruct_fraction: float = 0.0

    @property
    def length(self) -> int:
        return chunk_length(self.input_len, self.target_len, self.noise_density, self.mean_span_length)

    @property
    def num_sentinels(self) -> int:
        return noise_span_counts(self.length, self.noise_density, self.mean_span_length)[1]

    def batches(self, batch_size: int, state: dict | None = None) -> SpanCorruptionBatches:
        """The batch iterator; `state` (from its `.state()`) continues an earlier iterator exactly."""
        return SpanCorruptionBatches(self, batch_size, state)


class SpanCorruptionBatches(Iterator[dict[str, np.ndarray]]):
    """`SpanCorruptionStream.batches`: an iterator whose position (`state()`: the epoch, the chunk
    within it and the corruption RNG's state, all JSON) can be saved and resumed from."""

    def __init__(self, stream: SpanCorruptionStream, batch_size: int, state: dict | None = None):
        self.stream, self.batch_size = stream, batch_size
        self.floor = stream.sentinel_start - stream.num_sentinels + 1
        if self.floor <= max(stream.eos_id, stream.pad_id, stream.unk_id):
            raise ValueError(f"sentinel ids {self.floor}..{stream.sentinel_start} overlap the special ids")
        self.docs = Documents.from_arrays(stream.documents)
        self.rng = np.random.default_rng([stream.seed, 1 << 20])
        self.epoch, self.pos = 0, 0  # epoch: the next one to pack; pos: the next chunk of the current
        self.chunks = np.zeros((0, stream.length), np.int32)
        if state is not None:
            self.rng.bit_generator.state = state["rng"]
            self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
            if self.epoch > 0:
                self.chunks = self._pack(self.epoch - 1)

    def _pack(self, epoch: int) -> np.ndarray:
        chunks = packed_chunks(self.docs, self.stream.length, self.stream.seed, epoch)
        return np.where(chunks >= self.floor, self.stream.unk_id, chunks)

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "rng": self.rng.bit_generator.state}

    def __next__(self) -> dict[str, np.ndarray]:
        s, b = self.stream, self.batch_size
        out = {k: np.full((b, n), s.pad_id, np.int32) for k, n in (("inputs", s.input_len),
                                                                  ("targets", s.target_len))}
        out["input_mask"] = np.zeros((b, s.input_len), np.int32)
        out["target_mask"] = np.zeros((b, s.target_len), np.int32)
        for i in range(b):
            if self.pos == len(self.chunks):
                self.chunks, self.pos = self._pack(self.epoch), 0
                self.epoch += 1
            chunk = self.chunks[self.pos]
            inp, tgt = span_corruption(chunk, s.noise_density, s.mean_span_length,
                                       rng=self.rng, sentinel_start=s.sentinel_start, eos_id=s.eos_id)
            if s.reconstruct_fraction > 0 and self.rng.random() < s.reconstruct_fraction:
                tgt = np.append(chunk[: s.target_len - 1], np.int32(s.eos_id))  # the chunk's start, whole
            self.pos += 1
            out["inputs"][i, : inp.size], out["input_mask"][i, : inp.size] = inp, 1
            out["targets"][i, : tgt.size], out["target_mask"][i, : tgt.size] = tgt, 1
        return out
