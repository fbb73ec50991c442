"""Fault injection: runs killed at any moment resume exactly; SIGTERM / SIGINT stop cleanly.

The CLI test kills a real FedMoE run (configs/tiny.py) several times, at a random moment, while a
checkpoint is being written, between a round's metrics row and its checkpoint, and with SIGTERM;
each time the same command resumes it. The finished run must equal an uninterrupted one bit for bit
(the sha256 of every array of the final checkpoint), round rows and test scores included.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

from fedmoe_jax.algorithms import RandomMoE
from fedmoe_jax.federated.metrics import read_metrics
from fedmoe_jax.federated.preemption import RunInterrupted, StopSignals
from fedmoe_jax.federated.trainer import FederatedTrainer, RunSettings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
ROUNDS = 5


# ---------------------------------------------------------------------------------------------
# StopSignals and the trainer
# ---------------------------------------------------------------------------------------------
def test_first_signal_is_recorded_second_runs_the_previous_handler():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with StopSignals() as stop:
            assert stop.requested is None
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.requested == signal.SIGTERM and seen == []  # recorded, process alive
            os.kill(os.getpid(), signal.SIGTERM)
            assert seen == [signal.SIGTERM]  # the second one reached the handler installed before
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored on exit
        with StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.requested == signal.SIGINT
            with pytest.raises(KeyboardInterrupt):  # Python's own SIGINT handler, once more
                os.kill(os.getpid(), signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_interrupted_exception_names_round_and_exit_status():
    e = RunInterrupted(signal.SIGTERM, 3, "/x/checkpoints")
    assert e.exit_status == 143 and e.round == 3
    assert str(e) == ("stopped by SIGTERM after round 3; checkpoint of round 3 in /x/checkpoints is saved: "
                      "run the same command again to resume")
    assert RunInterrupted(signal.SIGINT, 0).exit_status == 130


def _trainer(small_run, workdir, checkpoint_every=1):
    config, params, fed, tok = small_run
    run = RunSettings(num_rounds=3, cohort_size=3, batch_size=4, local_steps=2, eval_every=0)
    return FederatedTrainer(config, params, fed, tok, RandomMoE(4), optax.adamw(3e-3), run,
                            workdir=str(workdir), checkpoint_every=checkpoint_every)


def test_signal_mid_run_checkpoints_the_round_and_resume_is_exact(small_run, tmp_path):
    """SIGTERM during round 2 (checkpoints only every 3 rounds): round 2 finishes, is checkpointed
    anyway, `RunInterrupted` says so; a new trainer resumes there and ends bit-identical."""
    reference = _trainer(small_run, tmp_path / "ref")
    reference.run(progress=False)
    reference.close()

    t = _trainer(small_run, tmp_path / "run", checkpoint_every=3)
    run_round = t.run_round

    def signalling_round():
        row = run_round()
        if row["round"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives "during" round 2; handled after it
        return row

    t.run_round = signalling_round
    with StopSignals() as stop, pytest.raises(RunInterrupted, match="after round 2") as info:
        t.run(progress=False, stop=stop)
    t.close()
    assert info.value.round == 2 and t._checkpointer.all_rounds() == [2]

    resumed = _trainer(small_run, tmp_path / "run", checkpoint_every=3)
    assert resumed.server.round == 2
    resumed.run(progress=False)
    resumed.close()
    for a, b in zip(jax.tree.leaves(reference.server.params), jax.tree.leaves(resumed.server.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(read_metrics(str(tmp_path / "run"))) == strip(read_metrics(str(tmp_path / "ref")))


def test_cut_off_metrics_line_is_dropped_other_damage_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1}\n{"round": 2}\n{"rou')
    assert read_metrics(str(tmp_path)) == [{"round": 1}, {"round": 2}]
    path.write_text('{"round": 1}\n{"rou\n{"round": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_metrics(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# The CLI, killed for real
# ---------------------------------------------------------------------------------------------
def _command(workdir):
    return [sys.executable, "-m", "fedmoe_jax.main", f"--config={TINY}", f"--workdir={workdir}",
            "--progress=false", f"--config.num_rounds={ROUNDS}", "--config.eval.unseen_local_steps=0",
            "--config.eval.global_model=False"]


def _env():
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            "JAX_COMPILATION_CACHE_DIR": os.path.join(ROOT, ".jax_cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "TF_CPP_MIN_LOG_LEVEL": "3"}


def _rows(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    return sum(1 for _ in open(path)) if os.path.exists(path) else 0


def _writing_checkpoint(workdir):
    ckpt = os.path.join(workdir, "checkpoints")
    return os.path.isdir(ckpt) and any("tmp" in name for name in os.listdir(ckpt))


def _run_until(workdir, when, sig=signal.SIGKILL, timeout=300.0):
    """Start the CLI; send `sig` the first time `when()` holds (polled every 2 ms). Returns the
    finished process, whether the signal was sent, and what `when()` saw."""
    proc = subprocess.Popen(_command(workdir), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline, sent = time.monotonic() + timeout, False
    while proc.poll() is None and time.monotonic() < deadline:
        if when():
            proc.send_signal(sig)
            sent = True
            break
        time.sleep(0.002)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, sent, err


def _final_state(workdir):
    """(round, {leaf path: sha256}) of the newest checkpoint (its integrity record)."""
    ckpt = os.path.join(workdir, "checkpoints")
    step = max(int(n) for n in os.listdir(ckpt) if n.isdigit())
    with open(os.path.join(ckpt, str(step), "integrity", "metadata")) as f:
        return step, {path: sha for path, _, _, sha in json.load(f)["leaves"]}


def test_sigkill_anywhere_and_sigterm_resume_bit_identical(tmp_path):
    ref = str(tmp_path / "reference")
    done = subprocess.run(_command(ref), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    work = str(tmp_path / "killed")
    rng = random.Random(0)
    start = time.monotonic()
    delay = rng.uniform(3.0, 10.0)
    # 1. at a random moment (setup, Stage 1 or a round, whichever it is by then)
    rc, sent, _ = _run_until(work, lambda: time.monotonic() - start > delay)
    assert sent and rc == -signal.SIGKILL
    # 2. while a checkpoint is being written (orbax's temporary step directory exists)
    rc, sent, _ = _run_until(work, lambda: _writing_checkpoint(work))
    assert sent and rc == -signal.SIGKILL
    # 3. after a round's metrics row, before its checkpoint
    rows = _rows(work)
    rc, sent, _ = _run_until(work, lambda: _rows(work) > rows)
    assert sent and rc == -signal.SIGKILL
    # 4. SIGTERM: the round finishes, is checkpointed, exit 143 with one line
    rows = _rows(work)
    rc, sent, err = _run_until(work, lambda: _rows(work) > rows, sig=signal.SIGTERM)
    assert sent and rc == 143, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: stopped by SIGTERM after round ") and "run the same command" in last
    stopped_at = int(last.split("after round ")[1].split(";")[0])
    assert _final_state(work)[0] == stopped_at and not _writing_checkpoint(work)
    assert not os.path.exists(os.path.join(work, "summary.json"))
    # 5. the same command again finishes the run
    rc, _, err = _run_until(work, lambda: False)
    assert rc == 0, err[-3000:]

    ref_round, ref_leaves = _final_state(ref)
    round_num, leaves = _final_state(work)
    assert round_num == ref_round == ROUNDS
    assert leaves == ref_leaves  # every array of the run state, bit for bit
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(read_metrics(work)) == strip(read_metrics(ref))
    summaries = [json.load(open(os.path.join(d, "summary.json"))) for d in (ref, work)]
    assert summaries[0]["test"] == summaries[1]["test"]
    assert summaries[0]["test_clients"] == summaries[1]["test_clients"]
