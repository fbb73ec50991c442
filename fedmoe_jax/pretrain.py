"""Pretraining of the CPU-scale Switch Transformer on the embedded corpus (T5 span corruption), cached.

The paper fine-tunes a pretrained Switch Transformer. No model hub is reachable on the CPU-scale
setup, so its experiments start from a model pretrained here, once per model config, on the
*training* texts of the embedded WordNet benchmark (inputs and targets of the TC, RC and TS train
splits; validation and test texts are never seen). The objective is T5's span corruption
(Raffel et al. 2020, §3.1.4): 15 % of the tokens, in spans of mean length 3, are replaced by one
sentinel each in the encoder input; the decoder predicts every sentinel followed by its span.

Sentinels. The embedded tokenizer has no `<extra_id_*>` pieces and the model's vocabulary equals the
tokenizer's (4096), so, as T5 numbers its sentinels from the top of the vocabulary downwards
(`<extra_id_0>` = vocab_size - 1), sentinel i is id `vocab_size - 1 - i` and the ids of the few
sentinels a chunk can need (3 for the default 64 / 16 lengths) are reserved: corpus tokens with those
ids are mapped to `<unk>` before corruption. With the embedded tokenizer they are the rare
characters `~ } {` (2 occurrences each in 4.5 M corpus tokens).

Packing (T5's `reduce_concat_tokens` + `split_tokens`): the unique training texts are tokenized
without EOS, shuffled per epoch, concatenated without separators and cut into chunks of the largest
length whose corrupted inputs / targets (+ EOS) fit `input_len` / `target_len` (70 tokens for
64 / 16). Everything is a pure function of the seed.

Recipe 3: Adafactor and half the examples reconstructed. Recipe 2 (AdamW 3e-3, span corruption
alone) gave models that did not use their input: the decoder became an unconditional language model
of the masked spans and the encoder output collapsed to nearly one vector (cosine 0.98 of every
token to the batch mean). Two changes, each measured:

1. T5's optimizer, Adafactor (`optimizers.make_optimizer`: factored second moments, updates scaled
   by each parameter's RMS and clipped at RMS 1, no weight decay) at 1e-2 with warmup and cosine
   decay. `input_dependence` measures the effect: the span-corruption CE with each example's own
   inputs against the CE with another example's inputs (nats per target token; switch-small-16,
   batch 32, span corruption alone):

       optimizer                steps   CE     gap     encoder cosine to mean
       AdamW 3e-3 (recipe 2)      800   4.67   0.000   0.98
       AdamW 3e-3 (recipe 2)    20000   4.14   0.02    0.97
       AdamW 1e-3, no decay       800   4.64   0.002   0.91   (of norms/embeddings)
       Adafactor 3e-2             800   4.31   0.000   0.96
       Adafactor 1e-2             800   4.41   0.018   0.73
       Adafactor 1e-2            3000   4.04   0.177   0.57

   A copy task (16 random tokens -> the same tokens) shows the same: Adafactor 1e-2 reaches 82 %
   token accuracy in 2000 steps after a plateau of ~800; AdamW 1e-3 is at 13 % after 500 (17 %
   with dense FFNs instead of the MoE). The gradients equal PyTorch's through Hugging Face's model
   (`tests/test_hf_switch.py`): this is the architecture and the recipe, not a bug.
2. Span corruption never asks to copy a visible token, and extractive RC is copying: fine-tuned from
   the Adafactor-only model, RC stayed at F1 0 and its pretrained weights copied random tokens no
   faster than a random model (10 % after 500 steps). `reconstruct_fraction=0.5` targets, for half
   the examples, the chunk's first 15 tokens uncorrupted (MASS / BART-style; `SpanCorruptionStream`).
   A near-centralized check (`configs/cpu.py` `local`, 3 clients one per task, 10 x 100 steps at
   1e-3, `model.baseline_num_experts=16`), test scores TC accuracy / RC F1 / TS ROUGE-2:

       recipe 2 (AdamW, 20000 steps)               7.8 / 0.0 / 1.45   (session of 2026-11-25)
       Adafactor, span corruption, 3000 steps     25.2 / 0.0 / 1.48
       Adafactor, + reconstruction, 3000 steps    35.7 / 8.0 / 1.12   (the default)

   With reconstruction the input gap is 3.26 nats on the mixed objective (6.52 on reconstruction,
   0.007 on span corruption alone, whose CE rises from 4.04 to 4.22); `input_dependence` in
   `pretrain.json` holds both. Summaries (TS) stay near ROUGE-2 1: defining a word from its lemma is
   beyond a 10 M-parameter model trained on 4.5 M tokens.

Cost (measured on the 2-core CI machine, AMD EPYC, one CPU device, `XLA_FLAGS` unset, other load
~0): switch-small-16 (10.2 M parameters) at batch 32, input 64, target 16 trains at 3.4 steps/s
(3.5 with 4 experts; ~1.9 when another job shares the two cores); compilation takes 7-12 s and
tokenizing the corpus 3 s, so the default 3000 steps take about 15 minutes per model
(measured 13 min idle). The absolute
`expert_capacity=64` of switch-small-16 would run at 0.45 steps/s, dropless dispatch at 0.7 (both
under load, vs 1.9), hence pretraining routes with a capacity factor (see `train_config`).

`pretrained_params(config, steps)` keeps the result in `cache_dir/<name>-<sha256 key>/`: a Hugging
Face checkpoint (`config.json`, `model.safetensors`, written by `save_hf_switch`) and `pretrain.json`
(the key's fields, the loss history, timings, the weights' SHA-256). The key covers the model config
as trained, the steps, seed and every hyperparameter, the recipe version, the embedded data manifest
and the tokenizer. Entries are built in a temporary folder and renamed into place under an `fcntl`
lock, so parallel workers never train twice nor read half an entry; an entry that fails to load or
verify is rebuilt with a warning. A build checkpoints its state every `checkpoint_every` steps in
`.<entry>.partial/` and a later build continues from there (bit-identical; `pretrain(checkpoint_dir=)`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedmoe_jax.federated.optimizers import OPTIMIZERS, make_optimizer
from fedmoe_jax.federated.preemption import RunInterrupted, StopSignals, requested_stop
from fedmoe_jax.federated.run_checkpoint import RunCheckpointer, abstract_like
from fedmoe_jax.models.switch import SwitchConfig, SwitchTransformer, shift_right, switch_loss

log = logging.getLogger(__name__)

# Bump when the recipe changes what a given key trains (invalidates every cached entry).
# 2: dropout masks and router jitter from models.random (counter hash); 3: Adafactor by default
RECIPE_VERSION = 3
# The embedded tokenizer's vocabulary size: T5 numbers sentinels downwards from vocab_size - 1.
EMBEDDED_VOCAB_SIZE = 4096
DEFAULT_STEPS = 3000
DEFAULT_CACHE_DIR = "runs/pretrained"
# Entries that ship with the package, looked up before the cache: a rebuild on another machine (CPU
# model, XLA flags) differs in the last bits, which thousands of steps amplify into another model, so
# the CPU-scale reproduction starts every run, on every machine, from these committed bytes.
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "pretrained")
# Hyperparameters of `pretrain` (all part of the cache key).
DEFAULTS: dict[str, Any] = dict(
    batch_size=32,
    input_len=64,
    target_len=16,
    # T5's optimizer: factored second moments, updates scaled by each parameter's RMS and clipped
    # at RMS 1. AdamW at 3e-3 (recipe 2) left the encoder unused even after 20k steps: the decoder
    # became an unconditional span LM (measurements in the module docstring).
    optimizer="adafactor",
    learning_rate=1e-2,
    warmup_steps=60,
    weight_decay=0.0,
    noise_density=0.15,
    mean_span_length=3.0,
    # share of examples whose target is the chunk's start reconstructed (SpanCorruptionStream): the
    # copy-from-input that extractive RC needs; span corruption alone did not teach it at this scale
    reconstruct_fraction=0.5,
    lb_loss_weight=0.01,
    z_loss_weight=0.001,
    dropout_rate=0.0,  # T5.1.1: no dropout in pretraining (None: the config's)
    # Routing while pretraining: capacity ceil(cf * T / E) per sequence (None: the config's own).
    capacity_factor=2.0,
    clip_norm=1.0,
)
ENTRY_FILE = "pretrain.json"
# Batches of `input_dependence` measured after a pretraining, and the gap (nats) under which the
# result is reported as not using its input.
HEALTH_BATCHES = 4
MIN_INPUT_GAP = 0.05
# SwitchConfig fields a Hugging Face config.json does not hold (or cannot: expert_capacity=None);
# they are passed back as `load_hf_switch` overrides and do not change parameter shapes.
RUNTIME_FIELDS = ("dispatch", "dropped_token_mode", "renormalize_gates", "capacity_factor",
                  "expert_capacity", "dtype", "param_dtype")


# ---------------------------------------------------------------------------------------------
# Span corruption
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Corpus and packed example stream
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def train_config(config: SwitchConfig, dropout_rate: float | None = DEFAULTS["dropout_rate"],
                 capacity_factor: float | None = DEFAULTS["capacity_factor"]) -> SwitchConfig:
    """The config pretraining runs with: `config` with the pretraining dropout and routing.

    `capacity_factor` (not None) routes with `dispatch="capacity"`, `expert_capacity=None` and that
    factor, whatever the config's own routing (switch-small-16's absolute capacity of 64 slots per
    expert and sequence computes 16x the tokens and makes a step ~3x slower on CPU; Switch
    pretraining used factors of 1.0-1.25). Neither changes a parameter shape.
    """
    if dropout_rate is not None:
        config = config.replace(dropout_rate=float(dropout_rate))
    if capacity_factor is not None:
        config = config.replace(dispatch="capacity", expert_capacity=None,
                                capacity_factor=float(capacity_factor))
    return config


def injected_optimizer(name: str, weight_decay: float) -> optax.GradientTransformation:
    """`optimizers.make_optimizer(name, lr, weight_decay)` with the rate `lr` an injected
    hyperparameter (`state.hyperparams["learning_rate"]`, set per step)."""
    make_optimizer(name, 0.0)  # an unknown name fails here, not inside a trace
    return optax.inject_hyperparams(
        lambda learning_rate: make_optimizer(name, learning_rate, weight_decay))(learning_rate=0.0)


@functools.lru_cache(maxsize=8)
def _programs(cfg: SwitchConfig, optimizer: str, weight_decay: float, clip_norm: float,
              lb_loss_weight: float, z_loss_weight: float):
    """Jitted `(init, optimizer init, train step)`, kept so that repeated pretrainings of a config
    (tests, sweeps) trace and compile once. The learning rate is an argument of the step, not a
    constant, so one program serves any number of steps and any schedule."""
    model = SwitchTransformer(cfg)
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), injected_optimizer(optimizer, weight_decay))

    def init(key, input_len, target_len):
        return model.init(key, jnp.ones((1, input_len), jnp.int32),
                          jnp.ones((1, target_len), jnp.int32))["params"]

    def train_step(params, opt_state, batch, key, lr):
        clip_state, inner = opt_state
        opt_state = (clip_state, inner._replace(hyperparams={**inner.hyperparams, "learning_rate": lr}))
        drop_key, jitter_key = jax.random.split(key)

        def loss_fn(p):
            out = model.apply({"params": p}, batch["inputs"], shift_right(batch["targets"],
                              cfg.decoder_start_token_id, cfg.pad_token_id),
                              batch["input_mask"], batch["target_mask"], deterministic=False,
                              rngs={"dropout": drop_key, "jitter": jitter_key})
            return switch_loss(out, batch["targets"], batch["target_mask"], label_smoothing=0.0,
                               lb_loss_weight=lb_loss_weight, z_loss_weight=z_loss_weight)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    return (jax.jit(init, static_argnums=(1, 2)), jax.jit(tx.init),
            jax.jit(train_step, donate_argnums=(0, 1)))


def learning_rate_schedule(steps: int, learning_rate: float, warmup_steps: int) -> np.ndarray:
    """float32 `[steps]`: the rate of each update from `optax.warmup_cosine_decay_schedule` (linear
    from 0 over `min(warmup, steps // 2)` steps, then a cosine to 0 at `steps`), precomputed so that
    the jitted step takes it as an input."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(warmup_steps, steps // 2), steps)
    return np.asarray(jax.vmap(schedule)(jnp.arange(steps)), np.float32)


def pretrain(
    config: SwitchConfig,
    tokenizer,
    steps: int,
    batch_size: int = DEFAULTS["batch_size"],
    input_len: int = DEFAULTS["input_len"],
    target_len: int = DEFAULTS["target_len"],
    learning_rate: float = DEFAULTS["learning_rate"],
    warmup_steps: int = DEFAULTS["warmup_steps"],
    seed: int = 0,
    progress: bool = True,
    *,
    optimizer: str = DEFAULTS["optimizer"],
    weight_decay: float = DEFAULTS["weight_decay"],
    noise_density: float = DEFAULTS["noise_density"],
    mean_span_length: float = DEFAULTS["mean_span_length"],
    reconstruct_fraction: float = DEFAULTS["reconstruct_fraction"],
    lb_loss_weight: float = DEFAULTS["lb_loss_weight"],
    z_loss_weight: float = DEFAULTS["z_loss_weight"],
    dropout_rate: float | None = DEFAULTS["dropout_rate"],
    capacity_factor: float | None = DEFAULTS["capacity_factor"],
    clip_norm: float = DEFAULTS["clip_norm"],
    documents: Sequence[np.ndarray] | None = None,
    data_dir: str | None = None,
    stats: dict | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 500,
) -> tuple[dict, list[float]]:
    """Pretrain `SwitchTransformer(config)` from scratch with span corruption -> `(params, history)`.

    `optimizer` (`optimizers.make_optimizer`: Adafactor, T5's, by default, or AdamW; `weight_decay`
    decoupled)
    after gradient clipping at global norm `clip_norm`, with linear warmup to `learning_rate`
    over `warmup_steps` (capped at steps // 2) and cosine decay to 0 at `steps`; loss = CE (no label
    smoothing) + `lb_loss_weight` * load balance + `z_loss_weight` * router z-loss
    (`models.switch_loss`). Dropout is `dropout_rate` during pretraining (None: the config's; T5.1.1
    pretrains without) and routing uses `capacity_factor` (see `train_config`). `documents` (token
    arrays without EOS) default to the embedded corpus (`embedded_documents(tokenizer, data_dir)`).
    `history` is the loss of every step. A `stats`
    dict gets `compile_seconds` (the first step), `train_seconds` and `steps_per_second` (the rest),
    and `input_dependence` (`input_dependence` on `HEALTH_BATCHES` batches of another corruption, with
    `span_corruption_gap`: the gap on span-corruption batches alone).
    Measured cost: see the module docstring (switch-small-16: 3.4 steps/s on 2 idle CPU cores).

    `checkpoint_dir`: save the training state (params, optimizer, loss history, the batch stream's
    position) there every `checkpoint_every` steps, and continue from the newest valid one found
    there: the result is bit-identical to an uninterrupted pretraining. Inside an active
    `StopSignals` (the CLI), SIGTERM / SIGINT save at the next step and raise `RunInterrupted`.
    """
    from tqdm.auto import tqdm

    if steps < 1:
        raise ValueError(f"steps={steps}; pretrain needs at least 1 step")
    if config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"config.vocab_size={config.vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size} pieces")
    cfg = train_config(config, dropout_rate, capacity_factor)
    if documents is None:
        documents = embedded_documents(tokenizer, data_dir)
    stream = SpanCorruptionStream(
        documents, input_len, target_len, noise_density, mean_span_length,
        sentinel_start=cfg.vocab_size - 1, seed=seed, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
        unk_id=tokenizer.unk_id, reconstruct_fraction=float(reconstruct_fraction),
    )
    init_fn, opt_init_fn, step_fn = _programs(cfg, str(optimizer), float(weight_decay), float(clip_norm),
                                              float(lb_loss_weight), float(z_loss_weight))
    key = jax.random.key(seed)
    init_key, key = jax.random.split(key)
    params = init_fn(init_key, input_len, target_len)
    opt_state = opt_init_fn(params)
    lrs = learning_rate_schedule(steps, learning_rate, warmup_steps)
    history: list[float] = []
    first, stream_state, checkpointer = 0, None, None
    if checkpoint_dir is not None:
        checkpointer = RunCheckpointer(checkpoint_dir, max_to_keep=2, save_every=checkpoint_every)
        identity = dict(model=cfg.identity(), steps=steps, seed=seed, batch_size=batch_size,
                        input_len=input_len, target_len=target_len, learning_rate=learning_rate,
                        warmup_steps=warmup_steps, optimizer=optimizer, weight_decay=weight_decay,
                        noise_density=noise_density,
                        mean_span_length=mean_span_length, reconstruct_fraction=reconstruct_fraction,
                        lb_loss_weight=lb_loss_weight,
                        z_loss_weight=z_loss_weight, clip_norm=clip_norm, documents=len(documents))
        restored = checkpointer.restore_latest(abstract_like({"params": params, "opt_state": opt_state}),
                                               identity, keys=tuple(identity))
        if restored is not None:
            first, state, meta = restored
            params, opt_state = state["params"], state["opt_state"]
            history, stream_state = list(meta["history"]), meta["stream"]
            log.info("pretraining resumes at step %d of %d from %s", first, steps, checkpoint_dir)
    batches = stream.batches(batch_size, stream_state)
    pending: list[jax.Array] = []

    def flush(bar) -> None:
        if pending:
            history.extend(float(x) for x in jax.device_get(pending))
            bar.update(len(pending))
            bar.set_postfix(loss=f"{history[-1]:.3f}")
            pending.clear()

    def save(step: int, force: bool = False) -> None:
        checkpointer.save(step, {"params": params, "opt_state": opt_state},
                          {**identity, "history": history, "stream": batches.state()}, force=force)

    start = first_done = time.perf_counter()
    with tqdm(total=steps, initial=first, desc="pretrain", unit="step", disable=not progress) as bar:
        try:
            for step in range(first, steps):
                params, opt_state, metrics = step_fn(params, opt_state, next(batches),
                                                     jax.random.fold_in(key, step), lrs[step])
                pending.append(metrics["loss"])
                if step == first:
                    jax.block_until_ready(metrics["loss"])
                    first_done = time.perf_counter()
                due = checkpointer is not None and (step + 1) % checkpoint_every == 0 and step + 1 < steps
                if len(pending) == 10 or step == steps - 1 or due:
                    flush(bar)
                if due:
                    save(step + 1)
                signum = requested_stop()
                if signum is not None and step + 1 < steps:
                    flush(bar)
                    if checkpointer is not None:
                        save(step + 1, force=True)
                    raise RunInterrupted(signum, step + 1, checkpoint_dir, unit="step")
        finally:
            if checkpointer is not None:
                checkpointer.close()
    end = time.perf_counter()
    if not all(math.isfinite(x) for x in history):
        raise FloatingPointError("pretraining diverged (non-finite loss); lower learning_rate")
    if stats is not None:
        done = steps - first
        stats.update(compile_seconds=first_done - start, train_seconds=end - first_done,
                     steps_per_second=(done - 1) / (end - first_done) if done > 1 else None)
        # another packing and corruption of the corpus (seed + 1): the objective as trained, and
        # span corruption alone (the reconstruction half depends on its input by construction)
        def probe(fraction):
            it = dataclasses.replace(stream, seed=seed + 1, reconstruct_fraction=fraction).batches(batch_size)
            return input_dependence(cfg, params, [next(it) for _ in range(HEALTH_BATCHES)])

        stats["input_dependence"] = {**probe(stream.reconstruct_fraction),
                                     "span_corruption_gap": probe(0.0)["gap"]}
    return jax.device_get(params), history


def input_dependence(config: SwitchConfig, params: dict, batches: Sequence[dict[str, np.ndarray]]) -> dict:
    """How much the model's predictions use the encoder input: the span-corruption CE (no router
    losses, deterministic) of each batch with its own inputs and with every example's inputs
    replaced by the next example's (rolled by one along B) -> `{"own_ce", "other_ce", "gap"}`,
    means over `batches` (dicts of `[B, S]` / `[B, T]` arrays as `SpanCorruptionBatches` yields).

    `gap = other_ce - own_ce` (nats per target token) is ~0 when the decoder has become an
    unconditional language model of the targets: recipe 2 (AdamW 3e-3) had 0.000 after 800 steps
    and 0.02 after 20k; a model that fine-tunes to extract answers needs a clear gap.
    """
    cfg = config.replace(dropout_rate=0.0)
    model = SwitchTransformer(cfg)

    @jax.jit
    def ce(p, b, inputs, input_mask):
        out = model.apply({"params": p}, inputs, shift_right(b["targets"], cfg.decoder_start_token_id,
                          cfg.pad_token_id), input_mask, b["target_mask"], deterministic=True)
        return switch_loss(out, b["targets"], b["target_mask"], label_smoothing=0.0, lb_loss_weight=0.0,
                           z_loss_weight=0.0)[1]["ce"]

    own, other = [], []
    for b in batches:
        b = {k: jnp.asarray(v) for k, v in b.items()}
        own.append(float(ce(params, b, b["inputs"], b["input_mask"])))
        other.append(float(ce(params, b, jnp.roll(b["inputs"], 1, 0), jnp.roll(b["input_mask"], 1, 0))))
    own_ce, other_ce = float(np.mean(own)), float(np.mean(other))
    return {"own_ce": own_ce, "other_ce": other_ce, "gap": other_ce - own_ce}


# ---------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------


def _hyperparameters(steps: int, seed: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(kwargs) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"unknown pretraining argument(s) {', '.join(unknown)}; use {sorted(DEFAULTS)}")
    hp = {**DEFAULTS, **kwargs}
    for k, default in DEFAULTS.items():  # 1 and 1.0 are one key
        if hp[k] is not None and default is not None:
            hp[k] = type(default)(hp[k])
    return dict(sorted({**hp, "steps": int(steps), "seed": int(seed)}.items()))


def cache_key(config: SwitchConfig, steps: int, seed: int = 0, tokenizer=None, data_dir: str | None = None,
              **pretrain_kwargs: Any) -> dict[str, Any]:
    """Everything a cached pretrained model depends on (its SHA-256 names the entry)."""
    from fedmoe_jax.data.embedded import embedded_dir
    from fedmoe_jax.data.wordnet import MANIFEST_FILE

    if tokenizer is None:
        from fedmoe_jax.data import embedded_tokenizer

        tokenizer = embedded_tokenizer(data_dir)
    hp = _hyperparameters(steps, seed, pretrain_kwargs)
    manifest = embedded_dir(data_dir).joinpath(MANIFEST_FILE).read_bytes()
    return {
        "recipe_version": RECIPE_VERSION,
        "model": train_config(config, hp["dropout_rate"], hp["capacity_factor"]).identity(),
        "hyperparameters": hp,
        "data_manifest_sha256": hashlib.sha256(manifest).hexdigest(),
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
    }


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def entry_name(key: dict[str, Any]) -> str:
    """`d<d_model>-l<enc>x<dec>-e<experts>-v<vocab>-s<steps>-<12 hex of the key's SHA-256>`."""
    m, hp = key["model"], key["hyperparameters"]
    return (f"d{m['d_model']}-l{m['num_layers']}x{m['num_decoder_layers']}-e{m['num_experts']}-"
            f"v{m['vocab_size']}-s{hp['steps']}-{_digest(key)[:12]}")


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _locked(path: str):
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for %s (another process is building this pretrained model)", path)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load_entry(path: str, key: dict[str, Any], trained: SwitchConfig) -> tuple[dict, dict]:
    """`(params, pretrain.json)` of a complete entry; ValueError when anything does not verify."""
    from fedmoe_jax.checkpoints import load_hf_switch
    from fedmoe_jax.checkpoints.hf_switch import WEIGHTS_FILE

    try:
        with open(os.path.join(path, ENTRY_FILE)) as f:
            info = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {ENTRY_FILE}: {e}") from None
    if not isinstance(info, dict) or info.get("key") != key:
        raise ValueError(f"{ENTRY_FILE} does not hold this entry's key")
    weights = os.path.join(path, WEIGHTS_FILE)
    if not os.path.exists(weights) or _file_sha256(weights) != info.get("weights_sha256"):
        raise ValueError(f"{WEIGHTS_FILE} is missing or its SHA-256 differs from {ENTRY_FILE}")
    loaded, params = load_hf_switch(path, **{f: getattr(trained, f) for f in RUNTIME_FIELDS})
    if loaded != trained:
        diff = [f.name for f in dataclasses.fields(trained)
                if getattr(loaded, f.name) != getattr(trained, f.name)]
        raise ValueError(f"config.json differs from the requested model in {', '.join(diff)}")
    dtype = trained.jnp_param_dtype
    return jax.tree.map(lambda x: np.asarray(x, dtype), params), info


def _build_entry(path: str, key: dict[str, Any], trained: SwitchConfig, config: SwitchConfig,
                 tokenizer, data_dir, progress: bool) -> None:
    from fedmoe_jax.checkpoints import save_hf_switch
    from fedmoe_jax.checkpoints.hf_switch import WEIGHTS_FILE

    hp = key["hyperparameters"]
    kwargs = {k: hp[k] for k in DEFAULTS}
    start, stats = time.time(), {}
    parent = os.path.dirname(path)
    partial = partial_dir(path)
    params, history = pretrain(config, tokenizer, steps=hp["steps"], seed=hp["seed"], progress=progress,
                               data_dir=data_dir, stats=stats, checkpoint_dir=partial, **kwargs)
    seconds = time.time() - start
    health = stats["input_dependence"]
    if health["gap"] < MIN_INPUT_GAP:
        log.warning("pretrained %s uses its input little: span-corruption CE %.3f with its own inputs vs "
                    "%.3f with another example's (gap %.3f < %.2f nats); more steps help",
                    os.path.basename(path), health["own_ce"], health["other_ce"], health["gap"],
                    MIN_INPUT_GAP)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        # HF needs an absolute capacity; a None capacity is restored from RUNTIME_FIELDS on load.
        saved = trained if trained.expert_capacity is not None else trained.replace(
            expert_capacity=max(hp["input_len"], hp["target_len"]))
        save_hf_switch(saved, params, tmp)
        tail = history[-min(len(history), 20):]
        info = {
            "key": key,
            "entry": os.path.basename(path),
            "num_params": int(sum(np.size(x) for x in jax.tree.leaves(params))),
            "loss_history": history,
            "initial_loss": history[0],
            "final_loss": history[-1],
            "final_loss_mean20": float(np.mean(tail)),
            "seconds": round(seconds, 3),  # all of it: corpus, compilation, training
            "compile_seconds": round(stats["compile_seconds"], 3),  # the first step
            "steps_per_second": stats["steps_per_second"],  # the other steps
            "input_dependence": stats["input_dependence"],
            "device": str(jax.devices()[0].platform),
            "num_devices": jax.device_count(),
            "built_with": build_environment(),
            "weights_sha256": _file_sha256(os.path.join(tmp, WEIGHTS_FILE)),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        with open(os.path.join(tmp, ENTRY_FILE), "w") as f:
            json.dump(info, f, indent=1)
        for file in os.listdir(tmp):  # mkdtemp / safetensors make them private; the cache is shared
            os.chmod(os.path.join(tmp, file), 0o644)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(partial, ignore_errors=True)


# The vector extensions XLA:CPU's code generation depends on (a virtual CPU's name often hides them).
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "amx_tile")


def build_environment() -> dict[str, Any]:
    """What a build's last bits depend on besides its key: the CPU (name and vector extensions),
    jax/jaxlib and `XLA_FLAGS`."""
    import platform

    import jaxlib

    cpu, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        cpu, flags = info.get("model name", cpu), set(info.get("flags", "").split())
    return {"cpu": cpu, "isa": [f for f in ISA_FLAGS if f in flags], "cpu_count": os.cpu_count(),
            "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def partial_dir(path: str) -> str:
    """Where an unfinished build of the entry `path` keeps its pretraining checkpoints (resumed by
    the next build; deleted when the entry is complete)."""
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.partial")


def pretrained_entry(
    config: SwitchConfig,
    steps: int = DEFAULT_STEPS,
    cache_dir: str = DEFAULT_CACHE_DIR,
    seed: int = 0,
    progress: bool = True,
    *,
    tokenizer=None,
    data_dir: str | None = None,
    shipped_dir: str | None = SHIPPED_DIR,
    build: bool = True,
    **pretrain_kwargs: Any,
) -> tuple[dict, dict]:
    """`(params, info)`: like `pretrained_params`; `info` is the entry's `pretrain.json` plus `path`,
    `cached` (True when it was loaded without training) and `shipped` (True when it came from
    `shipped_dir`, which is looked up first; None skips it). `build=False`: `PretrainedModelMissing`
    instead of pretraining when the model is neither shipped nor cached."""
    if tokenizer is None:
        from fedmoe_jax.data import embedded_tokenizer

        tokenizer = embedded_tokenizer(data_dir)
    key = cache_key(config, steps, seed, tokenizer, data_dir, **pretrain_kwargs)
    hp = key["hyperparameters"]
    trained = train_config(config, hp["dropout_rate"], hp["capacity_factor"])
    from fedmoe_jax.checkpoints.hf_switch import config_to_hf

    config_to_hf(trained.replace(expert_capacity=trained.expert_capacity or 1))  # ValueError early
    os.makedirs(cache_dir, exist_ok=True)
    name = entry_name(key)
    if shipped_dir and os.path.isdir(os.path.join(shipped_dir, name)):
        shipped = os.path.join(shipped_dir, name)
        try:
            params, info = _load_entry(shipped, key, trained)
            return params, {**info, "path": shipped, "cached": True, "shipped": True}
        except (ValueError, OSError) as e:
            log.warning("the shipped pretrained model %s does not verify (%s; a partial checkout?): "
                        "using the cache in %s instead, whose model may differ in the last bits",
                        shipped, e, cache_dir)
    path = os.path.join(cache_dir, name)
    with _locked(os.path.join(cache_dir, name + ".lock")):
        for stale in os.listdir(cache_dir):  # left by a builder that died (we hold the lock)
            if stale.startswith(f".{name}.tmp-"):
                shutil.rmtree(os.path.join(cache_dir, stale), ignore_errors=True)
        cached = os.path.exists(path)
        if cached:
            try:
                params, info = _load_entry(path, key, trained)
            except (ValueError, OSError) as e:
                log.warning("pretrained model %s is corrupt (%s); rebuilding it", path, e)
                aside = tempfile.mkdtemp(prefix=f".{name}.corrupt-", dir=cache_dir)
                os.replace(path, os.path.join(aside, name))
                shutil.rmtree(aside, ignore_errors=True)
                cached = False
        if not cached and not build:
            raise PretrainedModelMissing(
                f"pretrained model {name} is neither shipped ({shipped_dir}) nor cached in {cache_dir}"
                f" and building it ({steps} steps) is off")
        if not cached:
            log.info("pretraining %s for %d steps (cache miss)", name, steps)
            _build_entry(path, key, trained, config, tokenizer, data_dir, progress)
            params, info = _load_entry(path, key, trained)
    return params, {**info, "path": path, "cached": cached, "shipped": False}


class PretrainedModelMissing(ValueError):
    """The pretrained model is neither shipped nor cached, and building it was not allowed."""


def pretrained_params(
    config: SwitchConfig,
    steps: int = DEFAULT_STEPS,
    cache_dir: str = DEFAULT_CACHE_DIR,
    seed: int = 0,
    progress: bool = True,
    build: bool = True,
    **pretrain_kwargs: Any,
) -> dict:
    """Params of `config` pretrained for `steps` steps: from the cache, else trained and cached.

    `pretrain_kwargs` are `pretrain`'s hyperparameters (`DEFAULTS`), plus `tokenizer` (default: the
    embedded one) and `data_dir` (the embedded benchmark's folder). The entry is
    `cache_dir/<name>-<key sha256[:12]>/` (see the module docstring); the params are NumPy arrays
    in `config.param_dtype`, shaped for `config` (its dropout rate does not enter the key when
    pretraining overrides it, the default). Safe to call from parallel processes. The config must
    be exportable to Hugging Face (top_k=1, no gated FFN, sparse steps that divide the layers).
    `build=False` raises `PretrainedModelMissing` instead of pretraining a model that is neither
    shipped nor cached (for runs that must start from known bytes).
    """
    return pretrained_entry(config, steps, cache_dir, seed, progress, build=build, **pretrain_kwargs)[0]


# ---------------------------------------------------------------------------------------------
# The CLI entry (configs/pretrain.py)
# ---------------------------------------------------------------------------------------------


def _config_error(message: str) -> Exception:
    from fedmoe_jax.errors import ConfigError

    return ConfigError(message)


def model_config(config) -> SwitchConfig:
    """The SwitchConfig of a pretrain ConfigDict: `model.name` with `model.num_experts` and
    `model.vocab_size` when not 0."""
    from fedmoe_jax.models.switch import NAMED_CONFIGS, get_config

    name = config.model.name
    if name not in NAMED_CONFIGS:
        raise _config_error(f"config.model.name={name!r} is invalid: use one of "
                            f"{', '.join(sorted(NAMED_CONFIGS))}")
    overrides = {}
    for field in ("num_experts", "vocab_size"):
        value = config.model.get(field, 0)
        if not isinstance(value, int) or value < 0:
            raise _config_error(f"config.model.{field}={value!r} is invalid: use an integer >= 0 "
                                "(0: the named config's)")
        if value:
            overrides[field] = value
    try:
        return get_config(name, **overrides)
    except ValueError as e:
        raise _config_error(f"config.model is invalid: {e}") from None


def _validate(config) -> None:
    rules = [
        ("method", config.get("method") == "pretrain", "use 'pretrain'"),
        ("steps", config.get("steps", 0) >= 1, "use >= 1"),
        ("seed", config.get("seed", 0) >= 0, "use a non-negative integer"),
        ("batch_size", config.get("batch_size", 0) >= 1, "use >= 1"),
        ("input_len", config.get("input_len", 0) >= 4, "use >= 4"),
        ("target_len", config.get("target_len", 0) >= 3, "use >= 3"),
        ("learning_rate", config.get("learning_rate", 0) > 0, "use > 0"),
        ("optimizer", config.get("optimizer", OPTIMIZERS[0]) in OPTIMIZERS, f"use one of {OPTIMIZERS}"),
        ("weight_decay", config.get("weight_decay", 0.0) >= 0, "use >= 0"),
        ("warmup_steps", config.get("warmup_steps", -1) >= 0, "use >= 0"),
        ("cache_dir", bool(config.get("cache_dir", "x")), "give a folder"),
        ("noise_density", 0 < config.get("noise_density", 0.15) < 1, "use a value in (0, 1)"),
        ("mean_span_length", config.get("mean_span_length", 3.0) >= 1, "use >= 1"),
        ("reconstruct_fraction", 0 <= config.get("reconstruct_fraction", 0.0) <= 1, "use a value in [0, 1]"),
    ]
    for key, ok, fix in rules:
        if not ok:
            raise _config_error(f"config.{key}={config.get(key)!r} is invalid: {fix}")


def _plot(path: str, history: list[float], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(np.arange(1, len(history) + 1), history, lw=0.8, alpha=0.5, label="per step")
    w = max(1, min(25, len(history) // 10))
    if len(history) >= w > 1:
        smooth = np.convolve(history, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(w, len(history) + 1) - (w - 1) / 2, smooth, lw=1.5, label=f"centred mean of {w}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (CE + router losses)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_pretrain(config, workdir: str) -> dict:
    """Pretrain (through the cache) the model of a `configs/pretrain.py` config; write the report.

    Writes `workdir/pretrain.json` (final loss, steps/s, checkpoint path, whether it came from the
    cache, the loss history) and `workdir/pretrain_loss.png`; returns the summary dict.
    """
    _validate(config)
    cfg = model_config(config)
    kwargs = {k: config[k] for k in DEFAULTS if k in config}
    os.makedirs(workdir, exist_ok=True)
    start = time.time()
    with StopSignals():  # SIGTERM / SIGINT: checkpoint the pretraining, exit; the same command resumes
        _, info = pretrained_entry(cfg, int(config.steps), config.get("cache_dir") or DEFAULT_CACHE_DIR,
                                   int(config.seed), bool(config.get("progress", True)),
                                   shipped_dir=SHIPPED_DIR if config.get("use_shipped", True) else None,
                                   **kwargs)
    history = info["loss_history"]
    summary = {
        "method": "pretrain",
        "seed": int(config.seed),
        "model": config.model.name,
        "num_experts": cfg.num_experts,
        "num_params": info["num_params"],
        "steps": int(config.steps),
        "hyperparameters": info["key"]["hyperparameters"],
        "checkpoint": os.path.abspath(info["path"]),
        "cached": info["cached"],
        "shipped": info["shipped"],
        "initial_loss": info["initial_loss"],
        "final_loss": info["final_loss"],
        "final_loss_mean20": info["final_loss_mean20"],
        "pretrain_seconds": info["seconds"],
        "compile_seconds": info.get("compile_seconds"),
        "steps_per_second": info["steps_per_second"],
        "input_dependence": info["input_dependence"],
        "wall_seconds": round(time.time() - start, 3),
        "loss_history": history,
    }
    with open(os.path.join(workdir, "pretrain.json"), "w") as f:
        json.dump(summary, f, indent=1)
    _plot(os.path.join(workdir, "pretrain_loss.png"), history,
          f"{config.model.name} ({cfg.num_experts} experts): span-corruption pretraining")
    rate, gap = summary["steps_per_second"], summary["input_dependence"]["gap"]
    source = ("shipped with the package" if info["shipped"] else "loaded from cache" if info["cached"]
              else "trained")
    print(f"pretrained {summary['model']} ({cfg.num_experts} experts, {summary['num_params']:,} params)"
          f" {source}: loss {summary['initial_loss']:.3f} -> "
          f"{summary['final_loss_mean20']:.3f} (mean of last 20 steps), "
          f"{'-' if rate is None else f'{rate:.2f}'} steps/s; input dependence {gap:.3f} nats"
          f"{'' if gap >= MIN_INPUT_GAP else ' (too little: the decoder ignores the encoder)'}; "
          f"checkpoint {summary['checkpoint']}")
    return summary
