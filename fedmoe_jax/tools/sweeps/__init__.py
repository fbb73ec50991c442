"""Sweeps: a grid of CLI runs (config args x any config keys), run by parallel worker processes,
skipped when finished, resumed when not, and collected into one results table.

    spec = spec_from_dict({"config": "configs/cpu.py", "args": ["standard_hetero_t"],
                           "grid": {"method": ["fedmoe", "random_moe"], "seed": [0, 1, 2]},
                           "set": {"num_rounds": 20}, "root": "runs/sweep"})
    report = run_sweep(spec, workers=2)      # ROOT/sweep.json, ROOT/results.csv, ROOT/results.md

Each grid point is one run directory `ROOT/<arg>/<k1=v1,k2=v2,...>` (grid keys sorted; values that are
not filesystem-safe get a short hash) and one command
`RUNNER --config=FILE[:ARG] --workdir=DIR --config.k=v ...` (RUNNER defaults to
`python -m fedmoe_jax.main`). A run is finished when `DIR/summary.json` exists; otherwise the same
command is run again, which resumes it. Invalid specs raise `SpecError` (one line) before anything runs.

Modules: `values` (flag values, run names, `SpecError`), `spec` (the spec, its runs and processes),
`configs` (overrides checked before launching), `runner` (`run_sweep`), `results` (`sweep.json`,
`results.csv`, `results.md`) and `more_seeds` (the next paired seed a report asks for, as a spec). The
command line is `experiments/sweep.py`.
"""

from fedmoe_jax.tools.sweeps.configs import (
    apply_overrides,
    check_configs,
    config_from_spec,
    fedmoe_validator,
    load_config,
)
from fedmoe_jax.tools.sweeps.more_seeds import MORE_SEEDS_DIR, more_seeds_root, more_seeds_spec, spec_document
from fedmoe_jax.tools.sweeps.results import (
    RESULTS_CSV,
    RESULTS_MD,
    SWEEP_JSON,
    collect,
    read_sweep_json,
    spec_for_collect,
    write_sweep_json,
    write_tables,
)
from fedmoe_jax.tools.sweeps.runner import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_INVALID,
    LOG,
    SweepReport,
    child_env,
    core_shares,
    run_sweep,
)
from fedmoe_jax.tools.sweeps.spec import (
    DEFAULT_ROOT,
    Job,
    Run,
    SweepSpec,
    default_runner,
    expand,
    jobs,
    load_spec,
    spec_from_dict,
    spec_from_flags,
)
from fedmoe_jax.tools.sweeps.values import (
    SpecError,
    format_cli_value,
    parse_exclude_flag,
    parse_grid_flag,
    parse_set_flag,
    parse_value,
    run_name,
    split_top_level,
)

__all__ = [
    "DEFAULT_ROOT", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_INVALID", "LOG", "MORE_SEEDS_DIR", "RESULTS_CSV",
    "RESULTS_MD",
    "SWEEP_JSON", "Job", "Run", "SpecError", "SweepReport", "SweepSpec", "apply_overrides",
    "config_from_spec", "check_configs",
    "child_env", "collect", "core_shares", "default_runner", "expand", "fedmoe_validator", "format_cli_value",
    "jobs", "load_config", "load_spec", "parse_exclude_flag", "parse_grid_flag", "parse_set_flag",
    "more_seeds_root", "more_seeds_spec", "parse_value", "read_sweep_json", "run_name", "run_sweep",
    "spec_document",
    "spec_for_collect", "spec_from_dict", "spec_from_flags", "split_top_level", "write_sweep_json",
    "write_tables",
]
