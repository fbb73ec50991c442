r"""Seeds vectorized in one round program (`RunGroup`) vs the same seeds' rounds one after another.

    python experiments/benchmark_runs.py --config=configs/cpu.py:standard_hetero_t,random_moe \
        --seeds=3 --rounds=3 --out=runs/bench_runs.json

What is timed and reported: `fedmoe_jax.tools.benchmarks.run_group`. Exit status 2 (one line on
stderr) for a bad flag, config or override.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from fedmoe_jax.cli_common import flags_parser, run_tool  # noqa: E402
from fedmoe_jax.errors import ConfigError  # noqa: E402
from fedmoe_jax.tools.benchmarks.run_group import DEFAULT_CONFIG, run_group_benchmark  # noqa: E402
from fedmoe_jax.tools.sweeps import SpecError  # noqa: E402

flags.DEFINE_string("config", DEFAULT_CONFIG, "Config file and its argument, FILE:ARG.")
flags.DEFINE_integer("seeds", 3, "R: runs in the group (seeds 0..R-1).", lower_bound=1)
flags.DEFINE_integer("rounds", 3, "Timed rounds per path (after 1 warm-up).", lower_bound=1)
flags.DEFINE_multi_string("set", [], "KEY=VALUE config override (repeatable).")
flags.DEFINE_string("out", "", "Also write the result as JSON here.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    run_tool(argv, lambda: run_group_benchmark(FLAGS.config, seeds=FLAGS.seeds, rounds=FLAGS.rounds,
                                               overrides=FLAGS.set, out=FLAGS.out), (SpecError, ConfigError))


if __name__ == "__main__":
    app.run(main, flags_parser=flags_parser())
