"""Micro-benchmark of one MoE layer's expert paths: forward + backward time and XLA's FLOP count.

Contenders: the capacity path (`capacity_factor`), the dropless path with `jax.lax.ragged_dot`, and
the dropless block path at several block sizes G. Each is jitted (value and gradient of a scalar of
the output, parameters and input), compiled once, then timed as the median of `repeats` runs.
The model FLOPs are those of the experts on the routed tokens only: `2 * 2 * N * D * F` forward
(N = B*T*K token-choices), times 3 with the backward pass.

Shape letters: B batch, T tokens, D d_model, F d_ff, E experts, K top-k, G rows per block.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from fedmoe_jax.models.moe import MoELayer


@dataclasses.dataclass
class PathTiming:
    name: str
    ms: float  # median forward + backward
    flops: float  # XLA cost analysis of the compiled step
    model_flops: float  # experts on the routed tokens, forward + backward
    compile_s: float

    @property
    def flop_ratio(self) -> float:
        return self.flops / self.model_flops


def contenders(block_rows: Sequence[int], capacity_factor: float) -> dict[str, dict]:
    """`{name: MoELayer overrides}`."""
    out = {f"capacity(cf={capacity_factor:g})": {"dispatch": "capacity", "expert_capacity": None,
                                                 "capacity_factor": capacity_factor},
           "ragged": {"dispatch": "dropless", "dropless_impl": "ragged"}}
    for g in block_rows:  # 0: auto_block_rows
        out[f"blocks(G={g or 'auto'})"] = {"dispatch": "dropless", "dropless_impl": "blocks", "block_rows": g}
    return out


def time_paths(batch: int, tokens: int, d_model: int, d_ff: int, num_experts: int, top_k: int = 1,
               block_rows: Sequence[int] = (16, 32, 64, 128), capacity_factor: float = 2.0,
               repeats: int = 10, seed: int = 0) -> list[PathTiming]:
    """Time every contender on the same input and parameters (router trained toward no one expert:
    random init, so routing is mildly uneven as in a real model)."""
    x = jax.random.normal(jax.random.key(seed), (batch, tokens, d_model))
    model_flops = 3 * 2 * 2 * batch * tokens * top_k * d_model * d_ff
    results = []
    params = None
    for name, overrides in contenders(block_rows, capacity_factor).items():
        layer = MoELayer(num_experts=num_experts, d_ff=d_ff, top_k=top_k, **overrides)
        if params is None:
            params = layer.init(jax.random.key(seed + 1), x)

        def loss(p, xi, layer=layer):
            y, stats = layer.apply(p, xi)
            return jnp.sum(y * y) + stats.lb_loss

        start = time.perf_counter()
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x).compile()
        compile_s = time.perf_counter() - start
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        jax.block_until_ready(compiled(params, x))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(params, x))
            times.append(time.perf_counter() - start)
        results.append(PathTiming(name, 1e3 * statistics.median(times), float(cost.get("flops", 0.0)),
                                  float(model_flops), compile_s))
    return results


def markdown(results: Sequence[PathTiming], title: str) -> str:
    lines = [f"**{title}**", "", "| path | fwd+bwd ms | vs capacity | XLA FLOPs / model FLOPs | compile s |",
             "|---|---|---|---|---|"]
    base = results[0].ms
    for r in results:
        lines.append(f"| {r.name} | {r.ms:.1f} | {base / r.ms:.2f}x | {r.flop_ratio:.2f} "
                     f"| {r.compile_s:.1f} |")
    return "\n".join(lines)


__all__ = ["PathTiming", "contenders", "markdown", "time_paths"]
