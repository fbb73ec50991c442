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
    assert results[0]["examples"] == [{"id": 4, "prediction": "1", "references": ["1"]}]
    assert results[1]["examples"] == [{"id": 2, "prediction": "3 5", "references": ["3 5"]}]
    assert results[1]["score"] == pytest.approx(100.0)  # ROUGE-2 of an exact bigram match
    plain = score_predictions(DigitTokenizer(), tokens, ids, ["tc", "ts"], refs)
    assert "examples" not in plain[0] and plain[0]["score"] == results[0]["score"]
