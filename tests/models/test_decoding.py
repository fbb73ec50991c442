"""Greedy and beam search with the decoder KV cache (fedmoe_jax.models.decoding).

References: a slow uncached greedy loop, Hugging Face's `generate` on the same weights, and an
exhaustive search over every sequence of a 3-token vocabulary.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from fedmoe_jax.models.decoding import Decoding, beam_search, greedy_decode
from fedmoe_jax.models.switch import SwitchTransformer, get_config

N = 8  # generated tokens; <= expert_capacity, so a teacher-forced forward drops no decoder token


def _sharpen(params, factor: float = 3.0):
    """Scale every weight but embeddings and norms: a freshly initialised tiny model repeats one
    token forever; sharper weights give varied, context-dependent outputs."""
    flat = flatten_dict(params)
    return unflatten_dict(
        {k: v if k[-1] in ("scale", "embedding") else v * factor for k, v in flat.items()}
    )


@functools.lru_cache
def _forward(model: SwitchTransformer):
    """Jitted full (uncached) forward -> logits `[B, T, V]`."""

    def fwd(params, ids, mask, dec, dec_mask, expert_mask):
        return model.apply({"params": params}, ids, dec, mask, dec_mask, expert_mask).logits

    return jax.jit(fwd)


def reference_greedy(model, params, ids, mask, n, eos_token_id, expert_mask=None):
    """Obvious greedy: run the whole model on the prefix generated so far, take the argmax.

    The prefix is right-padded to n positions (padding masked) so that one compilation serves all
    steps; `test_padded_prefix_is_the_prefix` checks that this equals the unpadded prefix.
    Returns tokens `[B, n]` (pad after EOS) and summed log-probabilities `[B]`.
    """
    cfg = model.config
    b = ids.shape[0]
    dec = np.full((b, n), cfg.pad_token_id, np.int32)
    dec[:, 0] = cfg.decoder_start_token_id
    out = np.full((b, n), cfg.pad_token_id, np.int32)
    scores = np.zeros(b, np.float64)
    done = np.zeros(b, bool)
    for t in range(n):
        dec_mask = (np.arange(n) <= t)[None].repeat(b, 0).astype(np.float32)
        logits = np.asarray(_forward(model)(params, ids, mask, dec, dec_mask, expert_mask))[:, t]
        log_probs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
        token = np.where(done, cfg.pad_token_id, logits.argmax(-1))
        scores += np.where(done, 0.0, log_probs[np.arange(b), token])
        out[:, t] = token
        done |= token == eos_token_id
        if t + 1 < n:
            dec[:, t + 1] = token
    return out, scores


def _lengths(tokens, eos):
    return np.array([list(row).index(eos) + 1 if eos in row else len(row) for row in tokens])


@pytest.fixture(scope="module")
def tiny():
    """Sharpened random switch-tiny-4, encoder input with padding, and an EOS it actually emits."""
    cfg = get_config("switch-tiny-4")
    assert cfg.expert_capacity >= N
    base = SwitchTransformer(cfg)
    rng = np.random.default_rng(0)
    ids = rng.integers(2, cfg.vocab_size, size=(3, 9)).astype(np.int32)
    mask = np.ones_like(ids, dtype=np.float32)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    ids = (ids * mask).astype(np.int32)
    params = _sharpen(jax.jit(base.init)(jax.random.key(0), ids[:, :1], ids[:, :1])["params"])
    # EOS := the 4th token of row 0 when decoding without EOS, so row 0 stops early.
    free_run, _ = reference_greedy(base, params, ids, mask, N, eos_token_id=-1)
    eos = int(free_run[0, 3])
    model = SwitchTransformer(cfg.replace(eos_token_id=eos))
    return dict(base=base, model=model, params=params, ids=ids, mask=mask, eos=eos)


def test_padded_prefix_is_the_prefix(tiny):
    base, params, ids, mask = tiny["base"], tiny["params"], tiny["ids"], tiny["mask"]
    ref, _ = reference_greedy(base, params, ids, mask, N, eos_token_id=-1)
    t = 3
    prefix = np.concatenate([np.zeros((3, 1), np.int32), ref[:, :t]], axis=1)  # start + t tokens
    exact = jax.jit(base.apply)({"params": params}, ids, prefix, mask).logits[:, -1]
    dec = np.zeros((3, N), np.int32)
    dec[:, : t + 1] = prefix
    dec_mask = (np.arange(N) <= t)[None].repeat(3, 0).astype(np.float32)
    padded = _forward(base)(params, ids, mask, dec, dec_mask, None)[:, t]
    np.testing.assert_allclose(padded, exact, atol=1e-5)


def test_greedy_matches_uncached_reference(tiny):
    model, params, ids, mask, eos = (tiny[k] for k in ("model", "params", "ids", "mask", "eos"))
    want, want_scores = reference_greedy(tiny["base"], params, ids, mask, N, eos)
    out = greedy_decode(model, params, ids, mask, max_length=N)
    np.testing.assert_array_equal(np.asarray(out.tokens), want)
    np.testing.assert_array_equal(np.asarray(out.lengths), _lengths(want, eos))
    np.testing.assert_allclose(np.asarray(out.scores), want_scores, rtol=1e-5, atol=1e-4)
    # The EOS path is exercised: row 0 stops at its 4th token or earlier and is padded after it.
    assert out.lengths[0] <= 4
    assert np.all(np.asarray(out.tokens)[0, int(out.lengths[0]):] == model.config.pad_token_id)
    assert len(set(want[0].tolist())) > 1  # not a degenerate constant output


def test_greedy_with_expert_mask_matches_uncached_reference(tiny):
    model, params, ids, mask, eos = (tiny[k] for k in ("model", "params", "ids", "mask", "eos"))
    cfg = model.config
    assert cfg.num_moe_layers == 2 and cfg.num_experts == 4
    expert_mask = np.array([[True, False, False, True], [False, False, True, False]])
    want, want_scores = reference_greedy(tiny["base"], params, ids, mask, N, eos, expert_mask)
    unmasked, _ = reference_greedy(tiny["base"], params, ids, mask, N, eos)
    assert not np.array_equal(want, unmasked), "the expert mask should change the output"
    out = greedy_decode(model, params, ids, mask, max_length=N, expert_mask=jnp.asarray(expert_mask))
    np.testing.assert_array_equal(np.asarray(out.tokens), want)
    np.testing.assert_allclose(np.asarray(out.scores), want_scores, rtol=1e-5, atol=1e-4)


def test_single_beam_without_length_penalty_is_greedy(tiny):
    model, params, ids, mask = (tiny[k] for k in ("model", "params", "ids", "mask"))
    greedy = greedy_decode(model, params, ids, mask, max_length=N)
    beam = beam_search(model, params, ids, mask, num_beams=1, max_length=N, length_penalty=0.0)
    np.testing.assert_array_equal(np.asarray(beam.tokens), np.asarray(greedy.tokens))
    np.testing.assert_array_equal(np.asarray(beam.lengths), np.asarray(greedy.lengths))
    np.testing.assert_allclose(np.asarray(beam.scores), np.asarray(greedy.scores), atol=1e-5)


def test_decoding_is_greedy_or_beam_search(tiny):
    """`Decoding` (what evaluation is configured with) calls greedy search for one beam, else beam
    search with its length penalty; bad settings fail when it is made, not inside a program."""
    model, params, ids, mask = (tiny[k] for k in ("model", "params", "ids", "mask"))
    greedy = greedy_decode(model, params, ids, mask, max_length=N)
    np.testing.assert_array_equal(np.asarray(Decoding()(model, params, ids, mask, N).tokens),
                                  np.asarray(greedy.tokens))
    for beams, penalty in ((2, 0.0), (3, 2.0)):
        want = beam_search(model, params, ids, mask, num_beams=beams, max_length=N, length_penalty=penalty)
        got = Decoding(beams, penalty)(model, params, ids, mask, N)
        np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
        np.testing.assert_allclose(np.asarray(got.scores), np.asarray(want.scores))
    per_task = Decoding(2, (0.0, 2.0))  # a penalty per task id, picked by the batch's task
    for task, penalty in ((0, 0.0), (1, 2.0)):
        want = beam_search(model, params, ids, mask, num_beams=2, max_length=N, length_penalty=penalty)
        got = per_task(model, params, ids, mask, N, task=jnp.int32(task))
        np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    with pytest.raises(ValueError, match="need the batch's task"):
        per_task(model, params, ids, mask, N)
    assert Decoding(3, 2.0) == Decoding(3, 2.0) and hash(Decoding(3, 2.0)) == hash(Decoding(3, 2.0))
    for kwargs, match in ((dict(num_beams=0), "num_beams"), (dict(num_beams=True), "num_beams"),
                          (dict(length_penalty=float("inf")), "length_penalty"),
                          (dict(length_penalty=(1.0, float("nan"))), "length_penalty"),
                          (dict(length_penalty=()), "length_penalty")):
        with pytest.raises(ValueError, match=match):
            Decoding(**kwargs)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_beam_search_is_exhaustive_when_beams_cover_all_sequences(length_penalty):
    """V=3, T=4, K=81=V**T: every hypothesis survives, so beam search must return the best of all
    sequences (HF semantics: a sequence ends at its first EOS or after T tokens)."""
    vocab, t_max, beams = 3, 4, 81
    # Untied output layer: with tied embeddings a tiny random model mostly repeats its input token.
    cfg = get_config("switch-tiny-4", vocab_size=vocab, tie_word_embeddings=False)
    model = SwitchTransformer(cfg)
    ids = np.array([[2, 1, 2, 2, 0], [1, 2, 0, 0, 0]], np.int32)
    mask = (np.arange(5)[None] < np.array([[4], [2]])).astype(np.float32)
    params = jax.jit(model.init)(jax.random.key(0), ids[:, :1], ids[:, :1])["params"]
    got = beam_search(model, params, ids, mask, num_beams=beams, max_length=t_max,
                      length_penalty=length_penalty)

    seqs = np.array(list(itertools.product(range(vocab), repeat=t_max)), np.int32)  # [V**T, T]
    dec = np.concatenate([np.full((len(seqs), 1), cfg.decoder_start_token_id, np.int32),
                          seqs[:, :-1]], axis=1)
    best_seqs = []
    for b in range(2):
        enc_ids, enc_mask = (np.repeat(x[b:b + 1], len(seqs), axis=0) for x in (ids, mask))
        logits = _forward(model)(params, enc_ids, enc_mask, dec, np.ones(dec.shape, np.float32), None)
        log_probs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
        token_lp = np.take_along_axis(log_probs, seqs[..., None], axis=-1)[..., 0]  # [V**T, T]
        best: dict[tuple[int, ...], float] = {}
        for seq, lp in zip(seqs.tolist(), token_lp):
            n = seq.index(cfg.eos_token_id) + 1 if cfg.eos_token_id in seq else t_max
            best[tuple(seq[:n])] = float(lp[:n].sum()) / n**length_penalty
        ranked = sorted(best.items(), key=lambda kv: -kv[1])
        (want_seq, want_score), (_, second) = ranked[0], ranked[1]
        assert want_score - second > 1e-4, "reference has a near tie; pick other inputs"
        n = int(got.lengths[b])
        assert tuple(np.asarray(got.tokens)[b, :n].tolist()) == want_seq
        assert np.all(np.asarray(got.tokens)[b, n:] == cfg.pad_token_id)
        np.testing.assert_allclose(float(got.scores[b]), want_score, rtol=1e-5, atol=1e-5)
        best_seqs.append(want_seq)
    # Some best sequence runs to T tokens, so later steps (and the cache reordering) matter.
    assert max(len(seq) for seq in best_seqs) == t_max


def test_matches_hugging_face_generate(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from fedmoe_jax.checkpoints.hf_switch import load_hf_switch

    torch.manual_seed(0)
    hf_cfg = transformers.SwitchTransformersConfig(
        vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_heads=2, num_layers=2,
        num_decoder_layers=2, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
        num_experts=4, expert_capacity=8, relative_attention_num_buckets=8,
        relative_attention_max_distance=16, dropout_rate=0.0, router_jitter_noise=0.0,
    )
    hf = transformers.SwitchTransformersForConditionalGeneration(hf_cfg).eval()
    with torch.no_grad():  # a fresh tiny model repeats one token; random N(0, 1) weights do not
        for name, p in hf.named_parameters():
            if "layer_norm" not in name:
                p.normal_(0.0, 1.0)
    hf.save_pretrained(tmp_path)

    rng = np.random.default_rng(0)
    ids = rng.integers(2, 32, size=(4, 7))
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    mask[3, 3:] = 0
    ids = ids * mask

    def generate(eos, **kw):
        with torch.no_grad():
            return hf.generate(
                torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                max_new_tokens=N, decoder_start_token_id=0, pad_token_id=0, eos_token_id=eos,
                **kw,
            )

    # EOS := the token HF's greedy search emits most often, so that some sequences stop early.
    free_run = generate(1, num_beams=1).numpy()[:, 1:]
    eos = int(np.bincount(free_run.ravel()).argmax())
    config, params = load_hf_switch(tmp_path, eos_token_id=eos)
    model = SwitchTransformer(config)

    want = generate(eos, num_beams=1).numpy()[:, 1:]  # drop HF's decoder start token
    got = greedy_decode(model, params, ids, mask, max_length=N)
    tokens = np.asarray(got.tokens)
    np.testing.assert_array_equal(tokens[:, : want.shape[1]], want)
    assert np.all(tokens[:, want.shape[1]:] == 0)
    assert int(got.lengths.min()) < N, "no row stopped at EOS; the EOS path is untested"

    beam_lengths = []
    for length_penalty in (1.0, 0.0):
        ref = generate(eos, num_beams=3, length_penalty=length_penalty, early_stopping=False,
                       output_scores=True, return_dict_in_generate=True)
        want = ref.sequences.numpy()[:, 1:]
        got = beam_search(model, params, ids, mask, num_beams=3, max_length=N,
                          length_penalty=length_penalty)
        lengths = np.asarray(got.lengths)
        # HF fills after EOS with EOS when pad_token_id == 0; compare each sequence to its end.
        np.testing.assert_array_equal(lengths, _lengths(want, eos))
        for b, n in enumerate(lengths):
            np.testing.assert_array_equal(np.asarray(got.tokens)[b, :n], want[b, :n])
        np.testing.assert_allclose(np.asarray(got.scores), ref.sequences_scores.numpy(), atol=1e-4)
        beam_lengths.append(lengths)
    assert int(np.min(beam_lengths)) < N


def test_bad_arguments_raise(tiny):
    model, params, ids, mask = (tiny[k] for k in ("model", "params", "ids", "mask"))
    cases = [
        (greedy_decode, dict(input_ids=ids, max_length=0), "max_length"),
        (greedy_decode, dict(input_ids=ids, max_length=2.5), "max_length"),
        (beam_search, dict(input_ids=ids, num_beams=0), "num_beams"),
        (beam_search, dict(input_ids=ids, length_penalty=float("nan")), "length_penalty"),
        (greedy_decode, dict(input_ids=ids[0]), r"\[B, S\]"),
        (greedy_decode, dict(input_ids=ids.astype(np.float32)), "integer"),
        (greedy_decode, dict(input_ids=ids + 1000), r"\[0, 128\)"),
        (beam_search, dict(input_ids=ids, attention_mask=mask[:, :4]), "attention_mask"),
        (greedy_decode, dict(input_ids=ids, expert_mask=np.ones((3, 4), bool)), "expert_mask"),
        (greedy_decode, dict(input_ids=ids, expert_mask=np.ones((2, 4), np.int32)), "boolean"),
        (greedy_decode, dict(input_ids=ids, expert_mask=np.array([[True] * 4, [False] * 4])),
         "top_k"),
    ]
    for fn, kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            fn(model, params, **kwargs)
    with pytest.raises(ValueError, match="SwitchTransformer"):
        greedy_decode(object(), params, ids)


def test_cache_holds_self_and_cross_attention_keys(tiny):
    from fedmoe_jax.models.decoding import _encode, _init_cache

    model, params, ids, mask = tiny["model"], tiny["params"], tiny["ids"], tiny["mask"]
    enc = _encode(model, params, jnp.asarray(ids), jnp.asarray(mask), None)
    cache = flatten_dict(_init_cache(model, params, enc, jnp.asarray(mask), None, N))
    n_blocks = model.config.num_decoder_layers
    for i in range(n_blocks):
        block = ("decoder", f"block_{i}")
        assert cache[block + ("attention", "cached_key")].shape == (3, N, 4, 8)
        # encoder keys/values are computed once, when the cache is created
        cross = cache[block + ("cross_attention", "cross_key")]
        assert cross.shape == (3, ids.shape[1], 4, 8)
        assert np.any(np.asarray(cross) != 0.0)
