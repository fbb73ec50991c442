"""The side-by-side round benchmark: our vectorized engine vs the same work client after client.

Every contender trains the same round: C clients, each with its own sub-MoE (a random subset of
`kept` experts per MoE layer, gathered to the same S slots), K local AdamW steps on its own batches
`[K, B, S_in]` / `[K, B, T]`, then modular aggregation. Contenders:

- `vectorized`: `make_round_step` (the cohort vmapped, sharded over a `clients` mesh axis when there
  are several devices): one compiled program per round.
- `sequential_jax`: the same local training (`make_local_train`) jitted for one client and called
  client after client, then the same aggregation (how FedJAX's default backend and most simulators
  run a round). Its result equals the vectorized one (tested).
- `pytorch_hf`: Hugging Face `SwitchTransformersForConditionalGeneration` (torch, eager), each
  client's experts copied into an S-expert model, trained client after client with
  `torch.optim.AdamW`, then averaged (the paper's own stack; `fedmoe_jax.benchmark_torch`).

Figures: client-steps per second (median over timed rounds after warm-up), round seconds, the first
(compiling) round, model FLOPs (`train_flops_per_step`: forward + backward = 3x the forward matmul
FLOPs of the useful work, top-k tokens per expert, no padding) and MFU against `matmul_peak`, the
FLOP/s of a large jitted matmul on the same machine.

Shape letters: C clients, K local steps, B batch, S_in / T input / target tokens, L MoE layers,
E experts, S slots.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedmoe_jax.federated.client import make_local_train
from fedmoe_jax.federated.loop import make_round_step
from fedmoe_jax.federated.sharding import make_mesh, pad_clients, padded_cohort_size, shard_cohort
from fedmoe_jax.federated.submodel import (
    bucket_width,
    cohort_sums,
    expert_slots,
    finalize_aggregate,
    gather_submodel,
    narrow_config,
    zero_cohort_sums,
)
from fedmoe_jax.models.switch import SwitchConfig, SwitchTransformer

PyTree = Any
CONTENDERS = ("vectorized", "sequential_jax", "pytorch_hf")


@dataclasses.dataclass(frozen=True)
class Preset:
    """One benchmark workload (model dims, round shape, sub-MoE sizes)."""

    model: SwitchConfig
    batch_size: int
    input_len: int
    target_len: int
    cohort_size: int
    local_steps: int
    min_kept: int  # experts each client keeps per MoE layer, drawn uniformly in [min_kept, max_kept]
    max_kept: int
    learning_rate: float = 1e-3

    def replace(self, **changes: Any) -> Preset:
        return dataclasses.replace(self, **changes)


def _small(**model: Any) -> SwitchConfig:
    # capacity_factor 2 of the sub-MoE's slots (the CPU-scale experiments' setting); HF's absolute
    # expert_capacity is kept equal to it by the torch contender.
    base = dict(vocab_size=4096, d_model=128, d_kv=32, d_ff=512, num_heads=4, num_layers=4,
                num_decoder_layers=4, num_experts=16, expert_capacity=None, capacity_factor=2.0)
    return SwitchConfig(**{**base, **model})


PRESETS: dict[str, Preset] = {
    # Fixed so that figures stay comparable across commits.
    "cpu-small": Preset(_small(), batch_size=16, input_len=64, target_len=16, cohort_size=8,
                        local_steps=4, min_kept=4, max_kept=8),
    "cpu-medium": Preset(_small(d_model=256, d_ff=1024, num_heads=8, num_layers=6, num_decoder_layers=6,
                                num_experts=32), batch_size=16, input_len=128, target_len=32,
                         cohort_size=8, local_steps=4, min_kept=8, max_kept=16),
    # A few seconds: tests and smoke runs of the benchmark itself.
    "tiny": Preset(_small(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2,
                          num_decoder_layers=2, num_experts=8, relative_attention_num_buckets=8,
                          relative_attention_max_distance=16), batch_size=2, input_len=8, target_len=4,
                   cohort_size=3, local_steps=2, min_kept=2, max_kept=4),
    # switch-base-32 dims in bf16 (paper-like); for accelerators.
    "gpu": Preset(SwitchConfig(num_experts=32, vocab_size=32128, expert_capacity=None, capacity_factor=2.0,
                               dtype="bfloat16"),
                  batch_size=8, input_len=512, target_len=64, cohort_size=8, local_steps=4,
                  min_kept=8, max_kept=16),
}


# ---------------------------------------------------------------------------------------------
# FLOPs and the machine's peak
# ---------------------------------------------------------------------------------------------
def forward_flops(config: SwitchConfig, batch: int, input_len: int, target_len: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of one forward pass over `batch` examples.

    Counts the useful work: attention projections and scores, dense FFNs, each token's top-k experts
    and the router, and the LM head; not capacity padding, norms, softmax or the embedding lookup.
    """
    d, f, inner, e, k = config.d_model, config.d_ff, config.num_heads * config.d_kv, config.num_experts, \
        config.top_k
    s, t = input_len, target_len
    ffn_width = 3 if config.gated_ffn else 2  # wi (+ wi_1), wo

    def ffn(tokens: int, sparse: bool) -> float:
        if sparse:
            return 2.0 * tokens * (d * e + k * ffn_width * d * f)  # router + top-k experts
        return 2.0 * tokens * ffn_width * d * f

    total = 0.0
    for i in range(config.num_layers):
        total += 2.0 * s * 4 * d * inner + 2.0 * 2 * s * s * inner  # q k v o; scores and mix
        total += ffn(s, i in config.encoder_moe_blocks)
    for i in range(config.num_decoder_layers):
        total += 2.0 * t * 4 * d * inner + 2.0 * 2 * t * t * inner  # self-attention
        total += 2.0 * (2 * t * d * inner + 2 * s * d * inner) + 2.0 * 2 * t * s * inner  # cross
        total += ffn(t, i in config.decoder_moe_blocks)
    total += 2.0 * t * d * config.vocab_size  # LM head (tied embedding)
    return batch * total


def train_flops_per_step(config: SwitchConfig, batch: int, input_len: int, target_len: int) -> float:
    """Forward + backward model FLOPs of one training step (3x the forward)."""
    return 3.0 * forward_flops(config, batch, input_len, target_len)


def matmul_peak(n: int = 1024, dtype: Any = jnp.float32, repeats: int = 10, trials: int = 5) -> float:
    """FLOP/s of the best of `trials` timings of a jitted chain of `repeats` [n, n] matmuls."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)) / np.sqrt(n), dtype)

    @jax.jit
    def chain(a):
        def body(_, b):
            return (b @ a).astype(dtype)
        return jax.lax.fori_loop(0, repeats, body, a)

    chain(x).block_until_ready()
    best = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        chain(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 * repeats / best


# ---------------------------------------------------------------------------------------------
# The workload
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Workload:
    """A round's inputs, shared by every contender (host numpy arrays)."""

    preset: Preset
    params: PyTree  # global parameters (E experts)
    maps: np.ndarray  # <bool>[C, L, E]
    width: int  # S
    indices: np.ndarray  # <int32>[C, L, S]
    valid: np.ndarray  # <bool>[C, L, S]
    batches: dict[str, np.ndarray]  # [C, K, B, ...]
    step_mask: np.ndarray  # <bool>[C, K]
    weights: np.ndarray  # <f32>[C]
    seed: int

    @property
    def narrow_config(self) -> SwitchConfig:
        return narrow_config(self.preset.model, self.valid)

    def client_keys(self) -> jax.Array:
        root = jax.random.key(self.seed)
        return jax.random.wrap_key_data(np.stack([jax.random.key_data(jax.random.fold_in(root, c))
                                                  for c in range(len(self.maps))]))


def make_workload(preset: Preset, seed: int = 0, params: PyTree | None = None) -> Workload:
    """Random sub-MoEs, random token batches (every token real) and random initial parameters."""
    cfg, c, k, b = preset.model, preset.cohort_size, preset.local_steps, preset.batch_size
    rng = np.random.default_rng(seed)
    maps = np.zeros((c, cfg.num_moe_layers, cfg.num_experts), bool)
    for i in range(c):
        for layer in range(cfg.num_moe_layers):
            kept = rng.integers(preset.min_kept, preset.max_kept + 1)
            maps[i, layer, rng.choice(cfg.num_experts, kept, replace=False)] = True
    width = bucket_width(int(maps.sum(-1).max()), cfg.num_experts)
    indices, valid = (np.asarray(a) for a in expert_slots(maps, width))
    vocab = cfg.vocab_size
    batches = {
        "inputs": rng.integers(2, vocab, (c, k, b, preset.input_len)).astype(np.int32),
        "input_mask": np.ones((c, k, b, preset.input_len), np.int32),
        "targets": rng.integers(2, vocab, (c, k, b, preset.target_len)).astype(np.int32),
        "target_mask": np.ones((c, k, b, preset.target_len), np.int32),
        "example_mask": np.ones((c, k, b), bool),
    }
    if params is None:
        model = SwitchTransformer(cfg)
        params = jax.jit(lambda key: model.init(key, batches["inputs"][0, 0], batches["targets"][0, 0])[
            "params"])(jax.random.key(seed))
    return Workload(preset, params, maps, width, indices, valid, batches, np.ones((c, k), bool),
                    np.full(c, float(b * k), np.float32), seed)


def optimizer(preset: Preset) -> optax.GradientTransformation:
    return optax.adamw(preset.learning_rate, weight_decay=0.01)


# ---------------------------------------------------------------------------------------------
# JAX contenders: each returns `round_fn() -> new global params` (blocking), built once
# ---------------------------------------------------------------------------------------------
def vectorized_round(w: Workload, mesh: Any = "auto") -> Callable[[], PyTree]:
    """The engine: the whole cohort in one program (sharded over all devices when there are several)."""
    if mesh == "auto":
        mesh = make_mesh() if jax.device_count() > 1 else None
    cfg = w.preset.model
    step = make_round_step(cfg, optimizer(w.preset), mesh=mesh)
    size = padded_cohort_size(len(w.maps), mesh)
    keys = jax.random.key_data(w.client_keys())
    indices, valid, batches, step_mask, weights, keys = pad_clients(
        (w.indices, w.valid, w.batches, w.step_mask, w.weights, keys), size)
    args = (indices, valid, batches, step_mask, weights, jax.random.wrap_key_data(keys), None)
    if mesh is not None:
        args = shard_cohort(args, mesh)
    params = w.params

    def round_fn():
        out = step(params, *args)
        return jax.block_until_ready(out.params)

    return round_fn


def sequential_round(w: Workload) -> Callable[[], PyTree]:
    """The same local training jitted per client, run client after client, then aggregated."""
    cfg, narrow = w.preset.model, w.narrow_config
    local = jax.jit(make_local_train(narrow, optimizer(w.preset)))
    gather = jax.jit(lambda p, idx: gather_submodel(p, cfg, idx))

    @jax.jit
    def add_client(sums, params, trained, indices, valid, weight):
        one = jax.tree.map(lambda a: a[None], trained)
        new = cohort_sums(params, one, cfg, indices[None], valid[None], weight[None])
        return jax.tree.map(jnp.add, sums, new)

    finalize = jax.jit(lambda p, sums: finalize_aggregate(p, sums, cfg))
    keys = w.client_keys()
    params = w.params
    zero = zero_cohort_sums(params, cfg, w.indices[:1], w.valid[:1], w.weights[:1])

    def round_fn():
        sums = zero
        for c in range(len(w.maps)):
            batches = {k: v[c] for k, v in w.batches.items()}
            trained, _, _ = local(gather(params, w.indices[c]), batches, w.step_mask[c], w.valid[c], keys[c])
            sums = add_client(sums, params, trained, w.indices[c], w.valid[c], w.weights[c])
        return jax.block_until_ready(finalize(params, sums))

    return round_fn


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def time_rounds(round_fn: Callable[[], Any], rounds: int = 3, warmup: int = 1) -> dict[str, Any]:
    """Seconds of the first call (compilation included), then the median of `rounds` timed calls."""
    t0 = time.perf_counter()
    for _ in range(max(warmup, 1)):
        round_fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        round_fn()
        times.append(time.perf_counter() - t0)
    return {"first_round_s": first, "round_s": float(np.median(times)), "round_times_s": times}


# ---------------------------------------------------------------------------------------------
# Where a round's time goes (jax.profiler trace, per XLA op category)
# ---------------------------------------------------------------------------------------------
OP_CATEGORIES = ("matmul", "gather/scatter", "copy/layout", "elementwise/reduce", "other")
# Container events that enclose other ops on the same thread (counting them would count twice);
# runtime events (`ThunkExecutor::Execute`, `SlinkyThreadPool::Await`) are left out too.
_ENCLOSING = ("call", "while", "conditional")


_LAYOUT_OPS = {"copy", "transpose", "bitcast", "broadcast", "concatenate", "pad", "slice", "reshape",
               "iota"}
_MOVEMENT_OPS = {"gather", "scatter", "dynamic-slice", "dynamic-update-slice", "dynamic_slice",
                 "dynamic_update_slice"}


def op_category(name: str) -> str | None:
    """The category of an XLA:CPU op event by its name, None for enclosing events.

    Names are an op (`dot.12`, `copy.3`) or a fusion named after its ops (`copy_gather_fusion`,
    `broadcast_add_fusion`, `wrapped_reduce`). Matmul: any dot / convolution, and `ynn_fusion`
    (XLA:CPU's YNNPACK dot fusions); gather/scatter: any gather, scatter or dynamic slice;
    copy/layout: only layout ops (copy, transpose, bitcast, broadcast, ...); the rest of the
    fusions: elementwise/reduce.
    """
    base = name.split(".")[0]
    if base.startswith("end: ") or "::" in base or base in _ENCLOSING:  # runtime events, waits
        return None
    if "dot" in base or "convolution" in base or base.startswith("ynn_") or "ragged" in base:
        return "matmul"
    if any(k in base for k in _MOVEMENT_OPS):
        return "gather/scatter"
    parts = [p for p in base.replace("-", "_").split("_") if p not in ("fusion", "wrapped", "")]
    if parts and all(p in _LAYOUT_OPS for p in parts):
        return "copy/layout"
    if base.endswith("fusion") or base.startswith("wrapped_") or len(parts) == 1:
        return "elementwise/reduce"
    return "other"


def op_breakdown(trace_events: list[dict]) -> dict[str, Any]:
    """Summed durations (ms) of XLA:CPU op events per `OP_CATEGORIES` entry, from Chrome/Perfetto
    trace events (threads named `tf_XLA...`), with `share` (fractions of their total) and the
    `top` 10 ops by time. Durations add over threads: CPU time, not wall time."""
    threads = {(e.get("pid"), e.get("tid")): e.get("args", {}).get("name", "")
               for e in trace_events if e.get("ph") == "M" and e.get("name") == "thread_name"}
    per: dict[str, float] = {c: 0.0 for c in OP_CATEGORIES}
    ops: dict[str, float] = {}
    for e in trace_events:
        if e.get("ph") != "X" or not threads.get((e.get("pid"), e.get("tid")), "").startswith("tf_XLA"):
            continue
        category = op_category(e.get("name", ""))
        if category is None:
            continue
        ms = float(e.get("dur", 0.0)) / 1e3
        per[category] += ms
        base = e["name"].split(".")[0]
        ops[base] = ops.get(base, 0.0) + ms
    total = sum(per.values())
    return {"ms": per, "total_ms": total,
            "share": {c: (v / total if total else 0.0) for c, v in per.items()},
            "top": sorted(ops.items(), key=lambda kv: -kv[1])[:10]}


def profile_round(round_fn: Callable[[], Any], directory: str) -> dict[str, Any]:
    """Trace one (already compiled) call of `round_fn` with `jax.profiler` into `directory`
    (TensorBoard / Perfetto files) and return its `op_breakdown`."""
    import glob
    import gzip
    import json

    jax.block_until_ready(round_fn())
    with jax.profiler.trace(directory, create_perfetto_trace=True):
        jax.block_until_ready(round_fn())
    files = sorted(glob.glob(os.path.join(directory, "**", "perfetto_trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not files:
        raise RuntimeError(f"jax.profiler wrote no trace under {directory}")
    with gzip.open(files[-1]) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return {**op_breakdown(events), "trace": files[-1]}


def figures(w: Workload, timing: dict[str, Any], peak_flops: float | None) -> dict[str, Any]:
    """client-steps/s, model FLOP/s and MFU of a timed contender."""
    p = w.preset
    steps = p.cohort_size * p.local_steps
    flops = steps * train_flops_per_step(w.narrow_config, p.batch_size, p.input_len, p.target_len)
    out = {**timing, "client_steps_per_s": steps / timing["round_s"],
           "model_flops_per_round": flops, "model_flops_per_s": flops / timing["round_s"]}
    if peak_flops:
        out["mfu"] = out["model_flops_per_s"] / peak_flops
    return out


def client_training_bytes(preset: Preset, kept: int) -> dict[str, int]:
    """XLA's memory analysis of one client's compiled local training with `kept` experts per layer
    (the gathered sub-MoE): argument, output and temporary bytes."""
    all_kept = np.ones((preset.model.num_moe_layers, kept), bool)
    narrow = narrow_config(preset.model, all_kept)
    w = make_workload(preset.replace(cohort_size=1, min_kept=kept, max_kept=kept))
    params = jax.eval_shape(lambda: gather_submodel(w.params, preset.model, w.indices[0]))
    local = jax.jit(make_local_train(narrow, optimizer(preset)))
    batches = {k: v[0] for k, v in w.batches.items()}
    mem = local.lower(params, batches, w.step_mask[0], all_kept,
                      w.client_keys()[0]).compile().memory_analysis()
    out = {"argument": int(mem.argument_size_in_bytes), "output": int(mem.output_size_in_bytes),
           "temp": int(mem.temp_size_in_bytes)}
    out["total"] = sum(out.values())
    return out


__all__ = ["CONTENDERS", "PRESETS", "Preset", "Workload", "client_training_bytes", "figures",
           "forward_flops", "make_workload", "matmul_peak", "sequential_round", "time_rounds",
           "train_flops_per_step", "vectorized_round"]
