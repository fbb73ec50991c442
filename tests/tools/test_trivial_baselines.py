"""Trivial baselines: each on hand-made data where its answer is known, and the CLI end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fedmoe_jax.data.tasks import TaskData, rc_prompt, tc_prompt, ts_prompt
from fedmoe_jax.tools import baselines as b

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tc(texts, labels):
    names = sorted(set(labels))
    return TaskData("tc", [tc_prompt(t) for t in texts], list(labels), [names.index(x) for x in labels],
                    tuple(names))


def test_majority_and_naive_bayes_by_hand():
    train = tc(["cat dog", "dog fur", "cat paw", "stock bond", "bond yield"],
               ["animal", "animal", "animal", "money", "money"])
    test = tc(["dog paw", "stock yield", "cat"], ["animal", "money", "animal"])
    assert b.majority(train, test) == {"accuracy": pytest.approx(200 / 3), "setting": "animal"}
    # every test word appears under one class only: naive Bayes gets all three right at any alpha
    nb = b.naive_bayes(train, test, test)
    assert nb["accuracy"] == 100.0 and nb["setting"] in b.NB_ALPHAS


def test_rarest_context_word_by_hand():
    def rc(q, c, a):
        return TaskData("rc", [rc_prompt(q, c)], [a], [0], ("x",))

    train = TaskData("rc", [rc_prompt("q", "the cat sat"), rc_prompt("q", "the dog sat"),
                            rc_prompt("q", "the cat ran")], ["cat", "dog", "cat"], [0, 0, 0], ("x",))
    # document frequencies: the 3, cat 2, sat 2, dog 1, ran 1, zebra 0 -> zebra (not in the question)
    assert b.rarest_context_word(train, rc("what sat", "the zebra sat", "zebra"))["f1"] == 100.0
    # "dog" (1) is rarer than "cat" (2) but is in the question: cat
    assert b.rarest_context_word(train, rc("dog", "the dog cat", "cat"))["exact_match"] == 100.0


def test_lead_and_constant_by_hand():
    docs = ["alpha beta gamma delta epsilon", "one two three four five"]
    ts = TaskData("ts", [ts_prompt(d) for d in docs], ["alpha beta gamma", "one two three"], [0, 1],
                  ("a", "b"))
    out = b.lead(ts, ts)
    assert out["setting"] == 3 and out["rouge2"] == pytest.approx(100.0)  # the targets are the lead-3
    train = TaskData("ts", ["summarize: x"] * 3,
                     ["of or relating to x", "of or relating to y", "a kind of z"], [0, 0, 1], ("a", "b"))
    test = TaskData("ts", ["summarize: w", "summarize: v"], ["of or relating to w", "a kind of v"], [0, 1],
                    ("a", "b"))
    got = b.constant(train, test, test)
    # K = 4: "of or relating to" vs "of or relating to w": bigrams 3 of 3 predicted, 3 of 4 in the
    # reference, F = 6/7; "a kind of z" vs "a kind of v": 2 of 3 both ways, F = 2/3. K = 3 gives
    # (2/3 + 4/5) / 2 = 0.733 and K = 6 (whole targets) (3/4 + 2/3) / 2 = 0.708: K = 4 wins
    assert got["setting"] == 4 and got["rouge2"] == pytest.approx(100 * (6 / 7 + 2 / 3) / 2)


def test_cli_writes_json_and_markdown_on_a_config(tmp_path):
    res = subprocess.run([sys.executable, "experiments/baselines.py", "--config=configs/tiny.py",
                          f"--out={tmp_path}"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads((tmp_path / "baselines.json").read_text())
    assert set(result["baselines"]) == {"tc", "rc", "ts"}
    assert set(result["baselines"]["tc"]) == {"majority", "naive_bayes"}
    assert all(np.isfinite(v["accuracy"]) for v in result["baselines"]["tc"].values())
    assert "| rc | rarest_context_word | f1 |" in (tmp_path / "baselines.md").read_text()
    bad = subprocess.run([sys.executable, "experiments/baselines.py", "--config=configs/nowhere.py",
                          f"--out={tmp_path / 'bad'}"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "not found" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


class Partition:
    """A hand-made partition: `train` / `test` map each client of each task to its example indices."""

    def __init__(self, task, train, test):
        self.task, self.train, self.test = task, train, test

    def clients_of(self, task):
        return np.array(sorted(self.train)) if task == self.task else np.array([], np.int64)

    def client_indices(self, client, split="train"):
        return np.array((self.train if split == "train" else self.test)[client], np.int64)


def test_label_skew_by_hand():
    """Two TC clients, each holding one class: client entropy 0 against the task's ln 2."""
    train = tc(["a", "b", "c", "d"], ["x", "x", "y", "y"])
    test = tc(["e", "f", "g"], ["x", "y", "x"])
    skew = b.label_skew({"tc": {"train": train, "test": test}},
                        Partition("tc", {0: [0, 1], 1: [2, 3]}, {0: [0, 2], 1: [1]}))["tc"]
    assert skew == {"labels": 2, "task_entropy": pytest.approx(np.log(2)), "client_entropy": 0.0}


def test_client_baselines_score_each_client_on_its_own_examples_by_hand():
    """Client 0 trained on three x examples, client 1 on two y; every test word is unseen, so naive
    Bayes answers by its prior alone. The pooled prior (x 3/5) says x everywhere: client 0 (one x) 100,
    client 1 (two y) 0, mean 50 -- while the whole test split gives 1/3. Each client's own prior
    (add-one: client 1 x 1/4, y 3/4) and its own majority label get both clients right: 100. Client 2
    holds no test example and is left out, as runs leave it out."""
    train = tc(["cat", "dog", "cow", "stock", "bond", "fur"], ["x", "x", "x", "y", "y", "x"])
    test = tc(["zebra", "yak", "emu"], ["x", "y", "y"])
    data = {"tc": {"train": train, "validation": test, "test": test}}
    part = Partition("tc", {0: [0, 1, 2], 1: [3, 4], 2: [5]}, {0: [0], 1: [1, 2], 2: []})
    per_client = b.client_scores(data, part)["tc"]
    assert {k: {c: r["accuracy"] for c, r in v.items()} for k, v in per_client.items()} == {
        "majority": {0: 100.0, 1: 0.0}, "naive_bayes": {0: 100.0, 1: 0.0},
        "client_majority": {0: 100.0, 1: 100.0}, "naive_bayes_client_prior": {0: 100.0, 1: 100.0}}
    got = b.client_baselines(data, part)["tc"]
    assert {k: v["accuracy"] for k, v in got.items()} == {
        "majority": 50.0, "naive_bayes": 50.0, "client_majority": 100.0, "naive_bayes_client_prior": 100.0}
    assert b.trivial_baselines(data)["tc"]["naive_bayes"]["accuracy"] == pytest.approx(100 / 3)
    nb = b.fit_naive_bayes(train, test)
    assert nb.predict(test) == ["x", "x", "x"]
    assert nb.predict(test, np.log(np.array([1 / 4, 3 / 4]))) == ["y", "y", "y"]


def test_cli_scores_the_partition_of_each_seed_and_refuses_bad_seeds(tmp_path):
    res = subprocess.run([sys.executable, "experiments/baselines.py", "--config=configs/tiny.py",
                          "--set=setting=standard_hetero_td", "--seeds=0,1", f"--out={tmp_path}"],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    clients = json.loads((tmp_path / "baselines.json").read_text())["clients"]
    assert clients["partition"] == "TD" and clients["seeds"] == [0, 1]
    assert set(clients["baselines"]["tc"]) == {"majority", "naive_bayes", "client_majority",
                                               "naive_bayes_client_prior"}
    for task, per in clients["baselines"].items():  # the mean over seeds of each seed's value, and
        for name, scores in per.items():          # each seed's the mean over its clients
            metric = {"tc": "accuracy", "rc": "f1", "ts": "rouge2"}[task]
            seeds = [clients["by_seed"][x][task][name] for x in ("0", "1")]
            assert scores[metric] == pytest.approx(np.mean(seeds))
            for x, value in zip(("0", "1"), seeds):
                assert value == pytest.approx(np.mean(list(clients["by_client"][x][task][name].values())))
    assert "| tc | naive_bayes_client_prior | accuracy |" in (tmp_path / "baselines.md").read_text()
    bad = subprocess.run([sys.executable, "experiments/baselines.py", "--config=configs/tiny.py",
                          "--seeds=0,x", f"--out={tmp_path / 'bad'}"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "--seeds=0,x" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()
