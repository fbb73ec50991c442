"""What `python experiments/report.py RUNS_ROOT [--out DIR] [--baseline-methods a,b,c] [--export-runs DIR]
[--compare REPORT] [--floor BASELINES_JSON ...] [--seeds-spec FILE]` does once its flags are parsed (the flags
live in the script)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from fedmoe_jax.files import SUMMARY_FILE, unwritable, write_json
from fedmoe_jax.tools.reports import loading
from fedmoe_jax.tools.reports.build import build_report
from fedmoe_jax.tools.reports.compare import load_table1
from fedmoe_jax.tools.reports.floor import FloorMismatchError, check_floor_data, floor_paths, load_floor
from fedmoe_jax.tools.reports.names import DEFAULT_BASELINES, METHOD
from fedmoe_jax.tools.sweeps.more_seeds import more_seeds_spec, spec_document
from fedmoe_jax.tools.sweeps.results import spec_for_collect
from fedmoe_jax.tools.sweeps.spec import SpecError, expand


def run_report(root: str, out: str | None = None, baselines: Sequence[str] = DEFAULT_BASELINES,
               export_runs: str | None = None, compare: str | None = None,
               floor: str | Sequence[str] | None = None,
               seeds_spec: str | None = None) -> int:
    """Write the report of the runs under `root` to `out` (default ROOT/report); with `seeds_spec`, also
    the sweep spec of the next paired seed its *Seeds to add* asks for (`more_seeds_spec`). The exit
    status: 0, or 2 (one line on stderr) when `root` holds no run, `export_runs` lies inside it,
    `compare` or `floor` is bad, or `seeds_spec` cannot be written or is asked of runs no sweep recorded
    (all checked before anything is written), or when the recorded sweep cannot express the seeds the
    report asks for (a setting not among its ARGs, a baseline it never ran: the report stays written)."""
    baselines = [b.strip() for b in baselines if b.strip()]
    floor = floor_paths(floor)
    # before any work: a bad --compare or --floor must not leave a half-written report
    checks = [("compare", compare, load_table1)] + [("floor", path, load_floor) for path in floor]
    for flag, value, check in checks:
        if value:
            try:
                check(value)
            except ValueError as e:
                print(f"error: --{flag}: {e}", file=sys.stderr)
                return 2
    if floor:  # and on the runs' own test data, before the export copies anything
        try:
            check_floor_data(floor, [r.summary for r in loading.load_runs(root, loading.Notes())])
        except FloorMismatchError as e:
            print(f"error: --floor: {e}", file=sys.stderr)
            return 2
    if seeds_spec:  # the spec is built from the grid's own sweep.json: it must be there
        try:
            spec_for_collect(root)
            if why := unwritable(seeds_spec):
                raise SpecError(f"{why}; pass another file")
        except SpecError as e:
            print(f"error: --seeds-spec: {e}", file=sys.stderr)
            return 2
    try:
        exported = loading.export_runs(root, export_runs) if export_runs else None
    except ValueError as e:  # the export directory lies inside RUNS_ROOT
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = build_report(root, out, baselines, compare, floor)
    except loading.NoRunsError:
        print(f"error: no {SUMMARY_FILE} under {root!r}; pass the directory that holds the run "
              f"directories written by `python -m fedmoe_jax.main ... --workdir=DIR`", file=sys.stderr)
        return 2
    if exported is not None:
        print(f"copied {len(exported)} run(s) to {export_runs} ({', '.join(loading.RUN_FILES)})")
    print(f"wrote {os.path.join(result['out'], 'report.md')}: {len(result['runs'])} run(s), "
          f"{len(result['figures'])} figure(s), {len(result['notes'])} note(s)")
    return write_seeds_spec(root, result, seeds_spec) if seeds_spec else 0


def write_seeds_spec(root: str, result: dict, path: str) -> int:
    """Write the next-seed sweep spec of a `build_report` result to `path` (untouched when no seeds are
    wanted); the exit status."""
    wanted = result["seeds_to_add"]
    seeds = {s: result["table1"][s][METHOD]["seed_list"] for s in wanted}
    try:
        spec = more_seeds_spec(root, wanted, seeds, method=METHOD)
    except SpecError as e:
        print(f"error: --seeds-spec: {e}", file=sys.stderr)
        return 2
    if spec is None:
        print(f"no seeds to add: {path} not written (every direction with a gap is decided or has 5 seeds)")
        return 0
    write_json(path, spec_document(spec))
    print(f"wrote {path}: {len(expand(spec))} run(s), the next seed of FedMoE and the baselines it is "
          f"undecided against in {len(wanted)} setting(s); run it with `python experiments/sweep.py "
          f"--spec={path}`")
    return 0

