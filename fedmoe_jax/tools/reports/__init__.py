"""Paper-style reports from run directories: Table 1 / Table 2 analogues and figures (the paper's metrics).

A run directory is what `python -m fedmoe_jax.main ... --workdir=DIR` writes: `summary.json` (run-level
numbers), `metrics.jsonl` (one row per round) and `experts.npz` (client expert maps and activation
probabilities). `build_report(root, out)` finds every `summary.json` under `root` (any depth), groups the
runs by (setting, method) over seeds and writes to `out`. Runs of one setting and method whose configs
differ in more than the seed (a sweep's hyperparameter axis) are separate rows, named by the keys that
differ: `fedmoe[stage2.patience=1]` (`assign_variants`); the paper comparisons use the plain rows.

- `report.md`: Table 1 and Table 2 analogues, average improvement, CVI, time-to-target, the paper's
  directions, the reference points beyond the paper (and, with `floor`, the trivial baselines' floor),
  whether clients' experts follow their tasks (`task_separation`), figures, notes;
- `table1.json`: `{setting: {method: {"TC", "RC", "TS", "comm_gb", "mem_gb", "seeds", ...extras}}}`;
- `table2.json`: `{setting: {method: {"TC", "RC", "TS", "experts_start_mean", ..., "seeds"}}}`;
- `report.json`: average improvement, CVI, time-to-target speedups, the paper's Table-1 directions (with
  seed-paired differences and 95 % intervals) and the notes;
- `figures/*.png`: expert activation heatmaps per task, convergence curves, expert counts over rounds.

Definitions where the paper is silent, all written into the report:

- Scores are percent, the mean over seeds of each run's per-task test score; `±` is the sample standard
  deviation over seeds (ddof 1; none with one seed).
- Memory: `mem_gb` is `peak_memory_gb.mean`, each client's peak training memory (its largest trained
  sub-MoE plus the method's extra state, `MemoryModel`) averaged over clients (the paper's FedMoE
  peaks of 13.4-14.0 GB match its *average* sub-MoE of 65-78 experts, not its largest); `mem_gb_max`
  (the largest client's peak) sits next to it.
- Average improvement: the paper's rule via `analysis.average_improvement` (mean over tasks of |f - b| / b,
  the baseline with the smallest value); the signed value is shown next to it.
- CVI: `analysis.composite_variation_index` over the settings' seed-mean scores (population c_v per
  task across the settings the method ran in, mean over tasks).
- Time-to-target: on the seed-mean validation curve (`val_score_<task>` of `metrics.jsonl`, rounds as
  numbered there), the "relative target performance" of FedMoE against a baseline is the best score
  *both* curves reach, min(max FedMoE, max baseline); the speedup to a fraction f of it is
  rounds(baseline) / rounds(FedMoE) to first reach f x target (`analysis.time_to_target_speedup`).

Modules: `names` (tasks, settings, methods and their row order), `cells` (numbers in and out of table
cells), `loading` (run directories), `analysis` (the paper's metrics), `tables` (Table 1 / Table 2
analogues, average improvement, CVI, time-to-target), `separation` (Stage 1), `replay` (Stage 2),
`paper` (the paper's numbers and the comparison with them), `reference_points` (FedAvg, FedAvg + FT and
local training against FedMoE, global vs personalized models), `floor` (the trivial baselines' floor),
`clients` (client by client: whether a method's clients score like the global model or like their own
data, and how evenly it serves them),
`compare` (an earlier report), `outputs`
(kept predictions), `figures`, `markdown`, `build` (`build_report`) and `cli` (`run_report`, what
`experiments/report.py` runs).
"""

from fedmoe_jax.tools.reports.analysis import (
    average_improvement,
    coefficient_of_variation,
    composite_variation_index,
    rounds_to_target,
    time_to_target_speedup,
)
from fedmoe_jax.tools.reports.build import build_report
from fedmoe_jax.tools.reports.cells import mean_std
from fedmoe_jax.tools.reports.cli import run_report
from fedmoe_jax.tools.reports.clients import (
    client_resemblance,
    client_spread,
    render_client_resemblance,
    render_client_spread,
)
from fedmoe_jax.tools.reports.compare import compare_tables, load_table1, render_comparison
from fedmoe_jax.tools.reports.figures import task_activation
from fedmoe_jax.tools.reports.floor import (
    FloorMismatchError,
    check_floor_data,
    clients_above_floor,
    floor_check,
    floor_data_mismatches,
    floors_by_setting,
    load_floor,
    render_clients_above_floor,
    render_floor,
)
from fedmoe_jax.tools.reports.loading import (
    RUN_FILES,
    NoRunsError,
    Notes,
    Run,
    assign_variants,
    export_runs,
    find_summaries,
    group_runs,
    load_runs,
)
from fedmoe_jax.tools.reports.markdown import at_a_glance
from fedmoe_jax.tools.reports.names import (
    method_name,
    setting_name,
    split_method,
    variant_method,
)
from fedmoe_jax.tools.reports.paper import (
    PAPER_TABLE1,
    excludes_zero,
    paired_difference,
    paper_claims,
    paper_comparison,
    paper_table2_comparison,
    render_paper_claims,
    render_paper_comparison,
    render_paper_table2,
)
from fedmoe_jax.tools.reports.reference_points import (
    REFERENCE_METHODS,
    global_vs_personal,
    reference_comparison,
    render_global_vs_personal,
    render_reference_comparison,
    render_seeds_to_add,
    seeds_to_add,
)
from fedmoe_jax.tools.reports.replay import render_stage2_trials, replay_stale_trials, stage2_trials
from fedmoe_jax.tools.reports.separation import render_task_separation, stage1_measured, task_separation
from fedmoe_jax.tools.reports.tables import curve, cvi, improvement, table1, table2, time_to_target

__all__ = [
    "FloorMismatchError", "PAPER_TABLE1", "REFERENCE_METHODS", "RUN_FILES", "NoRunsError", "Notes", "Run",
    "assign_variants",
    "at_a_glance", "average_improvement", "build_report", "coefficient_of_variation", "compare_tables",
    "composite_variation_index", "curve", "cvi", "excludes_zero", "export_runs", "find_summaries",
    "check_floor_data", "client_resemblance", "client_spread", "clients_above_floor", "floor_check",
    "floor_data_mismatches",
    "floors_by_setting",
    "global_vs_personal",
    "group_runs", "improvement", "load_floor", "load_runs",
    "load_table1", "mean_std", "method_name", "paired_difference", "paper_claims",
    "paper_comparison", "paper_table2_comparison", "reference_comparison", "render_comparison",
    "render_client_resemblance", "render_client_spread", "render_clients_above_floor", "render_floor",
    "render_global_vs_personal",
    "render_paper_claims",
    "render_reference_comparison",
    "render_seeds_to_add",
    "render_paper_comparison", "render_paper_table2", "render_stage2_trials", "render_task_separation",
    "replay_stale_trials", "rounds_to_target", "run_report", "seeds_to_add", "setting_name", "split_method",
    "stage1_measured", "stage2_trials", "table1", "table2", "task_activation", "task_separation",
    "time_to_target", "time_to_target_speedup", "variant_method",
]
