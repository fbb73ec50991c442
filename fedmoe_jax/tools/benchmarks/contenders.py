"""The JAX contenders, each `round_fn() -> new global params` (blocking), built once: `vectorized`
(the engine's round step) and `sequential_jax` (the same local training client after client); their
timing, and the compiled memory of one client's local training.

Shape letters: C clients, K local steps, B batch, S_in / T input / target tokens, L MoE layers,
E experts, S slots.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedmoe_jax.federated.client import make_local_train
from fedmoe_jax.federated.loop import make_round_step
from fedmoe_jax.federated.sharding import make_mesh, pad_clients, padded_cohort_size, shard_cohort
from fedmoe_jax.federated.submodel import (
    cohort_sums,
    finalize_aggregate,
    gather_submodel,
    narrow_config,
    zero_cohort_sums,
)
from fedmoe_jax.tools.benchmarks.profiling import compile_events
from fedmoe_jax.tools.benchmarks.workload import Preset, PyTree, Workload, make_workload, optimizer

CONTENDERS = ("vectorized", "sequential_jax", "pytorch_hf")


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
    """Seconds of the first call (compilation included; `first_round_programs`: what it traced, lowered
    and compiled, `compile_events`), then the median of `rounds` timed calls."""
    t0 = time.perf_counter()
    with compile_events() as programs:
        round_fn()
    first = time.perf_counter() - t0
    for _ in range(max(warmup, 1) - 1):
        round_fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        round_fn()
        times.append(time.perf_counter() - t0)
    return {"first_round_s": first, "round_s": float(np.median(times)), "round_times_s": times,
            "first_round_programs": programs}


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
