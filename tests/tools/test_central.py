"""The central ceiling: its batches by hand, chunked training equal to step by step, and the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fedmoe_jax.errors import ConfigError
from fedmoe_jax.models import Decoding
from fedmoe_jax.tools import central

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_central_batches_cover_each_epoch_and_chunk_alike():
    arrays = {"inputs": np.arange(10)[:, None] * np.ones((1, 3), int), "targets": np.arange(10)[:, None]}
    whole = central.central_batches(arrays, steps=7, batch_size=4, seed=3)
    assert whole["inputs"].shape == (7, 4, 3) and whole["example_mask"].all()
    seen = whole["targets"].reshape(-1)
    # steps of 4 over 10 examples: the first 10 drawn are epoch 0 (each example once), then epoch 1
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    parts = [central.central_batches(arrays, steps=k, batch_size=4, seed=3, first=f)
             for f, k in ((0, 3), (3, 4))]
    np.testing.assert_array_equal(np.concatenate([p["targets"] for p in parts]), whole["targets"])


def test_chunked_training_equals_step_by_step(tmp_path):
    from fedmoe_jax.tools.sweeps import load_config

    config = load_config(os.path.join(REPO, "configs", "tiny.py"), "fedavg")
    one = central.central_ceiling(config, steps=4, eval_points=2, chunk=1, progress=False)
    greedy, beams = Decoding(), Decoding(2, (0.0, 1.0, 2.0))
    four = central.central_ceiling(config, steps=4, eval_points=2, chunk=50, progress=False,
                                   decodings=[greedy, beams])
    np.testing.assert_allclose(one["loss_history"], four["loss_history"], rtol=1e-5)
    assert [r["step"] for r in four["curve"]] == [2, 4] and len(four["loss_history"]) == 4
    assert set(four["test"]) == {"tc_accuracy", "rc_f1", "ts_rouge2"}
    assert four["examples"] == 3 * 48 and four["epochs"] == pytest.approx(4 * 4 / 144)
    assert four["num_experts"] == 4  # the MoE the sub-MoE methods fine-tune
    # rescoring the trained model: greedy again gives the run's own test scores (the config decodes
    # greedily), the beams are recorded with their penalties
    assert four["decoding"] == {"num_beams": 1, "length_penalty": (1.0, 1.0, 1.0)}
    again, searched = four["decodings"]
    assert again["test"] == four["test"] and again["length_penalty"] == [1.0] * 3
    assert searched["num_beams"] == 2 and searched["length_penalty"] == [0.0, 1.0, 2.0]
    assert set(searched["validation"]) == set(four["test"])
    assert "| 2 | 0, 1, 2 |" in central.markdown(four)


def test_parse_decoding():
    assert central.parse_decoding("4:1.0") == Decoding(4, (1.0, 1.0, 1.0))
    assert central.parse_decoding("4:1,1,2") == Decoding(4, (1.0, 1.0, 2.0))
    for bad in ("4", "four:1", "4:1,2", "0:1", "4:nan", "4:1:2"):
        with pytest.raises(ConfigError, match="BEAMS:PENALTY"):
            central.parse_decoding(bad)


def test_cli_writes_results_and_rejects_bad_input(tmp_path):
    res = subprocess.run([sys.executable, "experiments/central.py", "--config=configs/tiny.py", "--steps=2",
                          "--eval_points=1", "--model=baseline", "--decoding=2:1,1,2", f"--out={tmp_path}"],
                         capture_output=True,
                         text=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads((tmp_path / "central.json").read_text())
    assert result["steps"] == 2 and [r["step"] for r in result["curve"]] == [2]
    # the full-model baselines' MoE: 2 experts in configs/tiny.py (model.baseline_num_experts)
    assert result["num_experts"] == 2 and result["which_model"] == "baseline"
    assert "| step | train loss |" in (tmp_path / "central.md").read_text()
    assert result["decodings"][0]["length_penalty"] == [1.0, 1.0, 2.0]
    bad = subprocess.run([sys.executable, "experiments/central.py", "--config=configs/tiny.py",
                          "--set=num_rounds=many", f"--out={tmp_path / 'bad'}"], capture_output=True,
                         text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "num_rounds" in bad.stderr
    assert not (tmp_path / "bad").exists()
    bad = subprocess.run([sys.executable, "experiments/central.py", "--config=configs/tiny.py",
                          "--decoding=4", f"--out={tmp_path / 'bad'}"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "BEAMS:" in bad.stderr
    assert not (tmp_path / "bad").exists()
