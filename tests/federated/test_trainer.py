"""The multi-round driver end to end on a small slice of the embedded benchmark."""

import logging
import os

import jax
import numpy as np
import optax
import pytest
from test_run_checkpoint import tamper_data

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
    with caplog.at_level(logging.WARNING, logger="fedmoe_jax.federated.run_checkpoint"):
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
    scores, _, _ = trainer._validate(np.array([0]), narrow, idx, valid, "test", 4, 4)
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


def test_test_evaluation_beam_searches_each_client_with_its_tasks_length_penalty(small_run):
    """`FederatedTrainer(decoding=...)` against the slow obvious path: every kept prediction equals
    `beam_search` of the global model on that example with the length penalty of its client's task."""
    from fedmoe_jax.data.tasks import TASKS
    from fedmoe_jax.models import Decoding, SwitchTransformer, beam_search, greedy_decode

    config, params, fed, tok = small_run
    # the untrained model never says EOS: call EOS a token it emits often, so outputs end at different
    # lengths and the length penalty decides between them
    arrays = fed.client_arrays(0, "test")
    free = np.asarray(greedy_decode(SwitchTransformer(config), params, arrays["inputs"], arrays["input_mask"],
                                    fed.target_len).tokens)
    config = config.replace(eos_token_id=int(np.bincount(free[:, 2:].ravel()).argmax()))
    penalties = (0.0, 1.0, 3.0)
    run = RunSettings(num_rounds=1, cohort_size=3, batch_size=4, local_steps=2, eval_batch_size=4)
    trainer = FederatedTrainer(config, params, fed, tok, RandomMoE(experts_per_layer=4),
                               optax.adamw(3e-3, eps=1e-3), run, decoding=Decoding(2, penalties))
    clients = np.array([0, 2, 4])
    assert sorted(fed.partition.task_of(k) for k in clients) == sorted(TASKS)
    result = trainer.evaluate("test", clients=clients, batch_size=4, model="global", predictions=100)
    model = SwitchTransformer(config)
    for k in clients:
        arrays = fed.client_arrays(int(k), "test")
        out = beam_search(model, params, arrays["inputs"], arrays["input_mask"], num_beams=2,
                          max_length=fed.target_len,
                          length_penalty=penalties[TASKS.index(fed.partition.task_of(int(k)))])
        want = dict(zip(arrays["example_ids"].tolist(), tok.decode(np.asarray(out.tokens))))
        kept = result["clients"][int(k)]["examples"]
        assert len(kept) == len(want)
        assert {e["id"]: e["prediction"] for e in kept} == want


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


def grow(maps, keep=4):
    """`maps <bool>[..., L, E]` plus the lowest experts not held, up to `keep` per layer."""
    out = np.asarray(maps).copy()
    for row in out.reshape(-1, out.shape[-1]):
        row[np.flatnonzero(~row)[: keep - row.sum()]] = True
    return out


class GrowThenShrink(RandomMoE):
    """Two experts per layer; after round 1 every cohort client trains with four (a trial), after
    round 2 it is back to two (a rollback). Holds one extra copy of the parameters (like FedProx)."""

    state_copies = 1

    def update_clients(self, states, report):
        states = super().update_clients(states, report)
        maps = states.expert_maps.copy()
        if report.round == 0:
            maps[report.cohort] = grow(maps[report.cohort])
        elif report.round == 1:
            maps[report.cohort] = self.start[report.cohort]
        return states.replace(expert_maps=maps)

    def initial_expert_maps(self, config, num_clients, seed):
        self.start = super().initial_expert_maps(config, num_clients, seed)
        return self.start


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax, see test_checkpoint
def test_peak_memory_is_the_largest_map_each_client_trained_with(small_run, tmp_path):
    from fedmoe_jax.algorithms.memory import MemoryModel

    config, params, fed, tok = small_run
    run = RunSettings(num_rounds=3, cohort_size=6, batch_size=4, local_steps=1, eval_every=0)

    def trainer():
        return FederatedTrainer(config, params, fed, tok, GrowThenShrink(experts_per_layer=2),
                                optax.adamw(3e-3, eps=1e-3), run, workdir=str(tmp_path))

    t = trainer()
    t.run(progress=False)
    t.close()
    assert [row["expert_counts"] for row in t.history] == [[4] * 6, [8] * 6, [4] * 6]
    assert t.history[1]["layer_expert_counts"] == [[4, 4]] * 6
    start = GrowThenShrink(experts_per_layer=2).initial_expert_maps(config, 6, 0)
    assert np.array_equal(t.states.expert_maps, start)  # rolled back: start and end maps are small
    memory = MemoryModel(config, batch_size=4, input_len=32, target_len=16)
    expected = [memory.submodel_bytes(g, extra_copies=1) / 1e9 for g in grow(start)]
    assert expected[0] > memory.submodel_bytes(start[0], extra_copies=1) / 1e9
    peak = t.summary(memory)["peak_memory_gb"]
    assert peak == {"mean": pytest.approx(np.mean(expected)), "max": pytest.approx(np.max(expected))}
    resumed = trainer()  # the peak comes back from metrics.jsonl
    assert resumed.server.round == 3 and resumed.summary(memory)["peak_memory_gb"] == peak
    resumed.close()


@pytest.mark.parametrize("capacity", [1, 10**6])
def test_rows_log_the_dropped_token_fraction(small_run, capacity):
    config, params, fed, tok = small_run
    t = make_trainer((config.replace(expert_capacity=capacity), params, fed, tok),
                     RandomMoE(experts_per_layer=4), eval_every=0, num_rounds=1)
    prep = t.prepare_round()
    c = len(prep.cohort)
    routing = t._round_step(t.server.params, *prep.cohort_args).routing  # the same round's statistics
    dropped = np.asarray(routing.dropped)[:c].sum(-1)  # [C] over the MoE layers
    routed = np.asarray(routing.tokens_per_expert)[:c].sum((-2, -1))
    row = t.finish_round(prep, t.train_round(prep))
    np.testing.assert_allclose(row["client_dropped_fraction"], dropped / routed, rtol=1e-6)
    assert row["dropped_fraction"] == pytest.approx(dropped.sum() / routed.sum(), rel=1e-6)
    if capacity == 1:
        # one slot per expert and sequence: at most 4 experts x L layers token-choices kept per example
        kept_max = 4 * config.num_moe_layers * prep.weights
        assert np.all(routed * (1 - np.asarray(row["client_dropped_fraction"])) <= kept_max + 1e-3)
        assert row["dropped_fraction"] > 0.5
    else:
        assert row["dropped_fraction"] == 0 and row["client_dropped_fraction"] == [0.0] * c


def test_full_validation_scores_every_client_and_changes_no_state(small_run):
    """Every `full_eval_every` rounds and after the last, each client's own model is validated (not only
    the cohort's); the row's means equal `evaluate("validation")` of the same state, and nothing the
    algorithm keeps changes."""
    trainer = make_trainer(small_run, RandomMoE(experts_per_layer=4), num_rounds=3, full_eval_every=2)
    history = trainer.run(progress=False)
    assert ["full_val_score" in row for row in history] == [False, True, True]  # round 2 and the last
    states = jax.tree.map(np.copy, trainer.states)
    again = trainer.validate_all()
    assert again == {k: v for k, v in history[-1].items() if k.startswith("full_val_score")}
    result = trainer.evaluate("validation", batch_size=trainer.settings.eval_batch_size)
    scores = [r["score"] for r in result["clients"].values()]
    assert len(scores) == trainer.data.num_clients  # every client, sampled or not
    assert again["full_val_score"] == pytest.approx(np.mean(scores))
    tasks = [trainer.data.partition.task_of(k) for k in result["clients"]]
    for task in set(tasks):
        mine = [s for s, t in zip(scores, tasks) if t == task]
        assert again[f"full_val_score_{task}"] == pytest.approx(np.mean(mine))
    for a, b in zip(jax.tree.leaves(states), jax.tree.leaves(trainer.states)):
        np.testing.assert_array_equal(a, b)


def test_evaluation_through_the_round_equals_gathering_and_evaluating(small_run):
    """`evaluate` runs sub-MoEs through the round program (zero weights, validated inside); the slow
    reference gathers every client's sub-MoE outside, fine-tunes it alone and validates it."""
    from fedmoe_jax.federated.submodel import bucket_width, expert_slots, gather_submodel

    trainer = make_trainer(small_run, RandomMoE(experts_per_layer=3))
    trainer.run(progress=False)
    ids = np.arange(trainer.data.num_clients)
    maps = trainer.states.expert_maps
    width = bucket_width(int(maps.sum(-1).max()), trainer.config.num_experts)
    indices, valid = (np.asarray(a) for a in expert_slots(maps, width))
    before = jax.tree.map(np.copy, trainer.server.params)
    for steps in (0, 2):
        fast = trainer.evaluate("test", max_examples=4, batch_size=4, local_steps=steps)
        narrow = jax.vmap(lambda idx: gather_submodel(trainer.server.params, trainer.config, idx))(indices)
        if steps:
            narrow = trainer._fine_tune(ids, narrow, valid, steps)
        _, _, slow = trainer._validate(ids, narrow, indices, valid, "test", 4, 4)
        for k, ref in zip(ids, slow):
            got = fast["clients"][int(k)]
            assert got["score"] == pytest.approx(ref["score"], abs=1e-6), (steps, k)
            assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5), (steps, k)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(trainer.server.params)):
        np.testing.assert_array_equal(a, b)  # evaluation aggregates nothing
