"""A finished run's personalized test scores after k local fine-tuning steps per client, for several k
(FedAvg + FT's fine-tuning, measured as a curve; any method's final model).

    python experiments/fine_tune_curve.py --run=RUN_DIR --steps=0,6,12,24 [--learning_rate=1e-4] \
        [--out=DIR]

What is measured: `fedmoe_jax.tools.fine_tune_curve`. The run directory is only read. Exit status 2
(one line on stderr) for a bad flag or a directory without a finished run.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from fedmoe_jax.cli_common import flags_parser, run_tool  # noqa: E402
from fedmoe_jax.errors import ConfigError  # noqa: E402
from fedmoe_jax.tools.fine_tune_curve import run_fine_tune_curve  # noqa: E402

flags.DEFINE_string("run", None, "Directory of a finished run (its config.json, checkpoints, summary.json).",
                    required=True)
flags.DEFINE_list("steps", ["0", "6", "12", "24"], "Fine-tuning steps per client, one point each.")
flags.DEFINE_float("learning_rate", None, "Fine-tune at this rate (default: the run's own).")
flags.DEFINE_string("out", "", "Also write fine_tune_curve.json and fine_tune_curve.md into this directory.")
FLAGS = flags.FLAGS


def steps() -> list[int]:
    try:
        return [int(k) for k in FLAGS.steps]
    except ValueError:
        raise ConfigError(f"--steps={','.join(FLAGS.steps)}; give integers >= 0, e.g. 0,6,12,24") from None


def main(argv: list[str]) -> None:
    run_tool(argv, lambda: run_fine_tune_curve(FLAGS.run, steps(), FLAGS.learning_rate, out=FLAGS.out),
             (ConfigError,))


if __name__ == "__main__":
    app.run(main, flags_parser=flags_parser())
