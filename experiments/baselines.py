"""Trivial baselines of the three tasks on an experiment config's data (the floor every method must
clear before its score means anything).

    python experiments/baselines.py --config=configs/cpu.py:standard_hetero_td --seeds=0,1,2 --out=DIR

What each baseline is: `fedmoe_jax.tools.baselines`. Exit status 2 (one line on stderr) for a bad
flag, config or override.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from fedmoe_jax.cli_common import flags_parser, run_tool  # noqa: E402
from fedmoe_jax.errors import ConfigError  # noqa: E402
from fedmoe_jax.tools.baselines import run_baselines  # noqa: E402
from fedmoe_jax.tools.sweeps import SpecError  # noqa: E402

flags.DEFINE_string("config", "configs/cpu.py", "Experiment config whose data to use, FILE[:ARG].")
flags.DEFINE_multi_string("set", [], "KEY=VALUE config override (repeatable).")
flags.DEFINE_string("out", "", "Also write baselines.json and baselines.md into this directory.")
flags.DEFINE_list("seeds", [], "Seeds of the partitions to score the baselines on as runs score them "
                  "(comma-separated; default the config's seed): use the grid's seeds.")
FLAGS = flags.FLAGS


def _seeds(values: list[str]) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError:
        raise SpecError(f"--seeds={','.join(values)}: use comma-separated integers, "
                        "e.g. --seeds=0,1,2") from None


def main(argv: list[str]) -> None:
    run_tool(argv, lambda: run_baselines(FLAGS.config, overrides=FLAGS.set, out=FLAGS.out,
                                         seeds=_seeds(FLAGS.seeds)),
             (SpecError, ConfigError))


if __name__ == "__main__":
    app.run(main, flags_parser=flags_parser())
