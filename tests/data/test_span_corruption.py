"""Span corruption (hand-checked against T5's recipe), the corpus and the packed, resumable stream."""

import json

import numpy as np
import pytest

from fedmoe_jax.data import span_corruption as sc

EOS = 1
S = 99  # sentinel_start in the hand-made cases


class FixedChoice:
    """An rng whose `choice` returns the given cut positions (0-based, before the +1) in call order."""

    def __init__(self, *draws):
        self.draws = list(draws)

    def choice(self, n, k, replace=False):
        out = np.asarray(self.draws.pop(0))
        assert out.shape == (k,) and not replace and (out < n).all()
        return out


def reconstruct(inputs, targets, floor):
    """Merge targets back into inputs: every sentinel (id >= floor) of the inputs -> its span."""
    assert inputs[-1] == EOS and targets[-1] == EOS
    spans, current = {}, None
    for t in targets[:-1].tolist():
        if t >= floor:
            current = t
            spans[current] = []
        else:
            spans[current].append(t)
    out = []
    for t in inputs[:-1].tolist():
        out.extend(spans.pop(t) if t >= floor else [t])
    assert not spans  # every target span was used
    return np.array(out)


def test_span_corruption_hand_computed_two_spans():
    # 10 tokens, density 0.4 -> 4 noise tokens; mean span 2 -> 2 spans. Noise 4 = 1 + 3 (cut after 1),
    # kept 6 = 2 + 4 (cut after 2), interleaved kept first: K K N K K K K N N N.
    tokens = np.arange(5, 15)
    inputs, targets = sc.span_corruption(tokens, 0.4, 2.0, rng=FixedChoice([0], [1]), sentinel_start=S)
    assert inputs.tolist() == [5, 6, S, 8, 9, 10, 11, S - 1, EOS]
    assert targets.tolist() == [S, 7, S - 1, 12, 13, 14, EOS]
    assert inputs.dtype == targets.dtype == np.int32


def test_span_corruption_hand_computed_one_span():
    # 20 tokens at T5's 0.15 / 3: round(3.0) = 3 noise tokens in round(1.0) = 1 span, which T5's recipe
    # places at the end (kept span first): whatever the rng.
    for seed in range(3):
        inputs, targets = sc.span_corruption(np.arange(10, 30), rng=np.random.default_rng(seed),
                                             sentinel_start=S)
        assert inputs.tolist() == list(range(10, 27)) + [S, EOS]
        assert targets.tolist() == [S, 27, 28, 29, EOS]


def test_noise_span_counts_follow_t5_rounding():
    assert sc.noise_span_counts(70) == (10, 3)  # round(10.5) = 10 (half to even, like tf.round)
    assert sc.noise_span_counts(71) == (11, 4)
    assert sc.noise_span_counts(3) == (1, 1)  # at least one noise token and one span
    assert sc.noise_span_counts(2, 0.9) == (1, 1)  # at most length - 1 noise tokens
    assert sc.noise_span_counts(1) == (0, 0) and sc.noise_span_counts(50, 0.0) == (0, 0)
    assert sc.chunk_length(64, 16) == 70 and sc.corrupted_lengths(70) == (64, 14)
    assert sc.corrupted_lengths(71)[0] == 65  # one more token would not fit


@pytest.mark.parametrize("density,mean", [(0.15, 3.0), (0.3, 2.0), (0.5, 1.0), (0.15, 8.0)])
def test_span_corruption_properties(density, mean):
    rng = np.random.default_rng(0)
    floor = 1000
    for length in list(range(0, 40)) + [64, 70, 129, 500]:
        tokens = rng.integers(3, floor, length)
        noise, spans = sc.noise_span_counts(length, density, mean)
        inputs, targets = sc.span_corruption(tokens, density, mean, rng=np.random.default_rng(length),
                                             sentinel_start=2000)
        assert (inputs.size, targets.size) == sc.corrupted_lengths(length, density, mean)
        in_sent, tgt_sent = inputs[inputs >= floor], targets[targets >= floor]
        assert in_sent.size == tgt_sent.size == spans
        assert in_sent.tolist() == tgt_sent.tolist() == list(range(2000, 2000 - spans, -1))
        assert targets.size - 1 - spans == noise  # noise fraction = round(length * density)
        assert inputs[-1] == targets[-1] == EOS and (inputs == EOS).sum() == (targets == EOS).sum() == 1
        np.testing.assert_array_equal(reconstruct(inputs, targets, floor), tokens)
        if spans:
            assert inputs[0] < floor  # T5 starts with a kept span and ends with a noise span
            assert inputs[-2] >= floor
        again = sc.span_corruption(tokens, density, mean, rng=np.random.default_rng(length),
                                   sentinel_start=2000)
        np.testing.assert_array_equal(again[0], inputs)
        np.testing.assert_array_equal(again[1], targets)


def test_span_corruption_depends_on_rng():
    tokens = np.arange(3, 203)
    outs = {tuple(sc.span_corruption(tokens, rng=np.random.default_rng(s), sentinel_start=999)[0])
            for s in range(5)}
    assert len(outs) == 5


def test_span_lengths_are_random_partitions():
    # Mean span length and noise fraction over many draws: noise 30 of 200 in 10 spans (mean 3).
    rng = np.random.default_rng(1)
    lengths = []
    for _ in range(300):
        mask = sc.random_spans_noise_mask(200, rng=rng)
        assert mask.sum() == 30 and not mask[0] and mask[-1]
        edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
        runs = edges[1::2] - edges[::2]
        assert runs.size == 10
        lengths.extend(runs.tolist())
    assert np.mean(lengths) == 3.0 and max(lengths) > 6  # not all equal: random compositions


def test_stream_packs_deterministically_and_reserves_sentinels():
    docs = [np.arange(3, 3 + n, dtype=np.int32) for n in range(5, 60)]
    docs[3] = np.array([4095, 4094, 7, 8, 4093, 4092], np.int32)  # ids in / next to the sentinel range
    stream = sc.SpanCorruptionStream(docs, input_len=64, target_len=16, seed=3)
    assert stream.length == 70 and stream.num_sentinels == 3
    a = [next(it) for it in [stream.batches(8)] for _ in range(30)]
    b = [next(it) for it in [stream.batches(8)] for _ in range(30)]
    c = next(sc.SpanCorruptionStream(docs, seed=4).batches(8))
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert not np.array_equal(a[0]["inputs"], c["inputs"])
    batch = a[0]
    assert batch["inputs"].shape == (8, 64) and batch["targets"].shape == (8, 16)
    assert (batch["input_mask"].sum(1) == 64).all() and (batch["target_mask"].sum(1) == 14).all()
    assert (batch["targets"][:, 14:] == 0).all()
    seen = []
    for batch in a:
        for inp, tgt in zip(batch["inputs"], batch["targets"][:, :14]):
            assert (inp >= 4093).sum() == 3 and (tgt >= 4093).sum() == 3  # only sentinels up there
            seen.append(reconstruct(inp, tgt, 4093))
    flat = np.concatenate(seen)
    assert 4092 in flat and 2 in flat  # 4092 is not reserved; 4095..4093 became <unk> (2)
    # The first epoch is the documents in one seeded order, cut into 70-token chunks.
    total = sum(d.size for d in docs)
    order = np.random.default_rng([3, 0]).permutation(len(docs))
    expected = np.concatenate([docs[i] for i in order])[: 70 * (total // 70)].reshape(-1, 70)
    expected = np.where(expected >= 4093, 2, expected)
    np.testing.assert_array_equal(np.stack(seen[: len(expected)]), expected)


def test_reconstruction_targets_are_the_chunk_start_uncorrupted():
    """reconstruct_fraction=1: inputs span-corrupted as before, every target the chunk's first 15
    tokens + EOS; 0.5: about half of them, the rest span-corruption targets (with sentinels)."""
    docs = [np.arange(3, 3 + n, dtype=np.int32) for n in range(5, 60)]
    plain = next(sc.SpanCorruptionStream(docs, seed=3).batches(8))
    it = sc.SpanCorruptionStream(docs, seed=3, reconstruct_fraction=1.0).batches(8)
    batch = next(it)
    np.testing.assert_array_equal(batch["inputs"][0], plain["inputs"][0])  # same corruption draw
    for i in range(8):
        assert (batch["inputs"][i] >= 4093).sum() == 3  # still corrupted: 3 sentinels
        np.testing.assert_array_equal(batch["targets"][i], np.append(it.chunks[i][:15], EOS))
        assert batch["target_mask"][i].sum() == 16
    mixed = [next(it) for it in [sc.SpanCorruptionStream(docs, seed=3, reconstruct_fraction=0.5).batches(8)]
             for _ in range(8)]
    whole = np.array([(b["targets"] < 4093).all(1) for b in mixed]).ravel()  # no sentinel: reconstructed
    assert 0.3 < whole.mean() < 0.7


def test_stream_state_resumes_exactly():
    docs = [np.arange(3, 3 + n, dtype=np.int32) for n in range(5, 60)]
    stream = sc.SpanCorruptionStream(docs, seed=3)
    straight = stream.batches(8)
    expected = [next(straight) for _ in range(25)]  # 200 chunks: past the first epoch (~22 chunks)
    it = stream.batches(8)
    for _ in range(11):
        next(it)
    state = json.loads(json.dumps(it.state()))  # it goes through checkpoint metadata as JSON
    assert state["epoch"] > 1
    resumed = stream.batches(8, state)
    for want in expected[11:]:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_corpus_is_train_texts_only():
    from fedmoe_jax.data import load_embedded_benchmark

    ordered = sc.corpus_texts()
    texts = set(ordered)
    assert len(ordered) == len(texts)  # unique
    bench = load_embedded_benchmark()
    train = {t for task in bench.values() for t in [*task["train"].inputs, *task["train"].targets]}
    assert texts == train
    # WordNet repeats some texts across synsets (so across splits); those only held out must not leak.
    held_out = {t for task in bench.values() for s in ("validation", "test")
                for t in [*task[s].inputs, *task[s].targets]} - train
    assert len(held_out) > 10000 and not texts & held_out
