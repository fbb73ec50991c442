"""Paper-style report (Table 1 / Table 2 analogues, CVI, time-to-target, figures) from run directories.

    python experiments/report.py RUNS_ROOT [--out DIR] [--baseline-methods random_moe,fedprox,scaffold] \
        [--export-runs DIR]

Finds every `summary.json` under RUNS_ROOT (runs of `python -m fedmoe_jax.main ... --workdir=DIR`) and
writes `report.md`, `table1.json`, `table2.json`, `report.json` and `figures/*.png` to DIR (default
RUNS_ROOT/report). `--export-runs DIR` also copies each run's summary, metrics, expert maps and
config (no checkpoints) to DIR, from which the same report can be rebuilt (`results/` is made so).
Exit status 2 when RUNS_ROOT holds no run or DIR lies inside it. See `fedmoe_jax.tools.reports`.
"""

import sys

from fedmoe_jax.tools.reports.cli import main

if __name__ == "__main__":
    sys.exit(main())
