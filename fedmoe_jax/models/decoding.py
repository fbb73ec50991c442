"""Autoregressive decoding for `SwitchTransformer`: greedy search and beam search, fully under `jit`.

Both run the encoder once, then the decoder one token per step with the key/value cache of the
decoder's self-attention (linen collection 'cache', see `switch.Attention`), inside a
`jax.lax.while_loop` that stops early once every sequence is done.

Conventions (as Hugging Face's `generate` for encoder-decoder models):
- decoding starts from `config.decoder_start_token_id`, which is *not* part of the output;
  `max_length` counts generated tokens only (HF's `max_new_tokens`), EOS included;
- a sequence ends at its first `config.eos_token_id` (kept in the output); later positions hold
  `config.pad_token_id`;
- each decoding step routes the new token on its own, so expert capacity never drops a decoder
  token (as HF's cached generation). A teacher-forced forward over more than `expert_capacity`
  decoder tokens can drop tokens and so give different logits.

Shape letters: B batch, S source (encoder) tokens, T target (generated) tokens = max_length,
V vocab, K beams, L MoE layers, E experts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedmoe_jax.models.moe import is_concrete
from fedmoe_jax.models.switch import SwitchTransformer, check_model_expert_mask

Array = jax.Array

# Hugging Face's "minus infinity" for beam scores (finite, so sums and divisions stay finite).
NEG_SCORE = -1.0e9


class DecodeOutput(NamedTuple):
    """Result of `greedy_decode` / `beam_search`.

    tokens: `<int32>[B, T]` generated tokens (no start token), pad after EOS.
    lengths: `<int32>[B]` generated tokens up to and including the first EOS (T if none).
    scores: `<f32>[B]` greedy: sum of the tokens' log-probabilities; beam search: that sum divided
      by `lengths ** length_penalty` (Hugging Face's beam score).
    """

    tokens: Array
    lengths: Array
    scores: Array


# --------------------------------------------------------------------------------------------
# Argument checks (outside jit, on concrete values where possible)
# --------------------------------------------------------------------------------------------


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _check_inputs(
    model: Any, input_ids: Any, attention_mask: Any, expert_mask: Any
) -> tuple[Array, Array, Array | None]:
    """Validate the model and inputs; return `input_ids <int32>[B, S]`, mask `<f32>[B, S]`, experts."""
    if not isinstance(model, SwitchTransformer):
        raise ValueError(f"model must be a SwitchTransformer, got {type(model).__name__}")
    cfg = model.config
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must have shape [B, S] with B, S >= 1, got {tuple(input_ids.shape)}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
    if is_concrete(input_ids):
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"input_ids must lie in [0, {cfg.vocab_size}), got values in [{lo}, {hi}]")
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.float32)
    else:
        attention_mask = jnp.asarray(attention_mask)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                f"{tuple(input_ids.shape)} like input_ids"
            )
        attention_mask = attention_mask.astype(jnp.float32)
    if expert_mask is not None:
        expert_mask = jnp.asarray(expert_mask)
        check_model_expert_mask(cfg, expert_mask)
    return input_ids.astype(jnp.int32), attention_mask, expert_mask


# --------------------------------------------------------------------------------------------
# Model calls shared by both searches (run inside jit)
# --------------------------------------------------------------------------------------------


def _encode(model, params, input_ids, attention_mask, expert_mask) -> Array:
    """Encoder states `[B, S, D]`."""
    enc, _ = model.apply({"params": params}, input_ids, attention_mask, expert_mask,
                         method=SwitchTransformer.encode)
    return enc


def _init_cache(model, params, encoder_out, attention_mask, expert_mask, max_length: int) -> Any:
    """Empty decoder cache for `encoder_out.shape[0]` rows and `max_length` positions.

    The first `decode=True` call creates the cache (its logits are unused and compiled away).
    """
    dummy = jnp.zeros((encoder_out.shape[0], max_length), jnp.int32)
    _, variables = model.apply(
        {"params": params}, dummy, encoder_out, attention_mask, expert_mask=expert_mask,
        decode=True, method=SwitchTransformer.decode, mutable=["cache"],
    )
    return variables.get("cache", {})


def _decode_step(model, params, cache, tokens, encoder_out, attention_mask, expert_mask):
    """Feed one token per row, `tokens [N]` -> (logits `<f32>[N, V]`, updated cache)."""
    (logits, _), variables = model.apply(
        {"params": params, "cache": cache}, tokens[:, None], encoder_out, attention_mask,
        expert_mask=expert_mask, decode=True, method=SwitchTransformer.decode, mutable=["cache"],
    )
    return logits[:, 0], variables.get("cache", {})


def _lengths(tokens: Array, eos_token_id: int) -> Array:
    """Generated length of each row of `tokens [B, T]`: first EOS position + 1, or T."""
    is_eos = tokens == eos_token_id
    return jnp.where(is_eos.any(-1), jnp.argmax(is_eos, axis=-1) + 1, tokens.shape[-1]).astype(jnp.int32)


# --------------------------------------------------------------------------------------------
# Greedy search
# --------------------------------------------------------------------------------------------


class _GreedyState(NamedTuple):
    step: Array  # scalar: tokens generated so far
    cache: Any
    last: Array  # [B] token to feed next
    tokens: Array  # [B, T]
    scores: Array  # [B] summed log-probs
    done: Array  # [B] bool: EOS generated


@functools.partial(jax.jit, static_argnames=("model", "max_length"))
def _greedy(model, params, input_ids, attention_mask, expert_mask, max_length):
    cfg = model.config
    batch = input_ids.shape[0]
    enc = _encode(model, params, input_ids, attention_mask, expert_mask)
    state = _GreedyState(
        step=jnp.array(0, jnp.int32),
        cache=_init_cache(model, params, enc, attention_mask, expert_mask, max_length),
        last=jnp.full((batch,), cfg.decoder_start_token_id, jnp.int32),
        tokens=jnp.full((batch, max_length), cfg.pad_token_id, jnp.int32),
        scores=jnp.zeros((batch,), jnp.float32),
        done=jnp.zeros((batch,), bool),
    )

    def not_finished(s: _GreedyState) -> Array:
        return (s.step < max_length) & ~jnp.all(s.done)

    def step(s: _GreedyState) -> _GreedyState:
        logits, cache = _decode_step(model, params, s.cache, s.last, enc, attention_mask, expert_mask)
        log_probs = jax.nn.log_softmax(logits, axis=-1)  # [B, V]
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        token = jnp.where(s.done, cfg.pad_token_id, token)
        token_log_prob = jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]
        return _GreedyState(
            step=s.step + 1,
            cache=cache,
            last=token,
            tokens=s.tokens.at[:, s.step].set(token),
            scores=s.scores + jnp.where(s.done, 0.0, token_log_prob),
            done=s.done | (token == cfg.eos_token_id),
        )

    final = jax.lax.while_loop(not_finished, step, state)
    return DecodeOutput(final.tokens, _lengths(final.tokens, cfg.eos_token_id), final.scores)


def greedy_decode(
    model: SwitchTransformer,
    params: Any,
    input_ids: Array,
    attention_mask: Array | None = None,
    max_length: int = 20,
    expert_mask: Array | None = None,
) -> DecodeOutput:
    """Greedy decoding (argmax each step) with the decoder's key/value cache.

    Args:
      model: the `SwitchTransformer`; its config gives the start, EOS and pad token ids.
      params: its parameters (`variables['params']`).
      input_ids: `<int>[B, S]` encoder tokens.
      attention_mask: `[B, S]` 1 for real encoder tokens (None: all real).
      max_length: T, the most tokens to generate per sequence (EOS included; start token excluded).
      expert_mask: `<bool>[L, E]` experts allowed in each MoE layer (encoder layers first), or None.
    Returns:
      `DecodeOutput(tokens [B, T], lengths [B], scores [B])`; scores are summed log-probabilities.
    """
    max_length = _check_positive_int(max_length, "max_length")
    input_ids, attention_mask, expert_mask = _check_inputs(model, input_ids, attention_mask, expert_mask)
    return _greedy(model, params, input_ids, attention_mask, expert_mask, max_length=max_length)


# --------------------------------------------------------------------------------------------
# Beam search (Hugging Face's vectorised `_beam_search`, early_stopping=False)
# --------------------------------------------------------------------------------------------


class _BeamState(NamedTuple):
    step: Array  # scalar: tokens generated so far
    cache: Any  # rows b * K + k
    last: Array  # [B * K] token to feed next
    running_tokens: Array  # [B, K, T] live hypotheses (no EOS)
    running_scores: Array  # [B, K] summed log-probs, best first
    finished_tokens: Array  # [B, K, T] completed hypotheses
    finished_scores: Array  # [B, K] length-penalised scores, best first
    finished: Array  # [B, K] bool: slot holds a completed hypothesis
    improvable: Array  # [B] bool: live beams may still beat the worst completed one


def _gather_beams(x: Array, index: Array) -> Array:
    """`x [B, N, ...]`, `index [B, M]` -> `x[b, index[b, m], ...]` of shape `[B, M, ...]`."""
    index = index.reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def _reorder_cache(cache: Any, rows: Array) -> Any:
    """Select cache rows (`rows [B * K]`) of every per-row leaf; scalar leaves (index) are shared."""
    return jax.tree.map(lambda x: x[rows] if x.ndim > 0 else x, cache)


@functools.partial(jax.jit, static_argnames=("model", "num_beams", "max_length"))
def _beam(model, params, input_ids, attention_mask, expert_mask, length_penalty, num_beams,
          max_length):
    cfg = model.config
    batch, k = input_ids.shape[0], num_beams
    enc = _encode(model, params, input_ids, attention_mask, expert_mask)
    enc = jnp.repeat(enc, k, axis=0)  # [B * K, S, D], row b * K + j
    enc_mask = jnp.repeat(attention_mask, k, axis=0)
    pad = jnp.full((batch, k, max_length), cfg.pad_token_id, jnp.int32)
    state = _BeamState(
        step=jnp.array(0, jnp.int32),
        cache=_init_cache(model, params, enc, enc_mask, expert_mask, max_length),
        last=jnp.full((batch * k,), cfg.decoder_start_token_id, jnp.int32),
        running_tokens=pad,
        # Only beam 0 is live at the start, so the K beams do not all pick the same tokens.
        running_scores=jnp.zeros((batch, k), jnp.float32).at[:, 1:].set(NEG_SCORE),
        finished_tokens=pad,
        finished_scores=jnp.full((batch, k), NEG_SCORE, jnp.float32),
        finished=jnp.zeros((batch, k), bool),
        improvable=jnp.ones((batch,), bool),
    )
    # 2K candidates per step, so that at least K of them do not end with EOS.
    is_top_k = jnp.arange(2 * k) < k  # [2K]

    def not_finished(s: _BeamState) -> Array:
        return (s.step < max_length) & jnp.any(s.improvable)

    def step(s: _BeamState) -> _BeamState:
        t = s.step
        logits, cache = _decode_step(model, params, s.cache, s.last, enc, enc_mask, expert_mask)
        vocab = logits.shape[-1]
        log_probs = jax.nn.log_softmax(logits, axis=-1).reshape(batch, k, vocab)
        total = (log_probs + s.running_scores[:, :, None]).reshape(batch, k * vocab)

        # Best 2K continuations over all beams.
        cand_scores, cand_index = jax.lax.top_k(total, 2 * k)  # [B, 2K]
        parent, token = cand_index // vocab, (cand_index % vocab).astype(jnp.int32)
        cand_tokens = _gather_beams(s.running_tokens, parent).at[:, :, t].set(token)  # [B, 2K, T]
        ends = (token == cfg.eos_token_id) | (t + 1 >= max_length)

        # Live beams for the next step: the best K candidates that did not end.
        live_scores = cand_scores + ends * NEG_SCORE
        keep = jax.lax.top_k(live_scores, k)[1]  # [B, K]
        running_tokens = _gather_beams(cand_tokens, keep)
        running_scores = _gather_beams(live_scores, keep)
        running_parent = _gather_beams(parent, keep)

        # Completed hypotheses: candidates among the best K that ended, length-penalised, merged
        # with the earlier ones; no more once a batch row cannot improve.
        just_finished = ends & is_top_k[None, :]
        new_scores = cand_scores / (t + 1).astype(jnp.float32) ** length_penalty
        new_scores = new_scores + (~s.improvable)[:, None] * NEG_SCORE
        new_scores = new_scores + (~just_finished) * NEG_SCORE
        merged_scores = jnp.concatenate([s.finished_scores, new_scores], axis=1)  # [B, 3K]
        best = jax.lax.top_k(merged_scores, k)[1]
        finished_tokens = _gather_beams(jnp.concatenate([s.finished_tokens, cand_tokens], 1), best)
        finished_scores = _gather_beams(merged_scores, best)
        finished = _gather_beams(jnp.concatenate([s.finished, just_finished], 1), best)

        # Can the best live beam (penalised at the current length) still beat the worst finished?
        best_live = running_scores[:, :1] / (t + 1).astype(jnp.float32) ** length_penalty
        worst_finished = jnp.where(finished, finished_scores.min(axis=1, keepdims=True), NEG_SCORE)
        improvable = s.improvable & jnp.any(best_live > worst_finished, axis=1)

        rows = (running_parent + jnp.arange(batch)[:, None] * k).reshape(batch * k)
        return _BeamState(
            step=t + 1,
            cache=_reorder_cache(cache, rows),
            last=running_tokens[:, :, t].reshape(batch * k),
            running_tokens=running_tokens,
            running_scores=running_scores,
            finished_tokens=finished_tokens,
            finished_scores=finished_scores,
            finished=finished,
            improvable=improvable,
        )

    final = jax.lax.while_loop(not_finished, step, state)
    tokens = final.finished_tokens[:, 0]
    return DecodeOutput(tokens, _lengths(tokens, cfg.eos_token_id), final.finished_scores[:, 0])


def beam_search(
    model: SwitchTransformer,
    params: Any,
    input_ids: Array,
    attention_mask: Array | None = None,
    num_beams: int = 4,
    max_length: int = 20,
    length_penalty: float = 1.0,
    expert_mask: Array | None = None,
) -> DecodeOutput:
    """Beam search with the decoder's key/value cache, as Hugging Face's (`early_stopping=False`).

    Each step keeps the 2K best continuations of the K live beams; those ending (EOS, or the T-th
    token) among the best K are completed with score `sum_log_probs / length ** length_penalty`
    (length: generated tokens incl. EOS), the best K others stay live, and the cache rows follow
    their parent beams. A batch row stops once its best live beam, penalised at the current length,
    cannot beat its worst of K completed hypotheses (HF's heuristic; exact for length_penalty <= 0).

    Args:
      model, params, input_ids `[B, S]`, attention_mask `[B, S]`, expert_mask `[L, E]`: as
        `greedy_decode`.
      num_beams: K >= 1.
      max_length: T, the most tokens to generate (EOS included; start token excluded).
      length_penalty: exponent of the length normalisation (> 0 favours longer sequences).
    Returns:
      `DecodeOutput(tokens [B, T], lengths [B], scores [B])` of the best hypothesis per row.
    """
    if not _is_finite_number(length_penalty):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}")
    return _checked_beam(model, params, input_ids, attention_mask, num_beams, max_length,
                         jnp.float32(length_penalty), expert_mask)


def _is_finite_number(value: Any) -> bool:
    number = not isinstance(value, bool) and isinstance(value, int | float | np.floating)
    return number and math.isfinite(value)


def _checked_beam(model, params, input_ids, attention_mask, num_beams, max_length, length_penalty: Array,
                  expert_mask) -> DecodeOutput:
    """`beam_search` with a (possibly traced) scalar `length_penalty`, arguments checked."""
    max_length = _check_positive_int(max_length, "max_length")
    num_beams = _check_positive_int(num_beams, "num_beams")
    input_ids, attention_mask, expert_mask = _check_inputs(model, input_ids, attention_mask, expert_mask)
    return _beam(model, params, input_ids, attention_mask, expert_mask, length_penalty, num_beams=num_beams,
                 max_length=max_length)


@dataclasses.dataclass(frozen=True)
class Decoding:
    """How evaluation generates: greedy search (`num_beams=1`, the default) or beam search of
    `num_beams` beams whose finished hypotheses are ranked by `sum_log_probs / length **
    length_penalty` (> 0 favours longer outputs; greedy search ignores it). `length_penalty` is one
    number, or one per task (a tuple indexed by the batch's task id, as T5 decodes summaries with
    its own settings). Hashable, so it keys compiled programs."""

    num_beams: int = 1
    length_penalty: float | tuple[float, ...] = 1.0

    def __post_init__(self):
        _check_positive_int(self.num_beams, "num_beams")
        penalties = self.length_penalty if isinstance(self.length_penalty, tuple) else (self.length_penalty,)
        if not penalties or not all(_is_finite_number(p) for p in penalties):
            raise ValueError(f"length_penalty must be a finite number or a tuple of them (one per task), "
                             f"got {self.length_penalty!r}")

    def __call__(self, model: SwitchTransformer, params: Any, input_ids: Array,
                 attention_mask: Array | None = None, max_length: int = 20,
                 expert_mask: Array | None = None, task: Array | None = None) -> DecodeOutput:
        """`greedy_decode` or `beam_search` of `input_ids [B, S]` (arguments as theirs); `task`: the
        batch's task id (a scalar, traced under `vmap`), needed with per-task length penalties."""
        if self.num_beams == 1:
            return greedy_decode(model, params, input_ids, attention_mask, max_length, expert_mask)
        if isinstance(self.length_penalty, tuple):
            if task is None:
                raise ValueError("per-task length penalties need the batch's task (batches with 'task')")
            penalty = jnp.asarray(self.length_penalty, jnp.float32)[task]
        else:
            penalty = jnp.float32(self.length_penalty)
        return _checked_beam(model, params, input_ids, attention_mask, self.num_beams, max_length, penalty,
                             expert_mask)
