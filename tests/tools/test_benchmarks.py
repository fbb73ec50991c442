"""The round benchmark: hand-counted FLOPs, and every contender against the engine's round."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from fedmoe_jax.models.switch import SwitchConfig
from fedmoe_jax.tools import benchmarks as bm

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_forward_flops_by_hand():
    # 1 encoder block (MoE, 2 experts, top-1) + 1 decoder block (dense); d=4, inner=2, f=8, V=10
    cfg = SwitchConfig(vocab_size=10, d_model=4, d_kv=2, num_heads=1, d_ff=8, num_layers=1,
                       num_decoder_layers=1, encoder_sparse_step=1, decoder_sparse_step=0, num_experts=2)
    s, t = 3, 2
    encoder = 2 * s * 4 * 4 * 2 + 2 * 2 * s * s * 2 + 2 * s * (4 * 2 + 1 * 2 * 4 * 8)  # 192 + 72 + 432
    decoder = (2 * t * 4 * 4 * 2 + 2 * 2 * t * t * 2  # self-attention 128 + 32
               + 2 * (2 * t * 4 * 2 + 2 * s * 4 * 2) + 2 * 2 * t * s * 2  # cross 160 + 48
               + 2 * t * 2 * 4 * 8)  # dense FFN 256
    head = 2 * t * 4 * 10
    assert encoder + decoder + head == 1480
    assert bm.forward_flops(cfg, 1, s, t) == 1480
    assert bm.forward_flops(cfg, 5, s, t) == 5 * 1480
    assert bm.train_flops_per_step(cfg, 1, s, t) == 3 * 1480


def test_sequential_jax_round_equals_the_vectorized_round():
    w = bm.make_workload(bm.PRESETS["tiny"])
    assert len(set(w.maps.sum(-1).ravel().tolist())) > 1  # clients keep different expert counts
    fast, slow = bm.vectorized_round(w)(), bm.sequential_round(w)()
    # AdamW divides by sqrt(v): float32 summation-order noise in a tiny gradient can move a weight by
    # a few 1e-6 (one element of 16384 did in CI); weights here are O(0.1-1).
    for x, y in zip(jax.tree.leaves(fast), jax.tree.leaves(slow)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=2e-5)
    changed = [not np.allclose(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(fast), jax.tree.leaves(w.params))]
    assert any(changed)


def test_torch_round_aggregates_into_the_global_experts():
    """With a zero learning rate nothing trains, so the aggregate must be the global model itself:
    every dense tensor, every held expert (slot -> global index) and its router row."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from fedmoe_jax.checkpoints.hf_switch import to_hf_state
    from fedmoe_jax.tools.benchmarks.torch_reference import torch_round

    preset = bm.PRESETS["tiny"].replace(learning_rate=0.0)
    w = bm.make_workload(preset)
    out = torch_round(w)()
    ref = to_hf_state(preset.model, jax.device_get(w.params))
    held = w.maps.any(0)  # [L, E]
    layers = {name: i for i, name in enumerate(preset.model.moe_layer_names)}
    checked = 0
    for name, value in ref.items():
        if ".experts.expert_" in name:
            stack, block = name.split(".")[0], int(name.split(".")[2])
            e = int(name.split("experts.expert_")[1].split(".")[0])
            if not held[layers[(stack, block)], e]:
                assert name not in out
                continue
        if "router.classifier" in name:
            stack, block = name.split(".")[0], int(name.split(".")[2])
            for e in np.flatnonzero(held[layers[(stack, block)]]):
                np.testing.assert_allclose(out[f"{name}#{e}"], value[e], rtol=1e-6, atol=1e-7)
                checked += 1
            continue
        np.testing.assert_allclose(out[name], value, rtol=1e-6, atol=1e-7)
        checked += 1
    assert checked > 40


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_round_computes_in_the_model_dtype(dtype):
    """`--model dtype=bfloat16` reaches pytorch_hf too: its linear layers compute in the preset's dtype
    (torch.autocast) while the aggregated weights stay float32."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from fedmoe_jax.tools.benchmarks.torch_reference import torch_round

    preset = bm.PRESETS["tiny"].replace(local_steps=1)
    preset = preset.replace(model=preset.model.replace(dtype=dtype))
    round_fn = torch_round(bm.make_workload(preset))
    seen = set()
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: seen.add(out.dtype) if isinstance(module, torch.nn.Linear) else None)
    try:
        out = round_fn()
    finally:
        hook.remove()
    want = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    assert want in seen and (dtype == "float32") == (seen == {torch.float32})
    assert all(v.dtype == np.float32 for v in out.values())


def test_client_training_memory_grows_with_kept_experts():
    preset = bm.PRESETS["tiny"]
    two, eight = bm.client_training_bytes(preset, 2), bm.client_training_bytes(preset, 8)
    assert 0 < two["argument"] < eight["argument"] and two["total"] < eight["total"]


def test_cli_writes_json_and_markdown(tmp_path):
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    res = subprocess.run([sys.executable, "experiments/benchmark.py", "--preset=tiny", "--rounds=1",
                          "--contenders=vectorized", "--peak_n=128", "--model=capacity_factor=1.5",
                          f"--profile={tmp_path / 'trace'}",
                          f"--out={out}",
                          f"--md={md}"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["client_steps_per_s"]) == {"vectorized"} and result["ratios"] == {}
    assert result["client_steps_per_s"]["vectorized"] > 0 and result["matmul_peak_flops"] > 0
    assert 0 < result["mfu"]["vectorized"] and result["contenders"]["vectorized"]["peak_rss_mb"] > 0
    assert result["client_memory"]["ratio"] < 1
    ops = result["contenders"]["vectorized"]["op_breakdown"]
    assert sum(ops["share"].values()) == pytest.approx(1.0) and ops["ms"]["matmul"] > 0
    assert os.path.exists(ops["trace"]) and str(tmp_path / "trace" / "vectorized") in ops["trace"]
    assert "XLA op time per category" in md.read_text()
    assert (result["peak_n"], result["peak_dtype"]) == (128, "float32")  # the tiny preset computes in f32
    assert "128x128 float32 matmul chain" in md.read_text()
    assert result["model_overrides"] == {"capacity_factor": 1.5}
    assert result["contenders"]["vectorized"]["model"] == {"capacity_factor": 1.5}
    assert "| vectorized |" in md.read_text() and "with capacity_factor=1.5" in md.read_text()
    bad = subprocess.run([sys.executable, "experiments/benchmark.py", "--contenders=numpy"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "unknown contender" in bad.stderr
    from fedmoe_jax.tools.benchmarks.cli import BenchmarkError, model_overrides

    for item, says in (("nope=1", "SwitchConfig field"), ("dtype=float64", "dtype"),
                       ("num_experts=many", "not a valid num_experts")):
        # in process: the exit-2 line of a BenchmarkError is checked for the CLI just above
        with pytest.raises(BenchmarkError, match=says):
            model_overrides([item], bm.PRESETS["tiny"].model)


@pytest.mark.parametrize("cmd, says", [
    (["experiments/benchmark.py", "--bogus=1"], "bogus"),
    (["experiments/benchmark.py", "--preset=huge"], "--preset"),
    (["experiments/benchmark.py", "--rounds=many"], "--rounds"),
    (["experiments/benchmark.py", "--scaling=cohort:a,b"], "--scaling"),
    (["experiments/benchmark.py", "--scaling=clients:30,1000", "--cohort=31"], "smallest client count 30"),
    (["experiments/benchmark.py", "--scaling=clients:30", "--method=fedsgd"], "--method"),
    (["experiments/benchmark.py", "stray"], "unexpected arguments"),
    (["experiments/benchmark_runs.py", "--bogus=1"], "bogus"),
    (["experiments/benchmark_runs.py", "--seeds=0"], "--seeds"),
    (["experiments/benchmark_runs.py", "--config=configs/nowhere.py"], "not found"),
    (["experiments/benchmark_runs.py", "--set=not_a_key=1"], "not_a_key"),
    (["-m", "fedmoe_jax.tools.benchmarks.cli", "--child=numpy", "--preset=tiny"], "unknown contender"),
    (["-m", "fedmoe_jax.tools.benchmarks.cli", "--preset=tiny"], "--child"),
    (["experiments/benchmark_experts.py", "--block_rows=big"], "--block_rows"),
    (["experiments/benchmark_experts.py", "--experts=0"], ">= 1"),
    (["experiments/benchmark_experts.py", "--bogus=1"], "bogus"),
])
def test_bad_flags_exit_2_with_one_line(cmd, says):
    """Nothing is measured: every command line rejects bad input before any compute."""
    bad = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and says in bad.stderr, bad.stderr[-500:]
    assert len(bad.stderr.strip().splitlines()) == 1


def test_op_categories_and_breakdown_by_hand():
    cases = {"dot.1": "matmul", "ynn_fusion.3": "matmul", "copy.2": "copy/layout",
             "copy_bitcast_fusion": "copy/layout", "broadcast_add_fusion.1": "elementwise/reduce",
             "wrapped_reduce.4": "elementwise/reduce", "copy_gather_fusion": "gather/scatter",
             "scatter.3": "gather/scatter", "custom-call.1": "other",
             "ThunkExecutor::Execute": None, "SlinkyThreadPool::Await": None, "end: copy": None,
             "call": None, "while.2": None}
    assert {n: bm.op_category(n) for n in cases} == cases
    meta = [{"ph": "M", "name": "thread_name", "pid": 1, "tid": t, "args": {"name": n}}
            for t, n in ((1, "tf_XLAEigen/1"), (2, "tf_XLAEigen/2"), (3, "python"))]
    ops = [("dot.1", 1, 3000), ("dot.2", 2, 1000), ("copy.1", 1, 2000), ("add_fusion", 2, 4000),
           ("call", 1, 9000), ("ThunkExecutor::Execute", 2, 9000), ("dot.3", 3, 50000)]  # python: ignored
    events = meta + [{"ph": "X", "name": n, "pid": 1, "tid": t, "dur": d} for n, t, d in ops]
    b = bm.op_breakdown(events)
    assert b["ms"] == {"matmul": 4.0, "gather/scatter": 0.0, "copy/layout": 2.0,
                       "elementwise/reduce": 4.0, "other": 0.0}
    assert b["total_ms"] == 10.0 and b["share"]["matmul"] == 0.4
    assert b["top"][0] == ("dot", 4.0)


def test_markdown_shows_device_memory_only_on_accelerators():
    """Accelerators report their allocator's peak (`device_peak_mb`, from `memory_stats`); CPU runs
    keep the table without that column; a --scaling-only run (no contender timed) has no table."""
    from fedmoe_jax.tools.benchmarks import cli

    row = {"client_steps_per_s": 2.0, "round_s": 0.5, "first_round_s": 9.0, "peak_rss_mb": 700.0}
    result = {"preset": "gpu", "device": "1 x H200", "machine": "x86_64, 16 cores",
              "contenders": {"vectorized": {**row, "mfu": 0.4, "device_peak_mb": 2048.0}, "pytorch_hf": row}}
    md = cli.markdown(result)
    assert "| MFU | peak RSS MB | device peak MB |\n|---|---:|---:|---:|---:|---:|---:|" in md
    assert "| vectorized | 2.00 | 0.500 | 9.0 | 40.0 % | 700 | 2048 |" in md
    assert "| pytorch_hf | 2.00 | 0.500 | 9.0 | — | 700 | — |" in md
    del result["contenders"]["vectorized"]["device_peak_mb"]
    assert "device peak" not in cli.markdown(result)
    scaling_only = {**result, "contenders": {},
                    "scaling": [{"axis": "cohort", "value": 64, "round_s": 36.0, "client_steps_per_s": 7.1}]}
    md = cli.markdown(scaling_only)
    assert "| contender |" not in md and "- scaling cohort=64: 36.000 s/round, 7.10 client-steps/s" in md


def test_compile_events_count_what_a_call_compiles():
    from fedmoe_jax.tools.benchmarks.profiling import compile_events

    f = jax.jit(lambda x: x * 3.0 + 1.0)
    x = np.ones(7, np.float32)  # a shape no other test compiles this function with
    with compile_events() as first:
        f(x).block_until_ready()
    with compile_events() as again:
        f(x).block_until_ready()  # cached: nothing traced or compiled
    assert first["traces"] >= 1 and first["compiles"] >= 1 and first["compile_s"] > 0
    assert again["traces"] == 0 and again["compiles"] == 0


def test_hf_capacity_drops_nothing_under_dropless_dispatch():
    from fedmoe_jax.tools.benchmarks.torch_reference import hf_capacity

    p = bm.PRESETS["tiny"]  # dropless, as the CPU-scale experiments
    capacity = bm.make_workload(p.replace(model=p.model.replace(dispatch="capacity")))
    # capacity factor 2 of S = 4 slots over 8 input tokens: ceil(2 * 8 / 4) = 4 per expert and sequence
    assert hf_capacity(capacity) == 4
    assert hf_capacity(bm.make_workload(p)) == max(p.input_len, p.target_len) == 8


def test_expert_paths_time_every_contender():
    from fedmoe_jax.tools.benchmarks.expert_paths import markdown, time_paths

    results = time_paths(2, 8, 8, 16, 4, block_rows=(0, 4), repeats=1)
    assert [r.name for r in results] == ["capacity(cf=2)", "ragged", "blocks(G=auto)", "blocks(G=4)"]
    assert all(r.ms > 0 and r.flops > 0 for r in results)
    # the routed tokens' expert FLOPs, forward + backward: 3 x 2 matmuls x 2 FLOPs x N x D x F
    assert results[0].model_flops == 3 * 2 * 2 * (2 * 8) * 8 * 16
    assert "| blocks(G=4) |" in markdown(results, "tiny")


def test_registered_clients_round_keeps_client_data_and_reports_state():
    """The clients axis: every N gives its clients about the same examples (so only N changes), the
    round is timed without the all-client validation, and the state bytes are the trainer's own."""
    from fedmoe_jax.tools.benchmarks.clients import client_data, registered_clients_round

    # ceil(2 N / 5) TC clients (two TC, one RC, two TS per five), 4 train / 1 eval example each
    assert client_data(30)["data.train_examples_per_task"] == 48
    assert client_data(10_000)["data.eval_examples_per_task"] == 4000
    out = registered_clients_round(6, 3, "scaffold", rounds=1, warmup=0)
    assert out["clients"] == 6 and out["cohort"] == 3 and out["round_s"] > 0
    assert out["client_steps_per_s"] == pytest.approx(3 * 2 / out["round_s"])  # tiny: 2 local steps
    # SCAFFOLD's c_i: one float32 copy of the run's model per client; a full-model baseline, it trains
    # switch-tiny-4 narrowed to configs/tiny.py's model.baseline_num_experts = 2 experts
    from fedmoe_jax.data import embedded_tokenizer
    from fedmoe_jax.models import SwitchTransformer, get_config

    cfg = get_config("switch-tiny-4", vocab_size=embedded_tokenizer().vocab_size, num_experts=2)
    ids = jax.numpy.ones((1, 8), "int32")
    shapes = jax.eval_shape(lambda: SwitchTransformer(cfg).init(jax.random.key(0), ids, ids)["params"])
    entries = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))
    assert out["client_state_bytes"]["model_copies"] == 6 * entries * 4


def test_markdown_of_the_clients_axis():
    from fedmoe_jax.tools.benchmarks import cli

    row = {"axis": "clients", "value": 10000, "round_s": 0.5, "client_steps_per_s": 96.0, "method": "fedmoe",
           "cohort": 24, "setup_s": 54.6, "peak_rss_mb": 1260.0,
           "client_state_bytes": {"metadata": 610_000, "model_copies": 3 * 2**20}}
    md = cli.markdown({"preset": "cpu-small", "device": "1 x cpu", "machine": "x86_64, 2 cores",
                       "contenders": {}, "scaling": [row]})
    assert md.startswith("### `configs/tiny.py` with registered clients on 1 x cpu")
    assert ("- scaling clients=10000: 0.500 s/round, 96.00 client-steps/s (fedmoe, cohort 24; set-up 54.6 s; "
            "client state 0.58 MiB metadata + 3.0 MiB model copies; peak RSS 1260 MB)") in md
