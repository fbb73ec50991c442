"""Seeds vectorized in one round program (`RunGroup`) vs the same seeds' rounds one after another.

    python experiments/benchmark_runs.py --config=configs/cpu.py:standard_hetero_t,random_moe \
        --seeds=3 --rounds=3 --out=runs/bench_runs.json

Builds R trainers of one config (seeds 0..R-1; random init, no validation, so only the round's
training + aggregation is timed), warms both paths up (compilation), then times `--rounds` rounds
of each: `sequential` = `trainer.run_round()` per seed, `vectorized` = `RunGroup.run_round()`.
Reports seconds per round of all R runs (median), client-steps per second and the ratio, as JSON.
`experiments/benchmark_runs.py` runs `run_group_benchmark`.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Sequence

DEFAULT_CONFIG = "configs/cpu.py:standard_hetero_t,random_moe"


def run_group_benchmark(config: str = DEFAULT_CONFIG, seeds: int = 3, rounds: int = 3,
                        overrides: Sequence[str] = (), out: str = "") -> dict:
    """Time `rounds` rounds of `seeds` runs of `config` ("FILE:ARG", with KEY=VALUE `overrides`) both
    ways, print the result as JSON and write it to `out` when given. A config that fails to load or a
    bad override raises `SpecError`, an invalid config `ConfigError`, before any round."""
    import jax

    from fedmoe_jax.experiment import build
    from fedmoe_jax.federated.runs import RunGroup
    from fedmoe_jax.tools.sweeps import apply_overrides, load_config, parse_set_flag

    path, _, arg = config.partition(":")
    base = load_config(path, arg or None)
    base.model.init = "random"
    base.eval_every = 0
    base.mesh.enabled = False
    base = apply_overrides(base, dict(parse_set_flag(s) for s in overrides))

    def trainers():
        built = []
        for seed in range(seeds):
            c = base.copy_and_resolve_references()
            c.seed = seed
            c.num_rounds = 1 + rounds
            built.append(build(c, None, progress=False).trainer)
        return built

    def timed(step, n):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        return times

    seq = trainers()
    t0 = time.perf_counter()
    for t in seq:
        t.run_round()
    seq_warm = time.perf_counter() - t0
    seq_times = timed(lambda: [t.run_round() for t in seq], rounds)
    group = RunGroup(trainers())
    t0 = time.perf_counter()
    group.run_round()
    vec_warm = time.perf_counter() - t0
    vec_times = timed(group.run_round, rounds)

    steps = seeds * base.cohort_size * base.local_steps
    seq_s, vec_s = statistics.median(seq_times), statistics.median(vec_times)
    result = {
        "config": config, "overrides": list(overrides), "seeds": seeds, "cohort_size": base.cohort_size,
        "local_steps": base.local_steps, "batch_size": base.batch_size, "model": base.model.name,
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "cpu_count": os.cpu_count(),
        "sequential": {"round_s": seq_s, "first_round_s": seq_warm, "client_steps_per_s": steps / seq_s},
        "vectorized": {"round_s": vec_s, "first_round_s": vec_warm, "client_steps_per_s": steps / vec_s},
        "speedup": seq_s / vec_s,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text + "\n")
    return result
