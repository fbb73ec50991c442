r"""Paper-style report (Table 1 / Table 2 analogues, CVI, time-to-target, figures) from run directories.

    python experiments/report.py RUNS_ROOT [--out DIR] [--baseline-methods random_moe,fedprox,scaffold] \
        [--export-runs DIR] [--compare EARLIER_REPORT] [--floor BASELINES_JSON ...] [--seeds-spec FILE]

Finds every `summary.json` under RUNS_ROOT (runs of `python -m fedmoe_jax.main ... --workdir=DIR`) and
writes `report.md`, `table1.json`, `table2.json`, `report.json` and `figures/*.png` to DIR (default
RUNS_ROOT/report). `--export-runs DIR` also copies each run's summary, metrics, expert maps and
config (no checkpoints) to DIR, from which the same report can be rebuilt (`results/` is made so).
Exit status 2 (one line on stderr) for a bad flag, when RUNS_ROOT holds no run, DIR lies inside it,
`--compare` is not a report, or a `--floor` is not a baselines.json, was measured on other test data
than the runs', or claims a setting another one claims. `--seeds-spec FILE` also writes the sweep spec
of the next paired seed the report's "Seeds to add" asks for (`fedmoe_jax.tools.sweeps.more_seeds`;
RUNS_ROOT must be a sweep's root).
See `fedmoe_jax.tools.reports`.
"""

from __future__ import annotations

from absl import app, flags

from fedmoe_jax.cli_common import fail, flags_parser
from fedmoe_jax.tools.reports.cli import run_report
from fedmoe_jax.tools.reports.names import DEFAULT_BASELINES

flags.DEFINE_string("out", None, "Output directory (default: RUNS_ROOT/report).")
flags.DEFINE_list("baseline-methods", list(DEFAULT_BASELINES),
                  "Comma-separated baselines FedMoE is compared with (average improvement, time-to-target).")
flags.DEFINE_string("export-runs", None, "Also copy each run's summary, metrics, expert maps and config (no "
                    "checkpoints) to this directory, e.g. to commit them; the report can be rebuilt from it.")
flags.DEFINE_multi_string("floor", [], "A baselines.json of experiments/baselines.py (or its folder) on the "
                          "runs' data, one per partition (T, TD; repeatable): its best trivial baseline per "
                          "task becomes the floor row of its settings in Table 1.")
flags.DEFINE_string("compare", None, "An earlier report directory (or its table1.json): adds how every "
                    "Table 1 cell moved from it and which FedMoE-vs-baseline directions flipped.")
flags.DEFINE_string("seeds-spec", None, "Also write the sweep spec (JSON) of the next paired seed of FedMoE "
                    "and each baseline it is undecided against (RUNS_ROOT: a sweep's root, with sweep.json).")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        fail(f"expected one RUNS_ROOT (a directory holding run directories), got {argv[1:]}")
    return run_report(argv[1], out=FLAGS.out, baselines=FLAGS["baseline-methods"].value,
                      export_runs=FLAGS["export-runs"].value, compare=FLAGS.compare, floor=FLAGS.floor,
                      seeds_spec=FLAGS["seeds-spec"].value)


if __name__ == "__main__":
    app.run(main, flags_parser=flags_parser())
