"""The demo script end to end (few steps) and its bad-input exit status."""

import json
import os
import subprocess
import sys

from conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "experiments", "model_demo.py")


def run(*args):
    env = {**os.environ, "XLA_FLAGS": xla_flags(1), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, DEMO, *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def test_demo_writes_metrics_and_figures(tmp_path):
    res = run(f"--workdir={tmp_path}", "--config.steps=25", "--config.eval_examples=16")
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert len(metrics["loss_curve"]) == 25
    assert metrics["loss_curve"][-1] < metrics["loss_curve"][0]
    usage = metrics["expert_usage"]
    assert len(usage) == 4 and all(abs(sum(p) - 1.0) < 1e-3 for p in usage.values())
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert (tmp_path / "expert_usage.png").stat().st_size > 0


def test_demo_bad_config_exits_2_with_one_line(tmp_path):
    res = run(f"--workdir={tmp_path}", "--config.model=switch-nope")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: bad config: unknown model config")
    assert not (tmp_path / "metrics.json").exists()
