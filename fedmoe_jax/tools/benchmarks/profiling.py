"""Where a round's time goes: one round traced with `jax.profiler`, XLA:CPU op time summed per
category (matmul, gather/scatter, copy/layout, elementwise/reduce, other); and what a call traces,
lowers and compiles (`compile_events`)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import jax

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


# JAX's compile-time events (jax.monitoring): tracing to a jaxpr, lowering it to MLIR, XLA's compile.
COMPILE_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
                  "/jax/core/compile/backend_compile_duration": "compile"}
_recording: list[dict[str, float]] = []


def _on_event(event: str, seconds: float, **_: Any) -> None:
    stage = COMPILE_EVENTS.get(event)
    if stage is not None:
        for totals in _recording:
            totals[f"{stage}s"] += 1
            totals[f"{stage}_s"] += seconds


_listening = False


@contextlib.contextmanager
def compile_events():
    """Count what JAX traces, lowers and compiles inside the block: yields a dict filled on the way,
    `{"traces", "trace_s", "lowers", "lower_s", "compiles", "compile_s"}` (persistent-cache hits
    still trace and lower, but skip `compile`)."""
    global _listening
    if not _listening:  # jax.monitoring has no public way to remove a listener: add ours once
        jax.monitoring.register_event_duration_secs_listener(_on_event)
        _listening = True
    totals = {f"{stage}{suffix}": 0.0 for stage in COMPILE_EVENTS.values() for suffix in ("s", "_s")}
    _recording.append(totals)
    try:
        yield totals
    finally:
        _recording.remove(totals)
        for stage in COMPILE_EVENTS.values():
            totals[f"{stage}s"] = int(totals[f"{stage}s"])
