"""Side-by-side round benchmark: vectorized engine vs sequential JAX vs PyTorch + Hugging Face.

    python experiments/benchmark.py --preset=cpu-small --out=runs/bench/cpu.json --md=runs/bench/cpu.md
    python experiments/benchmark.py --preset=cpu-small --scaling=cohort:4,8,16,32 --contenders=vectorized
    python experiments/benchmark.py --preset=cpu-small --scaling=experts:8,16,32,64,128

Each contender runs in its own child process (so its peak RSS is its own) on the same workload
(`fedmoe_jax.tools.benchmarks`: same model, expert maps, batches, local steps and cohort); the machine's
matmul peak is measured in another. Prints and writes JSON (`client_steps_per_s` per contender,
`ratios`, `mfu`, `device`, per-contender details) and a Markdown table. With `--scaling`, the
vectorized round is timed over cohort sizes or global expert counts (kept experts per client fixed).
See `fedmoe_jax.tools.benchmarks.cli`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fedmoe_jax.tools.benchmarks.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
