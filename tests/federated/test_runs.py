"""RunGroup (seeds vmapped in one round program) against the same runs trained one by one."""

import signal

import jax
import numpy as np
import pytest
from test_trainer import make_trainer

from fedmoe_jax.algorithms import Algorithm, FedProx, LocalOnly, RandomMoE
from fedmoe_jax.federated.preemption import RunInterrupted
from fedmoe_jax.federated.runs import RunGroup, run_slice, stack_runs
from fedmoe_jax.federated.sharding import make_mesh


def assert_same_run(a, b):
    assert [r["cohort"] for r in a.history] == [r["cohort"] for r in b.history]
    for ra, rb in zip(a.history, b.history):
        np.testing.assert_allclose(ra["client_train_loss"], rb["client_train_loss"], rtol=2e-5)
        assert ra["bytes_down"] == rb["bytes_down"]
        assert [sorted(m) for m in ra["client_val"]] == [sorted(m) for m in rb["client_val"]]
        np.testing.assert_allclose([m.get("loss", 0.0) for m in ra["client_val"]],
                                   [m.get("loss", 0.0) for m in rb["client_val"]], rtol=2e-5)
    for x, y in zip(jax.tree.leaves(a._state()), jax.tree.leaves(b._state())):
        if np.issubdtype(np.asarray(x).dtype, np.floating):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
        else:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_stack_and_slice_round_trip():
    trees = [{"w": np.full((2, 3), i, np.float32), "k": jax.random.key(i)} for i in range(3)]
    stacked = stack_runs(trees)
    assert stacked["w"].shape == (3, 2, 3) and stacked["k"].shape == (3,)
    np.testing.assert_array_equal(run_slice(stacked, 2)["w"], trees[2]["w"])
    key = jax.random.key_data(run_slice(stacked, 1)["k"])
    assert key.tolist() == jax.random.key_data(trees[1]["k"]).tolist()


def test_fedavg_seeds_in_one_program_equal_runs_alone(small_run):
    settings = dict(num_rounds=2, eval_every=1)
    alone = [make_trainer(small_run, FedProx(0.01), seed=s, **settings) for s in (0, 1)]
    for t in alone:
        t.run(progress=False)
    grouped = [make_trainer(small_run, FedProx(0.01), seed=s, **settings) for s in (0, 1)]
    RunGroup(grouped).run(progress=False)
    for a, b in zip(alone, grouped):
        assert_same_run(a, b)
    assert alone[0].history[0]["cohort"] != alone[1].history[0]["cohort"]  # the seeds really differ


def test_memory_cap_splits_the_group_into_sub_cohorts(small_run):
    """Under a cap the R runs train in the largest sub-cohorts that fit together, with the results of
    the runs trained alone; below one client per run: MemoryCapExceeded naming the runs."""
    from fedmoe_jax.federated.loop import MemoryCapExceeded

    def group(cap):
        return RunGroup([make_trainer(small_run, FedProx(0.01), seed=s, eval_every=0, memory_cap_bytes=cap)
                         for s in (0, 1)])

    too_small = group(1)
    with pytest.raises(MemoryCapExceeded, match=r"2 runs at once: pass fewer --seeds"):
        too_small.run(num_rounds=1, progress=False)
    # (narrow config, cohort 3, no validation in the round) -> {chunk: bytes}
    (key, need), = too_small._step.memory_needs.items()
    assert list(need) == [None, 1] and need[None] > need[1]  # whole cohort of 3, then one client a time
    capped = group(need[1])
    capped.run(num_rounds=1, progress=False)
    assert list(capped._step.compiled) == [(key[0], 1, False)]
    alone = [make_trainer(small_run, FedProx(0.01), seed=s, eval_every=0) for s in (0, 1)]
    for t in alone:
        t.run(num_rounds=1, progress=False)
    for a, b in zip(alone, capped.trainers):
        assert_same_run(a, b)


def test_runs_of_different_widths_train_at_the_widest(small_run):
    """randomMoE keeps 1 expert per layer in one run and 4 in the other: the group trains both at
    4 slots; the reference trains each run alone at the same widths, round by round."""
    def pair():  # validation off: test_fedavg_... covers it; here the widths matter
        return [make_trainer(small_run, RandomMoE(experts_per_layer=k), seed=s, eval_every=0)
                for k, s in ((1, 0), (4, 1))]

    alone = pair()
    for _ in range(2):
        width = max(t.round_width() for t in alone)
        for t in alone:
            prep = t.prepare_round(width)
            t.finish_round(prep, t.train_round(prep))
    grouped = pair()
    assert grouped[0].round_width() < grouped[1].round_width()
    RunGroup(grouped).run(progress=False)
    for a, b in zip(alone, grouped):
        assert_same_run(a, b)


def test_resumed_runs_are_brought_level_first(small_run, tmp_path):
    from test_trainer import make_trainer_in

    ahead = make_trainer_in(small_run, str(tmp_path / "a"), num_rounds=2, eval_every=0)
    ahead.run(num_rounds=1, progress=False)
    behind = make_trainer_in(small_run, str(tmp_path / "b"), num_rounds=2, seed=1, eval_every=0)
    group = RunGroup([ahead, behind])
    with pytest.raises(ValueError, match="different rounds"):
        group.run_round()

    class StopOnceLevel:  # a signal that arrives once both runs have finished round 1
        @property
        def requested(self):
            return signal.SIGTERM if min(ahead.server.round, behind.server.round) >= 1 else None

    with pytest.raises(RunInterrupted, match="after round 1") as info:
        group.run(progress=False, stop=StopOnceLevel())
    for t in (ahead, behind):  # both checkpointed, both named
        assert t._checkpointer.all_rounds() == [1] and t.checkpoint_dir in str(info.value)
    histories = group.run(progress=False)
    assert [len(h) for h in histories] == [2, 2] and group.round == 2
    for t in (ahead, behind):
        t.close()


def test_bad_groups_are_refused(small_run):
    with pytest.raises(ValueError, match="personal models"):
        RunGroup([make_trainer(small_run, LocalOnly())])
    with pytest.raises(ValueError, match="only in their seed"):
        RunGroup([make_trainer(small_run, Algorithm()), make_trainer(small_run, Algorithm(), local_steps=3)])
    with pytest.raises(ValueError, match="algorithm"):
        RunGroup([make_trainer(small_run, Algorithm()), make_trainer(small_run, FedProx(0.01))])
    with pytest.raises(ValueError, match="mesh=None"):
        RunGroup([make_trainer(small_run, Algorithm(), mesh=make_mesh())])
