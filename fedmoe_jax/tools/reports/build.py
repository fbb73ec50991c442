"""`build_report`: every run under a root -> `report.md`, `table1.json`, `table2.json`, `report.json`
and `figures/*.png` (the package doc says what each holds)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from fedmoe_jax.files import write_json
from fedmoe_jax.tools.reports.clients import client_resemblance, client_spread
from fedmoe_jax.tools.reports.compare import compare_tables, load_table1
from fedmoe_jax.tools.reports.figures import figures
from fedmoe_jax.tools.reports.floor import (
    check_floor_data,
    clients_above_floor,
    floor_check,
    floor_paths,
    floors_by_setting,
    load_floor,
)
from fedmoe_jax.tools.reports.loading import (
    NoRunsError,
    Notes,
    check_initial_models,
    find_summaries,
    group_runs,
    load_runs,
)
from fedmoe_jax.tools.reports.markdown import render_markdown
from fedmoe_jax.tools.reports.names import DEFAULT_BASELINES, METHOD, MISSING, _method_rank
from fedmoe_jax.tools.reports.outputs import output_diagnostics
from fedmoe_jax.tools.reports.paper import paper_claims, paper_comparison, paper_table2_comparison
from fedmoe_jax.tools.reports.reference_points import (
    compared_with,
    global_vs_personal,
    reference_comparison,
    seeds_to_add,
)
from fedmoe_jax.tools.reports.replay import stage2_trials
from fedmoe_jax.tools.reports.separation import task_separation
from fedmoe_jax.tools.reports.tables import cvi, improvement, table1, table2, time_to_target


def build_report(root: str, out: str | None = None, baselines: Sequence[str] = DEFAULT_BASELINES,
                 compare: str | None = None, floor: str | Sequence[str] | None = None) -> dict[str, Any]:
    """Reads every run under `root`, writes the report to `out` (default `root/report`), returns its data.
    `compare`: an earlier report directory (or its table1.json) to show how each cell moved from it;
    `floor`: `baselines.json` files (or their folders; one per partition, `floors_by_setting`) whose
    best trivial baseline per task is each setting's floor row in Table 1."""
    earlier = load_table1(compare) if compare else None
    floor = floor_paths(floor)
    for path in floor:
        load_floor(path)  # unreadable: refused before anything is read or written
    if not os.path.isdir(root) or not find_summaries(root):
        raise NoRunsError(root)
    out = out or os.path.join(root, "report")
    notes = Notes()
    runs = load_runs(root, notes)
    if not runs:
        raise NoRunsError(root)
    if floor:  # a floor measured on other test data would mislabel every cell: refuse before writing
        check_floor_data(floor, [r.summary for r in runs])
    groups = group_runs(runs)
    seeds = {s: {r.seed for runs_ in methods.values() for r in runs_} for s, methods in groups.items()}
    floors = floors_by_setting(floor, list(groups), seeds) if floor else None
    for setting in groups if floors is not None else ():
        if setting not in floors:
            notes.add(f"{setting}: no floor given (--floor: a baselines.json of its partition)")
        elif floors[setting]["unscored_seeds"]:
            notes.add(f"{setting}: the floor file did not score seed(s) "
                      f"{', '.join(floors[setting]['unscored_seeds'])} of its runs: its floor is the mean "
                      "over the seeds it scored; measure it again with every seed (--seeds)")
    initial_models = check_initial_models(runs, notes)
    baselines = [b for b in baselines if b != METHOD]
    seen = {r.method for r in runs}
    for b in baselines:
        if b not in seen:
            notes.add(f"baseline {b}: no runs at all")
    methods_seen = sorted(seen, key=_method_rank)
    for setting, methods in groups.items():
        for m in methods_seen:
            if m not in methods:
                notes.add(f"{setting}: no runs of {m} (shown as {MISSING})")
    t1 = table1(groups, notes)
    gains = improvement(t1, baselines, notes)
    cvis = cvi(t1, notes)
    ttt = time_to_target(groups, baselines, notes)
    t2 = table2(groups, notes)
    separation = task_separation(groups, notes)
    trials = stage2_trials(groups, notes)
    against_paper = paper_comparison(t1, baselines)
    against_table2 = paper_table2_comparison(t2)
    claims = paper_claims(t1, gains, cvis, ttt)
    outputs = output_diagnostics(groups)
    moved = compare_tables(t1, earlier, baselines) if earlier is not None else None
    references = reference_comparison(t1)
    more_seeds = seeds_to_add(t1, compared_with(baselines))
    global_scores = global_vs_personal(t1)
    resemblance = client_resemblance(groups)
    spread = client_spread(groups)
    below = floor_check(t1, floors) if floors is not None else None
    per_client = clients_above_floor(groups, floors) if floors is not None else {}
    os.makedirs(out, exist_ok=True)
    figs = figures(groups, ttt, out, notes)
    write_json(os.path.join(out, "table1.json"), t1, finite=True)
    write_json(os.path.join(out, "table2.json"), t2, finite=True)
    result = {"root": root, "runs": [r.rel for r in runs], "average_improvement": gains,
              "cvi": cvis, "time_to_target": ttt, "paper_comparison": against_paper,
              "task_separation": separation, "paper_table2_comparison": against_table2,
              "stage2_trials": trials, "paper_claims": claims,
              "initial_models": initial_models, "outputs": outputs, "figures": [rel for _, rel in figs],
              "reference_points": references, "global_vs_personal": global_scores,
              "client_resemblance": resemblance, "client_spread": spread,
              "floor": floors, "below_floor": below,
              "clients_above_floor": per_client, "seeds_to_add": more_seeds, "notes": list(notes)}
    if moved is not None:
        result["compared_with"] = {"path": compare, **moved}
    write_json(os.path.join(out, "report.json"), result, finite=True)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(render_markdown(result, runs, t1, t2, figs, baselines))
    return {**result, "out": out, "table1": t1, "table2": t2}
