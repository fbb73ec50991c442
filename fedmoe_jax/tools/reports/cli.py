"""`python experiments/report.py RUNS_ROOT [--out DIR] [--baseline-methods a,b,c] [--export-runs DIR]
[--compare REPORT]`: the report's command line (argparse)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from fedmoe_jax.files import SUMMARY_FILE
from fedmoe_jax.tools.reports.build import build_report
from fedmoe_jax.tools.reports.compare import load_table1
from fedmoe_jax.tools.reports.loading import RUN_FILES, NoRunsError, export_runs
from fedmoe_jax.tools.reports.names import DEFAULT_BASELINES


def main(argv: Sequence[str] | None = None) -> int:
    """`python experiments/report.py RUNS_ROOT [--out DIR] [--baseline-methods a,b,c]`; 2 if no runs."""
    parser = argparse.ArgumentParser(
        prog="report.py", description="Table 1 / Table 2 analogues and figures from FedMoE run directories.")
    parser.add_argument("root", help="a directory holding run directories (each with summary.json)")
    parser.add_argument("--out", default=None, help="output directory (default: ROOT/report)")
    parser.add_argument("--baseline-methods", default=",".join(DEFAULT_BASELINES),
                        help="comma-separated baselines FedMoE is compared with (average improvement, "
                             "time-to-target)")
    parser.add_argument("--export-runs", default=None, metavar="DIR",
                        help="also copy each run's summary, metrics, expert maps and config (no "
                             "checkpoints) to DIR, e.g. to commit them; the report can be rebuilt from DIR")
    parser.add_argument("--compare", default=None, metavar="REPORT",
                        help="an earlier report directory (or its table1.json): adds how every Table 1 "
                             "cell moved from it and which FedMoE-vs-baseline directions flipped")
    args = parser.parse_args(argv)
    baselines = [b.strip() for b in args.baseline_methods.split(",") if b.strip()]
    if args.compare:
        try:  # before any work: a bad --compare must not leave a half-written report
            load_table1(args.compare)
        except ValueError as e:
            print(f"report: --compare: {e}", file=sys.stderr)
            return 2
    try:
        exported = export_runs(args.root, args.export_runs) if args.export_runs else None
    except ValueError as e:  # the export directory lies inside RUNS_ROOT
        print(f"report: {e}", file=sys.stderr)
        return 2
    try:
        result = build_report(args.root, args.out, baselines, args.compare)
    except NoRunsError:
        print(f"report: no {SUMMARY_FILE} under {args.root!r}; pass the directory that holds the run "
              f"directories written by `python -m fedmoe_jax.main ... --workdir=DIR`", file=sys.stderr)
        return 2
    if exported is not None:
        print(f"copied {len(exported)} run(s) to {args.export_runs} ({', '.join(RUN_FILES)})")
    print(f"wrote {os.path.join(result['out'], 'report.md')}: {len(result['runs'])} run(s), "
          f"{len(result['figures'])} figure(s), {len(result['notes'])} note(s)")
    return 0

