"""The pretraining command: `run_pretrain` on configs/pretrain.py (a tiny model), and
`python -m fedmoe_jax.pretrain` end to end, bad input included (exit 2, one line)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import xla_flags
from pretraining_helpers import FAST, ROOT, load_config_file

from fedmoe_jax.data import benchmark_dir, embedded_tokenizer
from fedmoe_jax.models import get_config
from fedmoe_jax.pretrain import cli as pt
from fedmoe_jax.pretrain.cache import BENCHMARK_STEPS
from fedmoe_jax.pretrain.train import DEFAULTS


@pytest.fixture(scope="module")
def tok():
    return embedded_tokenizer()


def test_run_pretrain_writes_summary_and_plot(tmp_path, tok):
    config = load_config_file("pretrain").get_config()
    # a pretraining config, not an experiment's: no method, no rounds
    assert "method" not in config and "num_rounds" not in config and config.model.name == "switch-small-16"
    # its defaults build the benchmark's shipped models
    assert config.steps == BENCHMARK_STEPS and config.cache_dir == "runs/pretrained"
    assert config.data_dir == benchmark_dir()
    config.data_dir = ""  # the small embedded corpus: seconds
    assert {k: config[k] for k in DEFAULTS} == DEFAULTS
    config.model.name = "switch-tiny-4"
    config.model.vocab_size = tok.vocab_size
    config.model.num_experts = 2
    assert pt.model_config(config) == get_config("switch-tiny-4", vocab_size=4096, num_experts=2)
    config.model.num_experts = 0  # the named config's 4
    config.steps = 6
    config.progress = False
    config.cache_dir = str(tmp_path / "cache")
    for k, v in FAST.items():
        config[k] = v
    workdir = tmp_path / "work"
    summary = pt.run_pretrain(config, str(workdir))
    written = json.loads((workdir / "pretrain.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert summary["num_experts"] == 4 and summary["steps"] == 6 and not summary["cached"]
    assert not summary["shipped"]
    assert "method" not in summary and summary["num_params"] > 0
    assert len(summary["loss_history"]) == 6 and summary["final_loss"] == summary["loss_history"][-1]
    assert summary["steps_per_second"] > 0
    assert set(summary["input_dependence"]) == {"own_ce", "other_ce", "gap", "span_corruption_gap"}
    assert os.path.isdir(summary["checkpoint"]) and summary["checkpoint"].startswith(str(tmp_path / "cache"))
    png = (workdir / "pretrain_loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    again = pt.run_pretrain(config, str(tmp_path / "work2"))
    assert again["cached"] and again["checkpoint"] == summary["checkpoint"]

    config.model.num_experts = -1
    with pytest.raises(ValueError, match="model.num_experts"):
        pt.run_pretrain(config, str(workdir))
    config.model.num_experts = 0
    config.steps = 0
    with pytest.raises(ValueError, match="config.steps=0"):
        pt.run_pretrain(config, str(workdir))
    config.steps = 6
    config.optimizer = "sgd"
    with pytest.raises(ValueError, match="config.optimizer='sgd' is invalid"):
        pt.run_pretrain(config, str(workdir))


PRETRAIN = os.path.join(ROOT, "configs", "pretrain.py")


def pretrain_command(*args):
    """`python -m fedmoe_jax.pretrain ARGS` on one CPU device, sharing the tests' compilation cache."""
    env = {**os.environ, "XLA_FLAGS": xla_flags(1), "TF_CPP_MIN_LOG_LEVEL": "3",
           "JAX_COMPILATION_CACHE_DIR": os.path.join(ROOT, ".jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    return subprocess.run([sys.executable, "-m", "fedmoe_jax.pretrain", *args, "--progress=false"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def test_command_pretrains_and_reports(tmp_path):
    tiny = ["--config.model.name=switch-tiny-4", "--config.model.vocab_size=4096", "--config.steps=3",
            f"--config.cache_dir={tmp_path / 'cache'}", *[f"--config.{k}={v}" for k, v in FAST.items()]]
    out = pretrain_command(f"--config={PRETRAIN}", f"--workdir={tmp_path / 'run'}", *tiny)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "pretrained switch-tiny-4 (4 experts" in out.stdout and " trained: loss " in out.stdout, out.stdout
    summary = json.loads((tmp_path / "run" / "pretrain.json").read_text())
    assert summary["steps"] == 3 and not summary["cached"] and len(summary["loss_history"]) == 3
    assert summary["checkpoint"].startswith(str(tmp_path / "cache"))
    assert (tmp_path / "run" / "pretrain_loss.png").exists()


@pytest.mark.parametrize("args,message", [
    (["--config.steps=0"], "config.steps=0 is invalid: use >= 1"),
    (["--config.stepz=3"], "unknown config key 'stepz' (did you mean 'steps'?): check the --config.KEY=VALUE "
                           "overrides against configs/pretrain.py"),
    (["--config.seed=abc"], "--config.seed=abc"),
    (["--config.workdir=x"], "--workdir is an option of this command, not a config key"),
    (["--config.model.name=switch-huge"], "config.model.name='switch-huge' is invalid"),
    (["--config.data_dir=/nowhere"], "config.data_dir='/nowhere' is invalid: embedded benchmark manifest"),
    ([f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}"],
     "this is an experiment config; run it with python -m fedmoe_jax.main"),
    (["--config=configs/none.py"], "--config file could not be loaded"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, args, message):
    config = [a for a in args if a.startswith("--config=")] or [f"--config={PRETRAIN}"]
    overrides = [a for a in args if not a.startswith("--config=")]
    out = pretrain_command(*config, f"--workdir={tmp_path / 'run'}", *overrides)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr
    assert not os.path.exists(tmp_path / "run" / "pretrain.json")
