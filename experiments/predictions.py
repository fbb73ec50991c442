"""Decoded test predictions of finished runs side by side, with diagnostics (Markdown on stdout).

    python experiments/predictions.py RUN_DIR [RUN_DIR ...] [--task ts] [--model own] [-n 5] [--client K]

Reads each run's `predictions.jsonl` (a few test predictions per client, `eval.predictions`). Exit
status 2 (one line on stderr) for a bad flag or when a run has none. See `fedmoe_jax.tools.predictions`.
"""

from __future__ import annotations

from absl import app, flags

from fedmoe_jax.cli_common import fail, flags_parser
from fedmoe_jax.tools.predictions import MODELS, print_predictions

flags.DEFINE_enum("task", None, ["tc", "rc", "ts"], "Only this task.")
flags.DEFINE_enum("model", "own", list(MODELS), "own: each client's sub-MoE (the reported scores); global: "
                  "the full global model; unseen: never-sampled clients after their fine-tuning.")
flags.DEFINE_integer("n", 5, "Examples per task.")
flags.DEFINE_integer("client", None, "Only this client.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        fail("expected at least one RUN_DIR (a run directory holding predictions.jsonl)")
    return print_predictions(argv[1:], task=FLAGS.task, model=FLAGS.model, n=FLAGS.n, client=FLAGS.client)


if __name__ == "__main__":
    app.run(main, flags_parser=flags_parser())
