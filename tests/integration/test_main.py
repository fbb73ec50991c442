"""The CLI end to end on configs/tiny.py: a run, its files, resume, refusal, bad input (exit 2)."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def cli_env(devices=1):
    return {**os.environ, "XLA_FLAGS": xla_flags(devices),
            "JAX_COMPILATION_CACHE_DIR": os.path.join(ROOT, ".jax_cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "TF_CPP_MIN_LOG_LEVEL": "3"}


def cli_command(*args):
    return [sys.executable, "-m", "fedmoe_jax.main", *args, "--progress=false"]


def cli(*args, cwd=None, devices=1):
    return subprocess.run(cli_command(*args), capture_output=True, text=True, env=cli_env(devices),
                          cwd=cwd or ROOT, timeout=600)


def read_rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def checkpoint_leaves(workdir, step):
    """{leaf path: sha256} of a checkpoint step (its integrity record): the run state, bit for bit."""
    with open(os.path.join(workdir, "checkpoints", str(step), "integrity", "metadata")) as f:
        return {path: sha for path, _, _, sha in json.load(f)["leaves"]}


# The tests using `tiny_run` share one worker (`--dist loadgroup`) and the session-scoped run, so
# it runs once (a module-scoped one is set up again when xdist interleaves another module's tests).
tiny_run_group = pytest.mark.xdist_group("tiny_run")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """Three rounds of FedMoE on tiny, uninterrupted (the reference of the fault tests), then the same
    command with num_rounds=4 (a resume that extends the run)."""
    workdir = str(tmp_path_factory.mktemp("cli") / "run")
    first = cli(f"--config={TINY}", f"--workdir={workdir}")
    assert first.returncode == 0, first.stderr[-3000:]
    reference = {"rows": read_rows(workdir), "leaves": checkpoint_leaves(workdir, 3),
                 "summary": json.load(open(os.path.join(workdir, "summary.json")))}
    second = cli(f"--config={TINY}", f"--workdir={workdir}", "--config.num_rounds=4")
    assert second.returncode == 0, second.stderr[-3000:]
    return workdir, first, reference, second


@tiny_run_group
def test_run_writes_every_artifact(tiny_run):
    workdir, first, _, _ = tiny_run
    for name in ("config.json", "summary.json", "metrics.jsonl", "experts.npz", "predictions.jsonl",
                 "stage1.npz", "budgets.json", "checkpoints", "tensorboard"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert "devices: 1 x cpu; mesh: none" in first.stderr
    assert "round 1: compiling the round program" in first.stderr  # the first round's wait is explained
    assert "summary.json" in first.stdout
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert summary["method"] == "fedmoe" and summary["rounds"] == 4
    assert set(summary["test"]) == {"tc_accuracy", "rc_f1", "ts_rouge2"}
    assert all(0.0 <= v <= 100.0 for v in summary["test"].values())  # percent, as the paper
    assert summary["num_experts"] == 4 and summary["num_moe_layers"] == 2
    assert len(summary["test_clients"]) == 6
    # healthy updates sit far below the default divergence rule (max_update_ratio=10)
    ratios = [x for row in read_rows(workdir) for x in row["client_update_ratio"]]
    assert ratios and 0 < max(ratios) < 1, ratios
    assert summary["config"]["num_rounds"] == 4
    assert len(summary["init_fingerprint"]) == 16  # the initial model (tiny: random init, seed 0)
    assert set(summary["recommendation"]) == {"adjust", "accept", "rollback"}
    records = [json.loads(line) for line in open(os.path.join(workdir, "predictions.jsonl"))]
    own = [r for r in records if r["model"] == "own"]
    assert {r["client"] for r in own} == set(range(6)) and {r["model"] for r in records} >= {"own", "global"}
    for k in range(6):  # eval.predictions = 4 per client, of the client's own task
        mine = [r for r in own if r["client"] == k]
        assert 1 <= len(mine) <= 4 and {r["task"] for r in mine} == {summary["test_clients"][str(k)]["task"]}
    assert all(isinstance(r["prediction"], str) and r["references"] for r in records)
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


@tiny_run_group
def test_rerun_resumes_and_extends(tiny_run):
    workdir, _, reference, second = tiny_run
    rows = read_rows(workdir)
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert rows[:3] == reference["rows"]  # rounds 1-3 were not redone
    assert "Stage 1:" not in second.stderr  # Stage 1 came from stage1.npz


@tiny_run_group
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
    (["--config.stage2.patiense=3"],
     "unknown config key 'stage2.patiense' (did you mean 'stage2.patience'?)"),
    (["--config.progress=false"], "--progress is an option of this command, not a config key"),
    (["--config.seed=abc"], "--config.seed=abc"),
    (["--config=configs/none.py"], "--config file could not be loaded"),
    (["--config=configs/cpu.py:standard"], "SETTING or SETTING,METHOD"),
    (["--config=configs/pretrain.py"], "not an experiment config; a pretraining config (configs/pretrain.py) "
                                       "runs with python -m fedmoe_jax.pretrain"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, args, message):
    config = [a for a in args if a.startswith("--config=")] or [f"--config={TINY}"]
    overrides = [a for a in args if not a.startswith("--config=")]
    out = cli(*config, f"--workdir={tmp_path / 'run'}", *overrides)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr
    assert not os.path.exists(tmp_path / "run" / "summary.json")


def test_workdir_guards_and_zero_rounds(tmp_path):
    """One workdir through four launches: (1) while another run holds it (its lock, taken here), a
    launch stops with one line before writing anything; (2) input only loading can reject (a
    partition that cannot be satisfied) also leaves it empty, so (3) the same command with the fix is
    a new run, not a refused resume: with num_rounds=0 it tests the initial model and its terminal
    summary (no communication figure) prints; (4) so does a rerun's."""
    from fedmoe_jax.files import workdir_lock

    workdir = tmp_path / "run"
    with workdir_lock(workdir):
        busy = cli(f"--config={TINY}:fedavg", f"--workdir={workdir}", "--config.num_rounds=0")
    assert busy.returncode == 2 and "is in use by another run" in busy.stderr
    assert len(busy.stderr.strip().splitlines()) == 1 and os.listdir(workdir) == []
    out = cli(f"--config={TINY}:fedavg", f"--workdir={workdir}", "--config.data.min_examples=40")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "min_examples" in out.stderr
    assert os.listdir(workdir) == []
    for _ in range(2):
        res = cli(f"--config={TINY}:fedavg", f"--workdir={workdir}", "--config.num_rounds=0")
        assert res.returncode == 0, res.stderr[-2000:]
        assert "fedavg (standard_hetero_t, seed 0): tc_accuracy" in res.stdout + res.stderr
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["comm_gib_per_transfer"] is None and set(summary["test"]) == {"tc_accuracy", "rc_f1",
                                                                                 "ts_rouge2"}


def _cut(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage,says", [
    (lambda w: (w / "config.json").write_text("[1, 2]"), "holds a JSON array, not a config"),
    (lambda w: (w / "summary.json").write_text("null"), "holds a JSON null, not a summary"),
    (lambda w: _cut(w / "stage1.npz"), "stage1.npz is damaged (BadZipFile)"),
])
@tiny_run_group
def test_damaged_workdir_files_give_one_line(tiny_run, tmp_path, damage, says):
    """Each damaged file of a copy of the finished tiny run stops its rerun (one more round) with one
    line naming it and the fix, exit status 2, instead of a traceback."""
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(tiny_run[0], workdir)
    damage(workdir)
    rounds = "4" if "summary" in says else "5"  # a finished run (4 rounds) reads its summary first
    res = cli(f"--config={TINY}:fedmoe", f"--workdir={workdir}", f"--config.num_rounds={rounds}")
    assert res.returncode == 2 and says in res.stderr, res.stderr[-2000:]
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (needs the right to mount, as root on CI) or None where it cannot be made."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(mount)],
                          capture_output=True).returncode == 0
    yield mount if made else None
    if made:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk, leave_kib):
    """Fill `disk` up to `leave_kib` KiB free; returns the filler file."""
    filler = disk / "filler"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, free - leave_kib * 1024)
    return filler


@tiny_run_group
def test_a_cut_row_a_full_disk_and_a_damaged_step_lose_nothing(tiny_run, tmp_path, small_disk):
    """The finished tiny run (4 rounds) on a nearly full disk, with round 4's row cut short after round 4
    was checkpointed, extended by a round. (1) The rerun rebuilds rows 1-4 from the checkpoint, byte for
    byte, then cannot save round 5's checkpoint: exit 4, one line, earlier steps intact. (2) With space
    freed and the latest step (round 4) damaged as well, the same command falls back to round 3, redoes
    rounds 4 and 5 exactly as before, saves round 4 in place of the damaged step and keeps it."""
    import shutil

    workdir = (small_disk or tmp_path) / "run"
    shutil.copytree(tiny_run[0], workdir)
    before, good = read_rows(str(workdir)), checkpoint_leaves(str(workdir), 4)
    _cut(workdir / "metrics.jsonl")  # rows 1-2 kept, row 3 cut, row 4 gone
    command = (f"--config={TINY}:fedmoe", f"--workdir={workdir}", "--config.num_rounds=5")
    if small_disk is None:
        res = cli(*command)
        assert res.returncode == 0 and read_rows(str(workdir))[:4] == before, res.stderr[-2000:]
        pytest.skip("no small filesystem here (mounting a tmpfs needs root): the full-disk and "
                    "damaged-step halves did not run")
    filler = fill(small_disk, leave_kib=200)  # a checkpoint step of tiny is ~880 KiB
    full = cli(*command)
    assert full.returncode == 4, full.stderr[-2000:]
    assert full.stderr.strip().splitlines()[-1].startswith(
        "error: the disk is full (No space left on device) while writing the checkpoint of round 5")
    assert "Traceback" not in full.stderr and "free space and run the same command again" in full.stderr
    assert sorted(int(n) for n in os.listdir(workdir / "checkpoints")) == [2, 3, 4]
    assert checkpoint_leaves(str(workdir), 4) == good
    failed = read_rows(str(workdir))
    assert [r["round"] for r in failed] == [1, 2, 3, 4, 5] and failed[:4] == before

    filler.unlink()
    (workdir / "checkpoints" / "4" / "integrity" / "metadata").write_text("{}")
    res = cli(*command)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "skipping corrupt checkpoint step 4" in res.stderr
    assert sorted(int(n) for n in os.listdir(workdir / "checkpoints")) == [3, 4, 5]
    assert checkpoint_leaves(str(workdir), 4) == good
    assert read_rows(str(workdir))[:3] == before[:3]  # from checkpoint 3, byte for byte
    rows = without_seconds(read_rows(str(workdir)))
    # round 4 was the last round when first run, so it validated every client (full_val_*) then
    differ = {k for k in set(rows[3]) | set(failed[3]) if rows[3].get(k) != failed[3].get(k)}
    assert rows[4] == without_seconds(failed)[4] and differ <= {"seconds"} | {
        k for k in failed[3] if k.startswith("full_val")}, differ


def test_config_help_lists_the_fields_of_the_given_config():
    res = cli(f"--config={TINY}", "--config.num_rounds=7", "--config_help")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "num_rounds = 7  [may change on resume]\n    federated rounds" in res.stdout
    assert "model.name = 'switch-tiny-4'" in res.stdout


def test_seed_workdirs():
    from fedmoe_jax.errors import ConfigError
    from fedmoe_jax.main import seed_workdirs

    assert seed_workdirs(["0", "2"], "runs/x/s{seed}") == ([0, 2], ["runs/x/s0", "runs/x/s2"])
    for seeds, template, match in ((["0", "a"], "r/{seed}", "integers"), (["0", "1"], "r/x", "placeholder"),
                                   (["1", "1"], "r/{seed}", "distinct")):
        with pytest.raises(ConfigError, match=match):
            seed_workdirs(seeds, template)


def test_diverging_clients_stop_the_run_with_exit_3(tmp_path):
    """The hostile case: a learning rate of 1e6 makes every client's update finite but ~1e8 times the
    model. Every client is diverged by the ratio rule, so round 1 has nothing to aggregate: exit 3, one
    line naming the clients and the rule, no summary, no row."""
    workdir = str(tmp_path / "huge")
    res = cli(f"--config={TINY}:fedavg", f"--workdir={workdir}", "--config.learning_rate=1e6",
              "--config.num_rounds=1")
    assert res.returncode == 3, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: round 1: every client diverged (client(s) ") and \
        "over max_update_ratio=10 times the model it received" in last
    assert "nothing of round 1 is committed" in last
    assert not os.path.exists(os.path.join(workdir, "summary.json"))
    assert not os.path.exists(os.path.join(workdir, "metrics.jsonl")) or not read_rows(workdir)


@pytest.mark.parametrize("method,what", [("fedavg", "a round"), ("local", "local training")])
def test_memory_cap_below_one_client_exits_2(tmp_path, method, what):
    """A cap no sub-cohort fits under (a server round, or `local`'s personal models): status 2, the
    last line names the sizes and what to lower."""
    res = cli(f"--config={TINY}:{method}", f"--workdir={tmp_path / 'run'}", "--config.memory_cap_gb=1e-6",
              "--config.cohort_size=1")  # one candidate sub-cohort: one compilation
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {what} needs ") and "over the memory cap of 0.00 GB" in last
    assert "lower batch_size" in last
    assert not os.path.exists(tmp_path / "run" / "summary.json")


# ---------------------------------------------------------------------------------------------
# Fault injection: the same run killed for real, and on another device count
# ---------------------------------------------------------------------------------------------
def rows_written(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    return sum(1 for _ in open(path)) if os.path.exists(path) else 0


def new_row(workdir):
    """A condition that holds once the resumed run (it rewrites metrics.jsonl, cut back to its
    checkpoint) has written a row past its last checkpoint."""
    path = os.path.join(workdir, "metrics.jsonl")
    before = os.stat(path).st_ino

    def holds():
        ckpt = os.path.join(workdir, "checkpoints")
        saved = max([int(n) for n in os.listdir(ckpt) if n.isdigit()], default=0)
        try:
            return os.stat(path).st_ino != before and rows_written(workdir) > saved
        except FileNotFoundError:
            return False

    return holds


def writing_checkpoint(workdir):
    """Whether orbax's temporary directory of a step being written exists."""
    ckpt = os.path.join(workdir, "checkpoints")
    return os.path.isdir(ckpt) and any("tmp" in name for name in os.listdir(ckpt))


def run_until(workdir, when, sig=signal.SIGKILL, timeout=300.0):
    """The tiny CLI run in `workdir`; `sig` is sent the first time `when()` holds (polled every
    2 ms). Returns (exit status, whether the signal was sent, stderr)."""
    proc = subprocess.Popen(cli_command(f"--config={TINY}", f"--workdir={workdir}"), cwd=ROOT,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, sent = time.monotonic() + timeout, False
    while proc.poll() is None and time.monotonic() < deadline:
        if when():
            proc.send_signal(sig)
            sent = True
            break
        time.sleep(0.002)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, sent, err


def without_seconds(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@tiny_run_group
def test_killed_anywhere_and_sigterm_resume_bit_identical(tiny_run, tmp_path):
    """The tiny FedMoE run killed four times and resumed each time with the same command ends
    bit-identical to the uninterrupted run: every array of the state (sha256), every metrics row
    (wall times aside), the test scores."""
    _, _, reference, _ = tiny_run
    work = str(tmp_path / "killed")
    start, delay = time.monotonic(), random.Random(0).uniform(2.0, 8.0)
    # 1. at a random moment before the first round ends (setup, Stage 1 or round 1)
    rc, sent, _ = run_until(work, lambda: time.monotonic() - start > delay or rows_written(work) > 0)
    assert sent and rc == -signal.SIGKILL
    # 2. while a checkpoint is being written
    rc, sent, _ = run_until(work, lambda: writing_checkpoint(work))
    assert sent and rc == -signal.SIGKILL
    # 3. after a round's metrics row, before its checkpoint
    rc, sent, _ = run_until(work, new_row(work))
    assert sent and rc == -signal.SIGKILL
    # 4. SIGTERM: the round finishes and is checkpointed; exit 143 with one line
    rc, sent, err = run_until(work, new_row(work), sig=signal.SIGTERM)
    assert sent and rc == 143, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: stopped by SIGTERM after round ") and "same command" in last
    stopped = int(last.split("after round ")[1].split(";")[0])
    assert stopped < 3 and os.path.isdir(os.path.join(work, "checkpoints", str(stopped)))
    assert not writing_checkpoint(work) and not os.path.exists(os.path.join(work, "summary.json"))
    # 5. the same command finishes the run
    rc, _, err = run_until(work, lambda: False)
    assert rc == 0, err[-3000:]

    assert checkpoint_leaves(work, 3) == reference["leaves"]
    assert without_seconds(read_rows(work)) == without_seconds(reference["rows"])
    summary = json.load(open(os.path.join(work, "summary.json")))
    assert summary["test"] and summary["test_clients"]
    for key in ("test", "test_clients", "global_test", "unseen_test", "experts_end", "recommendation"):
        assert summary.get(key) == reference["summary"].get(key), key


@tiny_run_group
def test_eight_devices_give_the_same_run(tiny_run, tmp_path):
    """The same run on 8 host devices (cohort sharded over a mesh) as on 1 (no mesh): the same
    cohorts, expert counts, FedMoE events and test scores, losses equal to float rounding (not bit
    for bit: docs/reliability.md)."""
    _, _, reference, _ = tiny_run
    out = cli(f"--config={TINY}", f"--workdir={tmp_path / 'eight'}", devices=8)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "devices: 8 x cpu; mesh: {'clients': 8}" in out.stderr
    rows = read_rows(str(tmp_path / "eight"))
    assert len(rows) == len(reference["rows"]) == 3
    for a, b in zip(rows, reference["rows"]):
        for key in ("cohort", "expert_counts", "bytes_down", "client_val_score", "events"):
            assert a.get(key) == b.get(key), key
        np.testing.assert_allclose(a["client_train_loss"], b["client_train_loss"], rtol=1e-5)
        np.testing.assert_allclose([v["loss"] for v in a["client_val"]],
                                   [v["loss"] for v in b["client_val"]], rtol=1e-5)
    summary = json.load(open(os.path.join(tmp_path / "eight", "summary.json")))
    for key in ("test", "experts_end", "recommendation"):
        assert summary[key] == reference["summary"][key], key


@tiny_run_group
def test_fine_tune_curve_of_a_fedmoe_run_starts_at_its_scores(tiny_run, tmp_path):
    """FedMoE's final sub-MoEs after 0 fine-tuning steps score exactly the run's summary (`evaluate` of
    the rebuilt run from a copy of its final checkpoint); a copy without Stage 1's file is refused
    before anything is rebuilt (its Stage 1 would run again)."""
    import shutil

    from fedmoe_jax.errors import ConfigError
    from fedmoe_jax.tools.fine_tune_curve import fine_tune_curve

    workdir = tiny_run[0]
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    row = fine_tune_curve(workdir, [0])["curve"][0]
    assert {k: v for k, v in row.items() if k not in ("steps", "clients")} == summary["test"]
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    os.remove(copy / "stage1.npz")
    with pytest.raises(ConfigError, match="has no stage1.npz"):
        fine_tune_curve(str(copy), [0])
