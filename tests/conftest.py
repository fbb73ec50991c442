"""Test setup: 8 host CPU devices (so sharded paths run) and the JAX compilation cache."""

import os

# XLA's newer CPU fusion emitters (the 0.10 default) take about twice as long to compile this suite's
# programs as the classic elemental emitters (a tiny FedMoE round: 15 s -> 8 s; docs/testing.md), and the
# suite is compile-bound. Appended to XLA_FLAGS here and in every subprocess the tests start.
COMPILE_FAST_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false"


def xla_flags(devices: int) -> str:
    """The tests' XLA_FLAGS with `devices` host CPU devices (this process: 8, unless the caller set some)."""
    return f"--xla_force_host_platform_device_count={devices} {COMPILE_FAST_XLA_FLAGS}"


os.environ.setdefault("XLA_FLAGS", xla_flags(8))
if COMPILE_FAST_XLA_FLAGS not in os.environ["XLA_FLAGS"]:  # XLA_FLAGS set by the caller (`make test`)
    os.environ["XLA_FLAGS"] += " " + COMPILE_FAST_XLA_FLAGS
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Most XLA optimizations off: compilation dominates this suite (a tiny round compiles in ~15 s and
# runs in ~0.05 s) and this cuts it by ~25 %. Every comparison in the tests is between programs
# compiled the same way; the CLI subprocesses inherit it. Benchmarks and real runs compile optimized.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402

_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache")
os.environ.setdefault("FEDMOE_JAX_CACHE", _CACHE)  # the CLIs' cache (in process or not): the same one
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="module")
def small_run():
    """A 6-client federated slice of the embedded benchmark (40 train / 12 eval examples per task)
    and a tiny Switch model: `(config, params, FederatedData, tokenizer)`."""
    from fedmoe_jax.data import (
        FederatedData,
        assign_tasks,
        embedded_tokenizer,
        load_embedded_benchmark,
        make_partition,
    )
    from fedmoe_jax.models import SwitchTransformer, get_config

    bench = load_embedded_benchmark()
    small = {t: {s: d.take(np.arange(40 if s == "train" else 12)) for s, d in splits.items()}
             for t, splits in bench.items()}
    tok = embedded_tokenizer()
    part = make_partition(small, assign_tasks(6), setting="T", seed=0)
    fed = FederatedData.build(small, part, tok, max_input_len=32, max_target_len=16)
    config = get_config("switch-tiny-8", vocab_size=tok.vocab_size, expert_capacity=32)
    params = SwitchTransformer(config).init(jax.random.key(0), jnp.ones((1, 8), jnp.int32),
                                            jnp.ones((1, 8), jnp.int32))["params"]
    return config, params, fed, tok
