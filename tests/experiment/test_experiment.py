"""Pieces of `fedmoe_jax.experiment` with hand-checked values (the CLI end to end: test_main.py)."""

import collections

import numpy as np
import pytest

from fedmoe_jax.algorithms.memory import max_expert_totals
from fedmoe_jax.experiment.build import (
    client_budgets,
    load_task_data,
    load_tokenizer,
    params_fingerprint,
    pretrain_steps,
    runtime_overrides,
    shipped_data_dir,
    subsample,
)
from fedmoe_jax.experiment.config import ConfigError, default_config
from fedmoe_jax.experiment.run import finished_summary


def test_subsample_is_a_seed_independent_random_sample():
    c = default_config()
    c.data.source = "embedded"  # 45 classes, files sorted by part of speech: a prefix would be one label
    c.data.train_examples_per_task, c.data.eval_examples_per_task = 300, 200
    data = load_task_data(c)
    assert {s: len(d) for s, d in data["tc"].items()} == {"train": 300, "validation": 200, "test": 200}
    labels = collections.Counter(data["tc"]["validation"].targets[i] for i in range(200))
    assert len(labels) >= 20
    other_seed = default_config()
    other_seed.seed = 5
    again = subsample(load_task_data(other_seed)["tc"]["train"], 7, (0, 0))
    first = subsample(load_task_data(default_config())["tc"]["train"], 7, (0, 0))
    assert list(again.inputs) == list(first.inputs)
    whole = data["rc"]["test"]
    assert subsample(whole, None, (1, 2)) is whole and subsample(whole, 10**6, (1, 2)) is whole


def test_data_sources_read_their_shipped_folders_and_name_their_models(monkeypatch):
    """`data.source`: "benchmark" reads fedmoe_jax/data/benchmark (10 coarse topics, Debian summaries)
    with its own tokenizer and 30,000-step models; "embedded" the WordNet-only folder (45 categories,
    3,000-step models); `data.dir` replaces either folder."""
    from fedmoe_jax import pretrain
    from fedmoe_jax.data import benchmark_dir, embedded_tokenizer
    from fedmoe_jax.data.benchmark import COARSE_NAMES
    from fedmoe_jax.data.span_corruption import tokenizer_fingerprint
    from fedmoe_jax.experiment import initial_params
    from fedmoe_jax.experiment.build import model_config

    c = default_config()
    c.data.train_examples_per_task, c.data.eval_examples_per_task = 40, 20
    bench, wordnet = c.copy_and_resolve_references(), c.copy_and_resolve_references()
    bench.data.source, wordnet.data.source = "benchmark", "embedded"
    assert shipped_data_dir(bench) == benchmark_dir() and shipped_data_dir(wordnet) is None
    assert (pretrain_steps(bench), pretrain_steps(wordnet)) == (30000, 3000)
    data, old = load_task_data(bench), load_task_data(wordnet)
    assert data["tc"]["train"].label_names == COARSE_NAMES and len(old["tc"]["train"].label_names) == 45
    assert all(x.startswith("summarize: ") for x in data["ts"]["test"].inputs)
    assert set(data["ts"]["test"].inputs).isdisjoint(old["ts"]["test"].inputs)
    tokens = {k: tokenizer_fingerprint(load_tokenizer(cfg)) for k, cfg in (("b", bench), ("e", wordnet))}
    assert tokens == {"b": tokenizer_fingerprint(embedded_tokenizer(benchmark_dir())),
                      "e": tokenizer_fingerprint(embedded_tokenizer())}
    # an explicit data.dir wins (here: the benchmark's folder under source="embedded")
    wordnet.data.dir = benchmark_dir()
    assert shipped_data_dir(wordnet) == benchmark_dir() and pretrain_steps(wordnet) == 3000
    # the model looked up is pretrained on the source's corpus and tokenizer for its steps
    looked_up = []
    monkeypatch.setattr(pretrain, "pretrained_params", lambda cfg, steps, data_dir, **kw: looked_up.append(
        (steps, data_dir)) or {})
    for config in (bench, wordnet, default_config()):
        initial_params(config, model_config(config, load_tokenizer(config), False), False, progress=False)
    # the default is the benchmark
    assert looked_up == [(30000, benchmark_dir()), (3000, benchmark_dir()), (30000, benchmark_dir())]
    bench.model.pretrain_steps = 7
    assert pretrain_steps(bench) == 7


class _Memory:
    """A memory model with round numbers: dense 100 B, experts 10 B per layer, full model 420 B."""

    dense_bytes = 100.0
    expert_bytes = np.array([10.0, 10.0])

    def full_model_bytes(self):
        return 420.0


def test_max_expert_totals_by_hand():
    # the whole budget: 300 - 100 = 200 -> 20 experts; 105 - 100 = 5 -> 0; 1000 - 100 = 900 -> 90
    np.testing.assert_array_equal(max_expert_totals(_Memory(), np.array([300.0, 105.0, 1000.0])),
                                  [20, 0, 90])


def test_stage2_grows_a_stage1_client_into_its_reserve_up_to_the_budget():
    """Stage 1 fills alpha * M; Stage 2 may grow the client into the rest, up to M and no further."""
    from fedmoe_jax.algorithms.fedmoe import FedMoE
    from fedmoe_jax.algorithms.fedmoe.stage1 import initial_maps
    from fedmoe_jax.federated.state import ClientStates

    memory = _Memory()  # dense 100 B, 10 B per expert, 2 layers
    budgets = np.array([200.0, 400.0, 400.0, 400.0])
    probs = np.full((4, 2, 8), 1 / 8)  # uniform: the search keeps whatever the budget holds
    maps, _ = initial_maps(probs, memory, budgets, mem_fraction=0.8)
    # client 0: 0.8 * 200 - 100 = 60 B -> 6 experts; the others 0.8 * 400 - 100 = 220 B -> 16 (all)
    assert maps.sum((1, 2)).tolist() == [6, 16, 16, 16]
    caps = max_expert_totals(memory, budgets)
    assert caps[0] == 10  # M = 200 B holds 10 experts beside the dense part
    algo = FedMoE(maps, patience=1, num_references=3, max_experts=caps, initial_probs=probs)
    states = ClientStates.create(maps, algo.init_extra(4, None), algo.initial_profiles(None, 4))
    report = _report(0, [0], [50.0], probs[:1])
    states = algo.update_clients(states, report)
    states = algo.update_clients(states, _report(1, [0], [40.0], probs[:1]))  # stale: recommend
    # references hold 16 experts each; client 0 grows to its budget's 10, not 16 and not 6
    assert states.expert_maps[0].sum() == 10 and algo.events[-1]["event"] == "adjust"
    assert memory.dense_bytes + 10 * 10.0 <= budgets[0]


def _report(round_num, cohort, scores, probs):
    from fedmoe_jax.algorithms import CohortReport

    c = len(cohort)
    return CohortReport(round_num, np.asarray(cohort), np.zeros(c), np.ones(c),
                        np.asarray(scores, np.float32), np.asarray(probs, np.float32))


def test_client_budgets_relative_and_absolute():
    c = default_config()
    c.data.num_clients = 50
    c.memory.budget_low, c.memory.budget_high, c.memory.budget_step = 0.5, 0.7, 0.1
    rel = client_budgets(c, _Memory())
    assert set(np.round(rel / 420.0, 6)) <= {0.5, 0.6, 0.7} and len(set(np.round(rel, 6))) == 3
    c.memory.relative = False
    c.memory.budget_low, c.memory.budget_high, c.memory.budget_step = 18.0, 24.0, 1.0
    gb = client_budgets(c, _Memory()) / 1e9
    assert set(np.round(gb, 6)) <= set(range(18, 25)) and gb.min() >= 18 and gb.max() <= 24


def test_runtime_overrides():
    c = default_config()
    assert runtime_overrides(c) == {"capacity_factor": 2.0, "expert_capacity": None, "dispatch": "dropless"}
    c.model.capacity_factor, c.model.expert_capacity = 0.0, 32
    c.model.dispatch, c.model.dropout_rate = "capacity", 0.0
    assert runtime_overrides(c) == {"expert_capacity": 32, "dispatch": "capacity", "dropout_rate": 0.0}


def test_params_fingerprint_sees_one_bit_and_not_dict_order():
    import hashlib

    a = {"x": np.arange(3, dtype=np.float32), "y": {"z": np.ones((2, 2), np.float32)}}
    b = {"y": {"z": np.ones((2, 2), np.float32)}, "x": np.arange(3, dtype=np.float32)}
    assert params_fingerprint(a) == params_fingerprint(b) and len(params_fingerprint(a)) == 16
    flipped = a["x"].copy()
    flipped.view(np.uint32)[1] ^= 1  # the last mantissa bit of 1.0
    assert params_fingerprint({**a, "x": flipped}) != params_fingerprint(a)
    assert params_fingerprint({**a, "x": a["x"].reshape(3, 1)}) != params_fingerprint(a)  # shape counts
    # by hand: path, dtype and shape, then the bytes, leaves in path order
    h = hashlib.sha256()
    for path, arr in (("['x']", a["x"]), ("['y']['z']", a["y"]["z"])):
        h.update(f"{path}:{arr.dtype}:{arr.shape};".encode())
        h.update(arr.tobytes())
    assert params_fingerprint(a) == h.hexdigest()[:16]


def test_finished_summary(tmp_path):
    assert finished_summary(str(tmp_path), 3) is None
    (tmp_path / "summary.json").write_text('{"rounds": 3, "method": "fedmoe"}')
    assert finished_summary(str(tmp_path), 3) == {"rounds": 3, "method": "fedmoe"}
    assert finished_summary(str(tmp_path), 2)["rounds"] == 3
    assert finished_summary(str(tmp_path), 4) is None  # more rounds asked for: the run goes on
    (tmp_path / "summary.json").write_text('{"rounds": 3')
    with pytest.raises(ConfigError, match="unreadable"):
        finished_summary(str(tmp_path), 3)


def test_seeds_vectorized_write_one_run_each_and_skip_when_finished(tmp_path):
    import json

    from configs.tiny import get_config
    from fedmoe_jax.experiment import run_experiments, vectorizable

    config = get_config("random_moe")  # no Stage 1: the vectorized rounds are what is tested here
    config.num_rounds = 2
    config.eval.global_model = False
    config.eval.unseen_local_steps = 0
    config.mesh.enabled = False  # the tests' 8 host devices would shard the cohort instead
    assert vectorizable(config) is None
    workdirs = [str(tmp_path / f"seed={s}") for s in (0, 3)]
    results = run_experiments(config, [0, 3], workdirs, progress=False)
    assert [r["seed"] for r in results] == [0, 3] and all(r["rounds"] == 2 for r in results)
    for w, seed in zip(workdirs, (0, 3)):
        with open(f"{w}/config.json") as f:
            assert json.load(f)["seed"] == seed
        assert len(open(f"{w}/metrics.jsonl").read().splitlines()) == 2
    # seeds differ in their partitions and cohorts
    first = [json.loads(open(f"{w}/metrics.jsonl").readline())["cohort"] for w in workdirs]
    assert first[0] != first[1]
    again = run_experiments(config, [0, 3], workdirs, progress=False)  # finished: read back, not rerun
    assert [r["wall_seconds"] for r in again] == [r["wall_seconds"] for r in results]
    assert "personal models" in vectorizable(get_config("local"))
    assert "several devices" in vectorizable(get_config("fedmoe"))  # mesh on, 8 test devices


def test_fedavg_ft_is_fedavg_then_each_client_fine_tunes_before_its_test(tmp_path):
    """FedAvg + FT trains FedAvg's global model (the full model is every client's own model, so
    `global_test` is what FedAvg scores) and tests each client's copy of it after `fedavg_ft.local_steps`
    steps on the client's own training data: kept "own" predictions are the fine-tuned models',
    "global" ones the global model's."""
    import json

    from configs.tiny import get_config
    from fedmoe_jax.algorithms.registry import get_method
    from fedmoe_jax.experiment import run_experiment
    from fedmoe_jax.experiment.run import fine_tune_steps

    config = get_config("fedavg_ft")
    config.num_rounds, config.eval.unseen_local_steps, config.mesh.enabled = 1, 0, False
    config.fedavg_ft.local_steps = 3
    tuned = run_experiment(config, str(tmp_path), progress=False)
    assert tuned["fine_tune_steps"] == 3 and set(tuned["global_test"]) == set(tuned["test"])
    assert get_method("fedavg_ft").full_model and type(get_method("fedavg_ft").build(None)) is type(
        get_method("fedavg").build(None))  # FedAvg's algorithm: the same training
    records = {(r["client"], r["id"], r["model"]): r["prediction"]
               for r in map(json.loads, open(tmp_path / "predictions.jsonl"))}
    own = {k[:2]: v for k, v in records.items() if k[2] == "own"}
    assert own and all(k + ("global",) in records for k in own)
    # the fine-tuned models answer differently from the global model on some kept test example
    assert any(v != records[k + ("global",)] for k, v in own.items())
    assert get_config("fedavg_ft").fedavg_ft.local_steps == 0  # 0: one round's local_steps
    _check_fine_tune_curve(tmp_path, tuned)
    assert fine_tune_steps(get_config("fedavg_ft")) == get_config().local_steps
    assert fine_tune_steps(get_config("fedavg")) == 0


def _check_fine_tune_curve(run_dir, tuned):
    """`fine_tune_curve` of the finished FedAvg + FT run: 0 steps score the global model (the run's
    `global_test`), the run's own 3 steps reproduce its `test` exactly, another learning rate changes
    the fine-tuned models' test losses and not the untuned ones, and the run directory is left byte
    for byte."""
    import hashlib

    from fedmoe_jax.errors import ConfigError
    from fedmoe_jax.tools.fine_tune_curve import curve_table, fine_tune_curve

    def digest():
        return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(run_dir.rglob("*")) if p.is_file()}

    before = digest()
    curve = fine_tune_curve(str(run_dir), [0, 3])
    scores = [{k: v for k, v in row.items() if k not in ("steps", "clients")} for row in curve["curve"]]
    assert scores == [tuned["global_test"], tuned["test"]]
    assert curve["run_fine_tune_steps"] == 3 and curve["learning_rate"] == tuned["config"]["learning_rate"]
    assert "| 3 |" in curve_table(curve)
    slow = fine_tune_curve(str(run_dir), [0, 3], learning_rate=1e-6)
    losses = [{c: r["loss"] for c, r in row["clients"].items()} for row in (*curve["curve"], *slow["curve"])]
    assert losses[2] == losses[0] and losses[3] != losses[1]  # 0 steps: the rate does not matter
    assert digest() == before
    with pytest.raises(ConfigError, match="step counts >= 0"):
        fine_tune_curve(str(run_dir), [-1])
    unfinished = run_dir / "unfinished"  # after the digest: the run directory is not read again
    unfinished.mkdir()
    (unfinished / "config.json").write_bytes((run_dir / "config.json").read_bytes())
    with pytest.raises(ConfigError, match="holds no finished run"):
        fine_tune_curve(str(unfinished), [0])
    (unfinished / "summary.json").write_bytes((run_dir / "summary.json").read_bytes())
    with pytest.raises(ConfigError, match="has no checkpoint of its final round 1"):
        fine_tune_curve(str(unfinished), [0])  # an exported run: its config and summary, no checkpoints
    with pytest.raises(ConfigError, match="has no config.json"):
        fine_tune_curve(str(unfinished / "nothing"), [0])


def test_fine_tune_curve_of_personal_models_follows_the_learning_rate(tmp_path):
    """Local training keeps personal models (no server): `set_local_optimizer` reaches their fine-tuning
    too. 0 steps score the run's own test result whatever the rate; 2 steps at two rates differ."""
    from configs.tiny import get_config
    from fedmoe_jax.experiment import run_experiment
    from fedmoe_jax.tools.fine_tune_curve import fine_tune_curve

    config = get_config("local")
    config.num_rounds, config.eval.unseen_local_steps, config.mesh.enabled = 1, 0, False
    summary = run_experiment(config, str(tmp_path), progress=False)
    own, slow = (fine_tune_curve(str(tmp_path), [0, 2], learning_rate=lr) for lr in (None, 1e-6))
    assert {k: v for k, v in own["curve"][0].items() if k not in ("steps", "clients")} == summary["test"]
    losses = [{c: r["loss"] for c, r in row["clients"].items()} for row in (*own["curve"], *slow["curve"])]
    assert losses[2] == losses[0] and losses[3] != losses[1]
