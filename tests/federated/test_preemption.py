"""SIGTERM / SIGINT stop a run cleanly at a round boundary with a checkpoint; resume is exact.

The real-process fault tests (SIGKILL at random points, SIGTERM through the CLI) are in test_main.py,
next to the uninterrupted CLI run they compare with.
"""

import os
import signal

import jax
import numpy as np
import optax
import pytest

from fedmoe_jax.algorithms import RandomMoE
from fedmoe_jax.federated.metrics import read_metrics
from fedmoe_jax.federated.preemption import RunInterrupted, StopSignals
from fedmoe_jax.federated.trainer import FederatedTrainer, RunSettings


# ---------------------------------------------------------------------------------------------
# StopSignals and the trainer
# ---------------------------------------------------------------------------------------------
def test_first_signal_is_recorded_second_runs_the_previous_handler():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    # Python's own SIGINT handler, also when the suite was started with SIGINT ignored (nohup, `&`)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
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
        signal.signal(signal.SIGINT, previous_int)


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
