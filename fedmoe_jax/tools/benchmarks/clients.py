"""Registered clients vs a round's cost: the experiment pipeline (`configs/tiny.py` by default) with N
registered clients and a fixed cohort, its rounds timed as N grows.

    python experiments/benchmark.py --scaling=clients:30,1000,10000 --cohort=24 --method=fedmoe

Every client holds about the same examples whatever N (`client_data`), and every N has the same
cohort size, local steps and model, so only N and the per-client state change. Reported per N: the
median round (training, aggregation, in-round validation, the algorithm's bookkeeping; no
checkpoint, no workdir, no validation of all N clients), the set-up before the first round (data, partition,
Stage 1 for FedMoE), the bytes of the client states (metadata and any per-client model copies) and
the child process's peak RSS.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

DEFAULT_CONFIG = "configs/tiny.py"
TRAIN_PER_CLIENT, EVAL_PER_CLIENT = 4, 1


def client_data(num_clients: int) -> dict[str, Any]:
    """Config overrides giving every client about the same examples whatever N: two TC and two TS
    clients per RC client (RC has the fewest examples), each task cut to `TRAIN_PER_CLIENT` /
    `EVAL_PER_CLIENT` examples per TC client (RC's clients hold twice that, up to RC's size), one
    example per client and split at least."""
    per_task = -(-2 * num_clients // 5)  # TC's (and TS's) clients
    return {"data.min_examples": 1, "data.task_ratios": (2.0, 1.0, 2.0),
            "data.train_examples_per_task": TRAIN_PER_CLIENT * per_task,
            "data.eval_examples_per_task": EVAL_PER_CLIENT * per_task}


def registered_clients_round(num_clients: int, cohort: int, method: str = "fedmoe", rounds: int = 3,
                             warmup: int = 1, seed: int = 0, config: str = DEFAULT_CONFIG) -> dict[str, Any]:
    """Build `config:method` with `num_clients` registered clients and cohorts of `cohort`, run
    `warmup` rounds, then time `rounds` more (median). Raises `SpecError` / `ConfigError` on bad input."""
    import jax

    from fedmoe_jax.experiment import build
    from fedmoe_jax.tools.benchmarks.cli import REPO
    from fedmoe_jax.tools.sweeps import apply_overrides, load_config

    path = config if os.path.isabs(config) else os.path.join(REPO, config)
    c = apply_overrides(load_config(path, method), {
        **client_data(num_clients), "data.num_clients": num_clients, "cohort_size": cohort, "seed": seed,
        "num_rounds": warmup + rounds, "eval.full_every": 0})  # a round, not an evaluation of all N
    t0 = time.perf_counter()
    trainer = build(c, None, progress=False).trainer
    setup = time.perf_counter() - t0
    for _ in range(warmup):
        trainer.run_round()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        trainer.run_round()
        times.append(time.perf_counter() - t0)
    states = trainer.states
    extra = states.extra_bytes()
    meta = sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(states.replace(extra=None)))
    steps = cohort * c.local_steps
    return {"clients": num_clients, "cohort": cohort, "method": method, "setup_s": setup,
            "round_s": float(np.median(times)), "round_times_s": times,
            "client_steps_per_s": steps / float(np.median(times)),
            "client_state_bytes": {"metadata": int(meta), "model_copies": extra}}
