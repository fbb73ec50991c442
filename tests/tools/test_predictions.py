"""`fedmoe_jax.tools.predictions`: loading, alignment across runs, diagnostics by hand, the CLI (exit 2)."""

import json
import os
import subprocess
import sys

import pytest

from fedmoe_jax.tools import predictions

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write(run_dir, method, records, seed=0):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump({"method": method, "seed": seed}, f)
    with open(os.path.join(run_dir, "predictions.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def rec(client, task, id_, pred, refs, model="own"):
    return {"client": client, "task": task, "model": model, "id": id_, "prediction": pred, "references": refs}


A = [rec(0, "ts", 1, "the cat", ["the cat sat"]), rec(0, "ts", 2, "", ["a dog"]),
     rec(1, "tc", 5, "noun.animal", ["noun.animal"]), rec(1, "tc", 6, "noun.animal", ["verb.motion"]),
     rec(1, "tc", 7, "noun.animal", ["noun.animal"]), rec(0, "ts", 1, "global", ["the cat sat"], "global")]
B = [rec(0, "ts", 2, "a dog", ["a dog"]), rec(1, "tc", 5, "verb.motion", ["noun.animal"])]


def test_diagnostics_by_hand():
    d = predictions.diagnostics(predictions.select(A))
    assert d["tc"] == {"kept": 3, "empty": 0.0, "distinct": pytest.approx(1 / 3), "top": "noun.animal",
                       "top_share": 1.0, "exact": pytest.approx(2 / 3), "tc_label": None, "off_task": 0.0}
    assert d["ts"]["empty"] == 0.5 and d["ts"]["exact"] == 0.0 and d["ts"]["distinct"] == 1.0
    assert d["ts"]["tc_label"] == d["ts"]["off_task"] == 0.0  # "the cat" and "" are no TC class


def test_label_collapse_share_by_hand():
    """TC classes are the TC records' references (noun.animal, verb.motion); 2 of the 3 TS outputs and 1
    of the 2 RC outputs are one of them, case and spaces aside; 2 of the 3 TC outputs are none (off task)."""
    records = [rec(1, "tc", 5, "x", ["noun.animal"]), rec(1, "tc", 6, "x", ["verb.motion"]),
               rec(1, "tc", 7, "Verb.Motion", ["verb.motion"]),
               rec(0, "ts", 1, " Noun.Animal ", ["the cat"]), rec(0, "ts", 2, "verb.motion", ["a dog"]),
               rec(0, "ts", 3, "a dog", ["a dog"]), rec(2, "rc", 4, "verb.motion", ["run"]),
               rec(2, "rc", 5, "run", ["run"])]
    d = predictions.diagnostics(records)
    assert d["ts"]["tc_label"] == pytest.approx(2 / 3) and d["rc"]["tc_label"] == 0.5
    assert d["tc"]["tc_label"] is None and d["tc"]["off_task"] == pytest.approx(2 / 3)
    assert d["ts"]["off_task"] == d["ts"]["tc_label"] and d["rc"]["off_task"] == 0.5
    without_tc = predictions.diagnostics([r for r in records if r["task"] != "tc"])["ts"]
    assert without_tc["tc_label"] is None and without_tc["off_task"] is None


def test_side_by_side_aligns_examples_and_marks_missing_ones():
    rows = predictions.side_by_side({"a": predictions.select(A), "b": predictions.select(B)}, n=1)
    assert [(r["task"], r["client"], r["id"]) for r in rows] == [("ts", 0, 1), ("tc", 1, 5)]
    assert rows[0]["predictions"] == {"a": "the cat", "b": None}
    assert rows[1]["predictions"] == {"a": "noun.animal", "b": "verb.motion"}
    assert predictions.select(A, task="ts", model="global") == [A[-1]]
    assert predictions.select(A, client=1, task="ts") == []


def cli(*args):
    script = os.path.join(ROOT, "experiments", "predictions.py")
    return subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def test_cli_prints_markdown_and_exits_2_without_predictions(tmp_path, capsys):
    write(tmp_path / "fedmoe", "fedmoe", A)
    write(tmp_path / "fedavg", "fedavg", B)
    proc = cli(tmp_path / "fedmoe", tmp_path / "fedavg", "--task=ts", "-n", "5", "--model", "own")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "| fedmoe s0 | ts | 2 | 50% | 100% | 0% |" in out
    assert "- fedmoe s0: (empty)" in out and "- fedavg s0: `a dog`" in out
    os.makedirs(tmp_path / "old")
    assert predictions.print_predictions([str(tmp_path / "fedmoe"), str(tmp_path / "old")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "predictions.jsonl does not exist" in err
    assert predictions.print_predictions([str(tmp_path / "fedavg")], model="unseen") == 2
    assert predictions.print_predictions([str(tmp_path / "fedavg")], n=0) == 2


def test_cli_bad_flags_exit_2_with_one_line(tmp_path):
    write(tmp_path / "fedavg", "fedavg", B)
    run = tmp_path / "fedavg"
    for args, says in (((), "RUN_DIR"), ((run, "--task=xx"), "--task"), ((run, "-n", "many"), "--n"),
                       ((run, "--bogus"), "bogus"), ((run, "--model=unseen"), "no 'unseen' predictions")):
        proc = cli(*args)
        assert proc.returncode == 2 and says in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1


def test_quote_flattens_escapes_and_cuts():
    assert predictions.quote("a|b\nc") == "`a\\|b c`"
    assert predictions.quote("abcdef", limit=4) == "`abc…`"
    assert predictions.quote("  ") == "(empty)" and predictions.quote(None) == "(not kept)"
    d = {"kept": 4, "empty": 0.25, "distinct": 0.5, "exact": 0.0, "top": "x|y", "top_share": 0.75,
         "off_task": 0.5}
    assert predictions.diagnostics_cells(d) == "4 | 25% | 50% | 0% | 50% | `x\\|y` (75%)"
    assert predictions.diagnostics_cells({**d, "off_task": None}) == "4 | 25% | 50% | 0% | - | `x\\|y` (75%)"
