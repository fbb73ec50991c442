"""Seeds vectorized in one round program (`RunGroup`) vs the same seeds' rounds one after another.

    python experiments/benchmark_runs.py --config=configs/cpu.py:standard_hetero_t,random_moe \
        --seeds=3 --rounds=3 --out=runs/bench_runs.json

Builds R trainers of one config (seeds 0..R-1; random init, no validation, so only the round's
training + aggregation is timed), warms both paths up (compilation), then times `--rounds` rounds
of each: `sequential` = `trainer.run_round()` per seed, `vectorized` = `RunGroup.run_round()`.
Reports seconds per round of all R runs (median), client-steps per second and the ratio, as JSON.
See `fedmoe_jax.tools.benchmarks.run_group`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fedmoe_jax.tools.benchmarks.run_group import main  # noqa: E402

if __name__ == "__main__":
    main()
