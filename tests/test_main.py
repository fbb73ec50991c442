"""The CLI end to end on configs/tiny.py: a run, its files, resume, refusal, bad input (exit 2)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def cli(*args, cwd=None):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_COMPILATION_CACHE_DIR": os.path.join(ROOT, ".jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "fedmoe_jax.main", *args, "--progress=false"],
                          capture_output=True, text=True, env=env, cwd=cwd or ROOT, timeout=600)


def read_rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Two rounds of FedMoE on tiny, then the same command with num_rounds=3 (a resume)."""
    workdir = str(tmp_path_factory.mktemp("cli") / "run")
    first = cli(f"--config={TINY}", f"--workdir={workdir}", "--config.num_rounds=2")
    assert first.returncode == 0, first.stderr[-3000:]
    after_first = read_rows(workdir)
    second = cli(f"--config={TINY}", f"--workdir={workdir}", "--config.num_rounds=3")
    assert second.returncode == 0, second.stderr[-3000:]
    return workdir, first, after_first, second


def test_run_writes_every_artifact(tiny_run):
    workdir, first, _, _ = tiny_run
    for name in ("config.json", "summary.json", "metrics.jsonl", "experts.npz", "stage1.npz", "budgets.json",
                 "checkpoints", "tensorboard"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert "devices: 2 x cpu" in first.stderr and "mesh: {'clients': 2}" in first.stderr
    assert "summary.json" in first.stdout
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert summary["method"] == "fedmoe" and summary["rounds"] == 3
    assert set(summary["test"]) == {"tc_accuracy", "rc_f1", "ts_rouge2"}
    assert all(0.0 <= v <= 100.0 for v in summary["test"].values())  # percent, as the paper
    assert summary["num_experts"] == 4 and summary["num_moe_layers"] == 2
    assert len(summary["test_clients"]) == 6
    assert summary["config"]["num_rounds"] == 3
    assert set(summary["recommendation"]) == {"adjust", "accept", "rollback"}
    with np.load(os.path.join(workdir, "experts.npz")) as z:
        assert z["initial_maps"].shape == z["final_maps"].shape == (6, 2, 4)
        assert list(z["client_tasks"]) == [0, 0, 1, 1, 2, 2]
        with np.load(os.path.join(workdir, "stage1.npz")) as s1:
            np.testing.assert_array_equal(z["initial_maps"], s1["maps"])  # Stage 2 starts from Stage 1
            np.testing.assert_allclose(s1["probs"].sum(-1), 1.0, atol=1e-5)  # p per layer sums to 1
    # Table-2 statistics of the summary agree with the final maps
    counts = np.load(os.path.join(workdir, "experts.npz"))["final_maps"].sum((1, 2))
    assert summary["experts_end"] == {"mean": float(counts.mean()), "min": int(counts.min()),
                                      "max": int(counts.max())}


def test_rerun_resumes_and_extends(tiny_run):
    workdir, _, after_first, second = tiny_run
    assert [r["round"] for r in after_first] == [1, 2]
    rows = read_rows(workdir)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[:2] == after_first  # rounds 1-2 were not redone
    assert "Stage 1:" not in second.stderr  # Stage 1 came from stage1.npz


def test_different_run_is_refused_and_nothing_changes(tiny_run):
    workdir, _, _, _ = tiny_run
    before = {n: open(os.path.join(workdir, n), "rb").read() for n in ("summary.json", "metrics.jsonl",
                                                                        "config.json")}
    out = cli(f"--config={TINY}", f"--workdir={workdir}", "--config.seed=7")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "seed: saved 0, now 7" in lines[0] and "new --workdir" in lines[0]
    after = {n: open(os.path.join(workdir, n), "rb").read() for n in before}
    assert after == before


@pytest.mark.parametrize("args,message", [
    (["--config.cohort_size=9"], "config.cohort_size=9 is invalid"),
    (["--config.stage2.patiense=3"], "unknown config key"),
    (["--config.seed=abc"], "--config.seed=abc"),
    (["--config=configs/none.py"], "--config file could not be loaded"),
    (["--config=configs/cpu.py:standard"], "SETTING or SETTING,METHOD"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, args, message):
    config = [a for a in args if a.startswith("--config=")] or [f"--config={TINY}"]
    overrides = [a for a in args if not a.startswith("--config=")]
    out = cli(*config, f"--workdir={tmp_path / 'run'}", *overrides)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr
    assert not os.path.exists(tmp_path / "run" / "summary.json")


def test_unsatisfiable_partition_exits_2(tmp_path):
    out = cli(f"--config={TINY}", f"--workdir={tmp_path / 'run'}", "--config.data.min_examples=40")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "min_examples" in out.stderr


def test_seed_workdirs():
    from fedmoe_jax.config import ConfigError
    from fedmoe_jax.main import seed_workdirs

    assert seed_workdirs(["0", "2"], "runs/x/s{seed}") == ([0, 2], ["runs/x/s0", "runs/x/s2"])
    for seeds, template, match in ((["0", "a"], "r/{seed}", "integers"), (["0", "1"], "r/x", "placeholder"),
                                   (["1", "1"], "r/{seed}", "distinct")):
        with pytest.raises(ConfigError, match=match):
            seed_workdirs(seeds, template)


def test_diverging_clients_stop_the_run_with_exit_3(tmp_path):
    """A learning rate of 1e30 turns every client's update into inf/NaN: with on_nonfinite='stop'
    the run ends in round 1 with one line naming the clients, and writes no summary."""
    workdir = str(tmp_path / "nan")
    res = cli(f"--config={TINY}:fedavg", f"--workdir={workdir}", "--config.learning_rate=1e30",
              "--config.on_nonfinite=stop")
    assert res.returncode == 3, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: round 1: client(s) ") and "NaN/inf" in last
    assert not os.path.exists(os.path.join(workdir, "summary.json"))
    assert not os.path.exists(os.path.join(workdir, "metrics.jsonl")) or not read_rows(workdir)


def test_memory_cap_below_one_client_exits_2(tmp_path):
    """A cap no sub-cohort fits under: status 2, the last line names the sizes and what to lower."""
    res = cli(f"--config={TINY}:fedavg", f"--workdir={tmp_path / 'run'}", "--config.memory_cap_gb=1e-6")
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: a round needs ") and "over the memory cap of 0.00 GB" in last
    assert "lower batch_size" in last
    assert not os.path.exists(tmp_path / "run" / "summary.json")
