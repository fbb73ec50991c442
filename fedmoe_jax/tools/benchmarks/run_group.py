"""Seeds vectorized in one round program (`RunGroup`) vs the same seeds' rounds one after another.

    python experiments/benchmark_runs.py --config=configs/cpu.py:standard_hetero_t,random_moe \
        --seeds=3 --rounds=3 --out=runs/bench_runs.json

Builds R trainers of one config (seeds 0..R-1; random init, no validation, so only the round's
training + aggregation is timed), warms both paths up (compilation), then times `--rounds` rounds
of each: `sequential` = `trainer.run_round()` per seed, `vectorized` = `RunGroup.run_round()`.
Reports seconds per round of all R runs (median), client-steps per second and the ratio, as JSON.
The command line is `experiments/benchmark_runs.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/cpu.py:standard_hetero_t,random_moe")
    parser.add_argument("--seeds", type=int, default=3, help="R: runs in the group")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per path (after 1 warm-up)")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE config overrides")
    parser.add_argument("--out", default="", help="write the result as JSON here")
    args = parser.parse_args(argv)

    import jax

    from fedmoe_jax.experiment import build
    from fedmoe_jax.federated.runs import RunGroup
    from fedmoe_jax.tools.sweeps import apply_overrides, load_config, parse_set_flag

    path, _, arg = args.config.partition(":")
    base = load_config(path, arg or None)
    base.model.init = "random"
    base.eval_every = 0
    base.mesh.enabled = False
    base = apply_overrides(base, dict(parse_set_flag(s) for s in args.set))

    def trainers():
        out = []
        for seed in range(args.seeds):
            c = base.copy_and_resolve_references()
            c.seed = seed
            c.num_rounds = 1 + args.rounds
            out.append(build(c, None, progress=False).trainer)
        return out

    def timed(step, rounds):
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        return times

    seq = trainers()
    t0 = time.perf_counter()
    for t in seq:
        t.run_round()
    seq_warm = time.perf_counter() - t0
    seq_times = timed(lambda: [t.run_round() for t in seq], args.rounds)
    group = RunGroup(trainers())
    t0 = time.perf_counter()
    group.run_round()
    vec_warm = time.perf_counter() - t0
    vec_times = timed(group.run_round, args.rounds)

    steps = args.seeds * base.cohort_size * base.local_steps
    seq_s, vec_s = statistics.median(seq_times), statistics.median(vec_times)
    result = {
        "config": args.config, "overrides": args.set, "seeds": args.seeds, "cohort_size": base.cohort_size,
        "local_steps": base.local_steps, "batch_size": base.batch_size, "model": base.model.name,
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "cpu_count": os.cpu_count(),
        "sequential": {"round_s": seq_s, "first_round_s": seq_warm, "client_steps_per_s": steps / seq_s},
        "vectorized": {"round_s": vec_s, "first_round_s": vec_warm, "client_steps_per_s": steps / vec_s},
        "speedup": seq_s / vec_s,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return result
