r"""Run a grid of experiments with the CLI and collect their results into one table.

    python experiments/sweep.py --spec=configs/sweeps/cpu_table1.json --workers=2
    python experiments/sweep.py --config=configs/cpu.py --arg=standard_hetero_t \
        --grid=method=fedmoe,random_moe --grid=seed=0,1,2 --set=num_rounds=20 --root=runs/sweep --workers=2
    python experiments/sweep.py --collect-only --root=runs/sweep      # rebuild results.csv / results.md

The same command again skips finished runs and resumes the others. Exit status: 0 all finished,
1 some run failed (see ROOT/sweep.json and each run's log.txt), 2 invalid spec or flags (one line,
nothing launched), 130 interrupted (Ctrl-C stops the running children). See fedmoe_jax/tools/sweeps/.
"""

from __future__ import annotations

import signal
import sys

from absl import app, flags

from fedmoe_jax.tools import sweeps as sweep

flags.DEFINE_string("spec", None, "JSON spec file: {config, args, grid, set, exclude, root, runner}.")
flags.DEFINE_string("config", None, "Config file (instead of --spec): configs/cpu.py or configs/cpu.py:ARG.")
flags.DEFINE_multi_string("arg", [], "The config file's :ARG; repeat the flag for several.")
flags.DEFINE_multi_string("grid", [], "KEY=V1,V2,... one grid axis (values parse as JSON, else strings).")
flags.DEFINE_multi_string("set", [], "KEY=VALUE fixed override for every run.")
flags.DEFINE_multi_string("exclude", [], "K1=V1,K2=V2: drop the grid points matching all items ('arg' too).")
flags.DEFINE_string("root", None, f"Sweep directory (default {sweep.DEFAULT_ROOT}; overrides the spec's).")
flags.DEFINE_string("runner", None, "Program run per grid point (default: python -m fedmoe_jax.main).")
flags.DEFINE_integer("workers", 1, "Runs at a time (worker processes).")
flags.DEFINE_bool("rerun", False, "Run finished runs again too (e.g. after raising num_rounds).")
flags.DEFINE_bool("collect-only", False, "Only rebuild ROOT/results.csv and results.md from the run dirs.")
flags.DEFINE_bool("pin_cpus", True, "With several workers, give each a disjoint share of the CPU cores.")
flags.DEFINE_bool("validate", True, "Check every run's config overrides before launching anything.")
flags.DEFINE_bool("progress", True, "Show the tqdm progress bar.")
flags.DEFINE_bool("vectorize_seeds", False, "Run the seeds of each grid point as one process, their "
                  "rounds vectorized in one program (fedmoe_jax.federated.runs; needs a seed axis).")
flags.DEFINE_float("grace", 10.0, "Seconds a stopped run gets after SIGTERM before SIGKILL.")
FLAGS = flags.FLAGS

_DEFINE_FLAGS = ("config", "arg", "grid", "set", "exclude")


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(sweep.EXIT_INVALID)


def parse_flags(argv: list[str]) -> list[str]:
    try:
        return FLAGS(argv)
    except flags.Error as e:
        fail(str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
    return argv


def build_spec() -> sweep.SweepSpec:
    given = [name for name in _DEFINE_FLAGS if FLAGS[name].present]
    if FLAGS.spec:
        if given:
            fail(f"give either --spec or --{'/--'.join(given)}, not both")
        spec = sweep.load_spec(FLAGS.spec)
        d = spec.to_dict()
        if FLAGS.root is not None:
            d["root"] = FLAGS.root
        if FLAGS.runner is not None:
            d["runner"] = FLAGS.runner
        if FLAGS["vectorize_seeds"].present:
            d["vectorize_seeds"] = FLAGS.vectorize_seeds
        return sweep.spec_from_dict(d)
    if FLAGS.config:
        return sweep.spec_from_flags(FLAGS.config, FLAGS.arg, FLAGS.grid, FLAGS.set, FLAGS.exclude,
                                     root=FLAGS.root, runner=FLAGS.runner,
                                     vectorize_seeds=FLAGS.vectorize_seeds)
    if given:
        fail("--config is required with --arg/--grid/--set/--exclude")
    if FLAGS["collect-only"].value and FLAGS.root:
        return sweep.spec_for_collect(FLAGS.root)
    fail("give --spec=FILE or --config=FILE (with --grid/--set), or --collect-only --root=DIR")
    raise AssertionError


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; pass options as --flag=value")
    try:
        spec = build_spec()
        if FLAGS["collect-only"].value:
            csv_path, md_path = sweep.write_tables(spec, sweep.collect(spec))
            print(f"sweep: wrote {csv_path} and {md_path}")
            return
        default_runner = spec.runner == list(sweep.default_runner())
        validator = sweep.fedmoe_validator() if default_runner and FLAGS.validate else None
        signal.signal(signal.SIGTERM, _sigterm)
        report = sweep.run_sweep(spec, FLAGS.workers, rerun=FLAGS.rerun, pin_cpus=FLAGS.pin_cpus,
                                 progress=FLAGS.progress, grace=FLAGS.grace, validator=validator,
                                 validate=FLAGS.validate)
    except sweep.SpecError as e:
        fail(str(e))
    except KeyboardInterrupt:  # before any run started
        print("sweep: interrupted", file=sys.stderr)
        sys.exit(sweep.EXIT_INTERRUPTED)
    c = report.counts()
    print(f"sweep: {c['total']} run(s): {c['done']} done, {c['skipped']} skipped (finished before), "
          f"{c['failed']} failed, {c['interrupted']} interrupted, {c['pending']} not started; "
          f"results: {spec.root}/{sweep.RESULTS_MD}", flush=True)
    sys.exit(report.exit_code)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
