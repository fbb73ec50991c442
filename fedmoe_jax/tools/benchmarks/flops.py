"""Model FLOPs of the useful work of a training step, the machine's matmul peak, and the figures of a
timed contender (client-steps/s, model FLOP/s, MFU)."""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedmoe_jax.models.switch import SwitchConfig
from fedmoe_jax.tools.benchmarks.workload import Workload


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
