"""The central ceiling of an experiment config: its model trained on every client's training examples
at once, with one federated run's compute, scored as runs score the global model.

    python experiments/central.py --config=configs/cpu.py:standard_hetero_t --out=results/benchmark/central

What is trained and how it is scored: `fedmoe_jax.tools.central`. Exit status 2 (one line on stderr)
for a bad flag, config or override.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from fedmoe_jax.cli_common import flags_parser, run_tool  # noqa: E402
from fedmoe_jax.errors import ConfigError  # noqa: E402
from fedmoe_jax.tools.central import run_central  # noqa: E402
from fedmoe_jax.tools.sweeps import SpecError  # noqa: E402

flags.DEFINE_string("config", "configs/cpu.py", "Experiment config, FILE[:ARG].")
flags.DEFINE_multi_string("set", [], "KEY=VALUE config override (repeatable).")
flags.DEFINE_integer("steps", 0, "Training steps (0: num_rounds x cohort_size x local_steps).", lower_bound=0)
flags.DEFINE_integer("eval_points", 4, "Validation points along the way (the last at the end).",
                     lower_bound=1)
flags.DEFINE_enum("model", "moe", ["moe", "baseline"], "moe: the MoE FedMoE and randomMoE fine-tune; "
                  "baseline: the full-model baselines' smaller MoE.")
flags.DEFINE_multi_string("decoding", [], "BEAMS:PENALTY or BEAMS:TC,RC,TS: also score the final model on "
                          "validation and test with this decoding (repeatable), without training again.")
flags.DEFINE_bool("progress", True, "Print each validation point.")
flags.DEFINE_string("out", "", "Also write central.json and central.md into this directory.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    run_tool(argv, lambda: run_central(FLAGS.config, overrides=FLAGS.set, out=FLAGS.out, steps=FLAGS.steps,
                                       eval_points=FLAGS.eval_points, progress=FLAGS.progress,
                                       model=FLAGS.model, decodings=FLAGS.decoding), (SpecError, ConfigError))


if __name__ == "__main__":
    app.run(main, flags_parser=flags_parser())
