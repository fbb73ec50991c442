"""Decoded test predictions of finished runs side by side, with diagnostics (Markdown on stdout).

    python experiments/predictions.py RUN_DIR [RUN_DIR ...] [--task ts] [--model own] [-n 5] [--client K]

Reads each run's `predictions.jsonl` (a few test predictions per client, `eval.predictions`). Exit
status 2 when a run has none. See `fedmoe_jax.tools.predictions`.
"""

import sys

from fedmoe_jax.tools.predictions import main

if __name__ == "__main__":
    sys.exit(main())
