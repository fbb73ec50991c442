"""The multi-round driver end to end on a small slice of the embedded benchmark."""

import logging
import os

import jax
import numpy as np
import optax
import pytest
from test_checkpoint import tamper_data

from fedmoe_jax.algorithms import Algorithm, RandomMoE
from fedmoe_jax.federated.sharding import make_mesh
from fedmoe_jax.federated.submodel import param_bytes
from fedmoe_jax.federated.trainer import FederatedTrainer, RunSettings


def make_trainer(small_run, algorithm, mesh=None, **settings):
    config, params, fed, tok = small_run
    run = RunSettings(**{"num_rounds": 2, "cohort_size": 3, "batch_size": 4, "local_steps": 2,
                         "eval_batch_size": 4, "max_eval_examples": 4, **settings})
    # eps above float noise: Adam amplifies rounding differences of near-zero gradients
    tx = optax.adamw(3e-3, eps=1e-3)
    return FederatedTrainer(config, params, fed, tok, algorithm, tx, run, mesh=mesh)


def test_rounds_update_state_and_report_metrics(small_run):
    trainer = make_trainer(small_run, RandomMoE(experts_per_layer=4))
    history = trainer.run(progress=False)
    assert [row["round"] for row in history] == [1, 2] and trainer.server.round == 2
    states = trainer.states
    seen = np.flatnonzero(states.participations > 0)
    assert states.participations.sum() == 6
    # validation probabilities sum to 1 per layer and sit only on each client's own experts
    np.testing.assert_allclose(states.probs[seen].sum(-1), 1.0, rtol=1e-5)
    assert np.all(states.probs[seen][~states.expert_maps[seen]] == 0)
    assert np.all(np.isfinite(states.score[seen])) and np.all(np.isnan(np.delete(states.score, seen)))
    row = history[-1]
    assert len(row["client_val"]) == 3 and all("score" in m and "loss" in m for m in row["client_val"])
    # bytes: dense part plus the kept experts, the same down and up
    dense, expert = param_bytes(small_run[1], small_run[0])
    maps = states.expert_maps[row["cohort"]]
    expected = dense + (maps.sum(-1) * expert).sum(-1)
    assert row["bytes_down"] == row["bytes_up"] == expected.tolist()
    assert row["expert_counts"] == [8, 8, 8]  # 2 MoE layers x 4 of 8 experts
    assert row["expert_count_mean"] == row["expert_count_min"] == row["expert_count_max"] == 8


def test_enforced_sampling_and_sharded_run_match_unsharded(small_run):
    plain = make_trainer(small_run, Algorithm(), sampling="enforced", eval_every=0)
    sharded = make_trainer(small_run, Algorithm(), mesh=make_mesh(), sampling="enforced", eval_every=0)
    h1, h2 = plain.run(progress=False), sharded.run(progress=False)
    for a, b in zip(h1, h2):
        assert a["cohort"] == b["cohort"]
        tasks = [plain.data.partition.task_of(c) for c in a["cohort"]]
        assert sorted(tasks) == ["rc", "tc", "ts"]
        np.testing.assert_allclose(a["client_train_loss"], b["client_train_loss"], rtol=1e-5)
    for x, y in zip(jax.tree.leaves(plain.server.params), jax.tree.leaves(sharded.server.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_bad_settings_raise(small_run):
    with pytest.raises(ValueError, match="cohort_size"):
        make_trainer(small_run, Algorithm(), cohort_size=7)
    with pytest.raises(ValueError, match="sampling"):
        make_trainer(small_run, Algorithm(), sampling="random")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax, see test_checkpoint
def test_resume_is_bit_identical_and_wrong_resume_is_refused(small_run, tmp_path, caplog):
    def final_state(trainer):
        return jax.tree.leaves(trainer._state())

    straight = make_trainer(small_run, RandomMoE(experts_per_layer=4), num_rounds=4, max_eval_examples=2)
    straight.run(progress=False)

    workdir = str(tmp_path / "run")
    first = make_trainer_in(small_run, workdir, num_rounds=4)
    first.run(num_rounds=2, progress=False)
    first.close()
    resumed = make_trainer_in(small_run, workdir, num_rounds=4)
    assert resumed.server.round == 2 and len(resumed.history) == 2
    resumed.run(progress=False)
    resumed.close()
    for a, b in zip(final_state(straight), final_state(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    from fedmoe_jax.federated.metrics import read_metrics

    rows = read_metrics(workdir)
    assert [row["round"] for row in rows] == [1, 2, 3, 4]
    losses = [row["client_train_loss"] for row in rows]
    assert losses == [row["client_train_loss"] for row in straight.history]
    with pytest.raises(ValueError, match="seed"):
        make_trainer_in(small_run, workdir, num_rounds=4, seed=1)
    # a defining field added since the checkpoint was written matches it at its default only
    run = RunSettings(num_rounds=4, cohort_size=3, batch_size=4, local_steps=2, eval_batch_size=4,
                      max_eval_examples=2)
    config, params, fed, tok = small_run

    def with_meta(meta, defaults):
        return FederatedTrainer(config, params, fed, tok, RandomMoE(experts_per_layer=4),
                                optax.adamw(3e-3, eps=1e-3), run, workdir=workdir, run_meta=meta,
                                run_meta_defaults=defaults)

    meta_dir = str(tmp_path / "meta_run")
    workdir_saved, workdir = workdir, meta_dir
    first = with_meta({"config": {"a": 1}}, None)
    first.run(num_rounds=1, progress=False)
    first.close()
    resumed = with_meta({"config": {"a": 1, "new": 0}}, {"config": {"new": 0}})
    assert resumed.server.round == 1
    resumed.close()
    with pytest.raises(ValueError, match="config"):
        with_meta({"config": {"a": 1, "new": 5}}, {"config": {"new": 0}})
    workdir = workdir_saved
    # compute-only model fields (remat) may change on resume; a field that defines the model may not
    config, params, fed, tok = small_run
    for model, ok in ((config.replace(remat="full"), True), (config.replace(dropout_rate=0.3), False)):
        run = (model, params, fed, tok)
        if ok:
            again = make_trainer_in(run, workdir, num_rounds=4)
            assert again.server.round == 4
            again.close()
        else:
            with pytest.raises(ValueError, match="model"):
                make_trainer_in(run, workdir, num_rounds=4)

    # A damaged latest checkpoint: the run falls back to round 3 with a warning naming step 4,
    # trains round 4 again and ends bit-identical, the damaged step replaced.
    tamper_data(os.path.join(workdir, "checkpoints"), 4)
    with caplog.at_level(logging.WARNING, logger="fedmoe_jax.federated.checkpoint"):
        again = make_trainer_in(small_run, workdir, num_rounds=4)
    assert again.server.round == 3
    assert any("skipping corrupt checkpoint step 4" in r.getMessage() for r in caplog.records)
    again.run(progress=False)
    again.close()
    for a, b in zip(final_state(straight), final_state(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [row["client_train_loss"] for row in read_metrics(workdir)] == losses


def make_trainer_in(small_run, workdir, **settings):
    config, params, fed, tok = small_run
    run = RunSettings(**{"num_rounds": 2, "cohort_size": 3, "batch_size": 4, "local_steps": 2,
                         "eval_batch_size": 4, "max_eval_examples": 2, **settings})
    return FederatedTrainer(config, params, fed, tok, RandomMoE(experts_per_layer=4),
                            optax.adamw(3e-3, eps=1e-3), run, workdir=workdir)


def test_personalized_test_evaluation_uses_each_clients_sub_moe(small_run):
    trainer = make_trainer(small_run, RandomMoE(experts_per_layer=4), eval_every=0)
    trainer.run(num_rounds=1, progress=False)
    result = trainer.evaluate("test", max_examples=4, batch_size=4)
    assert result["split"] == "test" and sorted(result["clients"]) == list(range(6))
    for task, metric in (("tc", "accuracy"), ("rc", "f1"), ("ts", "rouge2")):
        value = result[f"{task}_{metric}"]
        assert 0.0 <= value <= 100.0
        clients = [k for k in range(6) if trainer.data.partition.task_of(k) == task]
        assert value == np.mean([result["clients"][k]["score"] for k in clients])
    # the same client's score equals the cohort validation path on the test split
    maps = trainer.states.expert_maps[[0]]
    from fedmoe_jax.federated.submodel import expert_slots, gather_submodel

    idx, valid = (np.asarray(a) for a in expert_slots(maps, 4))
    narrow = jax.vmap(lambda i: gather_submodel(trainer.server.params, trainer.config, i))(idx)
    scores, _, _ = trainer._validate(np.array([0]), narrow, idx, valid, 4, "test", 4, 4)
    assert scores[0] == result["clients"][0]["score"]


def test_global_model_and_unseen_client_evaluation(small_run):
    trainer = make_trainer(small_run, RandomMoE(experts_per_layer=4), eval_every=0, num_rounds=1)
    trainer.run(progress=False)
    unseen = trainer.unseen_clients()
    assert len(unseen) == 3 and set(unseen).isdisjoint(trainer.history[0]["cohort"])
    own = trainer.evaluate("test", clients=unseen, max_examples=4, batch_size=4)
    tuned = trainer.evaluate("test", clients=unseen, max_examples=4, batch_size=4, local_steps=2)
    full = trainer.evaluate("test", clients=unseen, max_examples=4, batch_size=4, model="global")
    losses = lambda r: [r["clients"][int(k)]["loss"] for k in unseen]  # noqa: E731
    assert losses(own) != losses(tuned)  # fine-tuning changed the models
    assert losses(own) != losses(full)  # the full model differs from the half-expert sub-MoEs
    with pytest.raises(ValueError, match="model="):
        trainer.evaluate("test", model="best")


def test_summary_reports_comm_experts_memory_and_scores(small_run):
    from fedmoe_jax.algorithms.memory import MemoryModel

    trainer = make_trainer(small_run, RandomMoE(experts_per_layer=4), eval_every=0, num_rounds=1)
    trainer.run(progress=False)
    memory = MemoryModel(trainer.config, batch_size=4, input_len=32, target_len=16)
    test = {"split": "test", "clients": {}, "tc_accuracy": 12.5}
    summary = trainer.summary(memory, test)
    row = trainer.history[0]
    assert summary["comm_gib_per_transfer"] == np.mean(row["bytes_down"]) / 2**30
    assert summary["experts_start"] == summary["experts_end"] == {"mean": 8.0, "min": 8, "max": 8}
    one = memory.submodel_bytes(trainer.states.expert_maps[0]) / 1e9
    assert summary["peak_memory_gb"]["max"] == pytest.approx(one)
    assert summary["test"] == {"tc_accuracy": 12.5} and summary["rounds"] == 1
