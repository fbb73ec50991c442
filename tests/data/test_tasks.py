"""Task containers and metrics, against hand-computed values."""

import numpy as np
import pytest

from fedmoe_jax.data.tasks import (
    PRIMARY_METRIC,
    TASKS,
    TaskData,
    accuracy,
    normalize_answer,
    rc_prompt,
    rouge_scores,
    squad_f1,
    squad_scores,
    task_scores,
)


def test_accuracy_is_exact_label_match():
    preds = ["World", " Sports ", "Sci/Tech"]
    refs = [["World"], ["Sports"], ["Business"]]
    assert accuracy(preds, refs) == pytest.approx(200.0 / 3)


def test_squad_normalisation_and_f1_by_hand():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert normalize_answer("an apple a day") == "apple day"
    # pred [cat, sat, on, mat], ref [cat, on, mat]: overlap 3, P = 3/4, R = 1 -> F1 = 6/7
    assert squad_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    assert squad_f1("nothing", "in common") == 0.0


def test_squad_scores_take_the_best_reference():
    preds = ["Denver Broncos", "Broncos"]
    refs = [["The Broncos", "Denver Broncos"], ["Denver Broncos"]]
    # ex 1: exact; ex 2: EM 0, F1 = 2 * 1 * 0.5 / 1.5 = 2/3
    scores = squad_scores(preds, refs)
    assert scores["exact_match"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)


def test_rouge_by_hand():
    # bigrams: pred {the cat, cat sat, sat on, on the, the mat}, ref {the cat, cat was, was on, on the,
    # the mat}: 3 shared of 5 -> 60; unigrams 5 of 6 -> 83.3; LCS "the cat on the mat" 5 of 6 -> 83.3
    scores = rouge_scores(["the cat sat on the mat"], [["the cat was on the mat"]])
    assert scores["rouge2"] == pytest.approx(60.0)
    assert scores["rouge1"] == pytest.approx(500 / 6)
    assert scores["rougeL"] == pytest.approx(500 / 6)
    # max over references
    best = rouge_scores(["the cat sat on the mat"], [["a dog", "the cat sat on the mat"]])
    assert best["rouge2"] == pytest.approx(100.0)


def test_task_scores_dispatch_and_primary_metric():
    for task in TASKS:
        scores = task_scores(task, ["a b c"], [["a b c"]])
        assert scores[PRIMARY_METRIC[task]] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="unknown task"):
        task_scores("qa", ["x"], [["x"]])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        accuracy(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="list of reference strings"):
        squad_scores(["a"], ["a"])


def test_task_data_validation_and_take():
    data = TaskData("rc", [rc_prompt("q1", "c1"), rc_prompt("q2", "c2")], ["a1", "a2"], [0, 1],
                    ("x", "y"), [["a1", "b1"], ["a2"]])
    assert data.inputs[0] == "question: q1 context: c1"
    sub = data.take([1])
    assert sub.targets == ["a2"] and sub.references == [["a2"]] and sub.labels.tolist() == [1]
    assert len(data) == 2 and data.num_labels == 2
    assert TaskData("ts", ["x"], ["y"], [0]).references == [["y"]]
    with pytest.raises(ValueError, match="one entry per example"):
        TaskData("tc", ["x", "y"], ["a"], [0, 0])
    with pytest.raises(ValueError, match="labels outside"):
        TaskData("tc", ["x"], ["a"], np.array([3]), ("a", "b"))
    with pytest.raises(ValueError, match="unknown task"):
        TaskData("mt", ["x"], ["a"], [0])
