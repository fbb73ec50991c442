"""The paper path on a tiny model, offline: writes tiny Hugging Face checkpoints (16 and 8 experts,
with spiece.model) and TFDS stand-ins of AG News / SQuAD / XSum, then prints the command that runs
configs/paper.py on them.

    python experiments/tiny_paper.py --out=runs/tiny_paper
    # then the printed command, e.g.
    python -m fedmoe_jax.main --config=configs/paper.py:standard_hetero_t,fedmoe \
        --workdir=runs/tiny_paper/run --config.model.path=runs/tiny_paper/moe \
        --config.model.baseline_path=runs/tiny_paper/baseline --config.data.dir=runs/tiny_paper/tfds \
        --config.num_rounds=2 ...

What is made and why: `fedmoe_jax.tools.tiny_paper`. Exit status 2 (one line) for bad flags.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from fedmoe_jax.cli_common import fail, flags_parser, run_tool  # noqa: E402

flags.DEFINE_string("out", "runs/tiny_paper", "Folder for the checkpoints (moe/, baseline/) and the data "
                    "(tfds/).")
flags.DEFINE_string("setting", "standard_hetero_t,fedmoe", "Argument of configs/paper.py in the printed "
                    "command (a setting, optionally with a method).")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    from fedmoe_jax.tools.tiny_paper import make_tiny_paper_inputs, paper_command

    if os.path.exists(FLAGS.out) and os.listdir(FLAGS.out):
        fail(f"--out={FLAGS.out} is not empty; pass a new folder (nothing was written)")

    def make() -> None:
        paths = make_tiny_paper_inputs(FLAGS.out)
        print(f"wrote {paths['moe']}, {paths['baseline']}, {paths['tfds']}; run:", flush=True)
        print(paper_command(FLAGS.out, os.path.join(FLAGS.out, "run"), FLAGS.setting), flush=True)

    run_tool(argv, make, (ValueError,))


if __name__ == "__main__":
    app.run(main, flags_parser=flags_parser())
