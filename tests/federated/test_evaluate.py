"""`score_predictions`: per-client task scores from predicted tokens, and the kept examples."""

import numpy as np
import pytest

from fedmoe_jax.federated.evaluate import score_predictions


class DigitTokenizer:
    """Token t > 0 decodes to the digit string of t; 0 is padding."""

    def decode(self, rows):
        return [" ".join(str(int(t)) for t in row if t > 0) for row in np.asarray(rows)]


def test_scores_and_kept_examples_by_hand():
    # C=2 clients, K=1 step, B=3 rows, T=2 tokens; client 0 (tc) has ids 4, 9 and a padding row
    tokens = np.array([[[[1, 0], [2, 0], [7, 7]]], [[[3, 5], [0, 0], [0, 0]]]])
    ids = np.array([[[4, 9, -1]], [[2, -1, -1]]])
    tc_refs = {4: ["1"], 9: ["3"]}
    ts_refs = {2: ["3 5"]}
    refs = [lambda i: [tc_refs[int(k)] for k in i], lambda i: [ts_refs[int(k)] for k in i]]
    results = score_predictions(DigitTokenizer(), tokens, ids, ["tc", "ts"], refs, keep=1)
    # percent: "1" right, "2" wrong; the padding row ignored
    assert results[0]["score"] == pytest.approx(50.0)
    assert results[0]["examples"] in ([{"id": 4, "prediction": "1", "references": ["1"]}],
                                      [{"id": 9, "prediction": "2", "references": ["3"]}])  # one at random
    assert results[1]["examples"] == [{"id": 2, "prediction": "3 5", "references": ["3 5"]}]
    assert results[1]["score"] == pytest.approx(100.0)  # ROUGE-2 of an exact bigram match
    plain = score_predictions(DigitTokenizer(), tokens, ids, ["tc", "ts"], refs)
    assert "examples" not in plain[0] and plain[0]["score"] == results[0]["score"]


def test_kept_examples_are_a_seeded_random_sample_per_client():
    # C=2 clients, K=2 steps, B=10 rows: 20 test examples each (ids 0..19, client 1 with 5 padding rows)
    ids = np.arange(40).reshape(2, 2, 10) % 20
    ids[1, 1, 5:] = -1
    refs = [lambda i: [[str(int(k) + 1)] for k in i]] * 2

    def kept(seed, clients=(3, 5), keep=4, ids=ids):
        tokens = (ids + 1)[..., None]  # example i predicts "i+1"
        results = score_predictions(DigitTokenizer(), tokens, ids, ["tc", "tc"], refs, keep,
                                    clients=clients, seed=seed)
        for res in results:  # predictions and references stay with their example
            assert all(ex["prediction"] == str(ex["id"] + 1) == ex["references"][0] for ex in res["examples"])
        return [[ex["id"] for ex in res["examples"]] for res in results]

    first = kept(0)
    for c, sample in enumerate(first):
        real = set(ids[c][ids[c] >= 0].tolist())
        assert len(sample) == 4 and set(sample) <= real and sample == sorted(sample)
        assert sample != sorted(real)[:4]  # not simply the first ones
    assert kept(0) == first  # reproducible
    assert kept(1) != first  # another seed, another sample
    assert kept(0, clients=(5, 3), ids=ids[::-1]) == first[::-1]  # fixed by the client id, not its place
    assert kept(0, keep=50)[1] == list(range(15))  # keep >= examples: all of them, in id order
