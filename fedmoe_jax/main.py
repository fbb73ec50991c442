"""The command line: run one experiment from an ml_collections config.

    python -m fedmoe_jax.main --config=configs/cpu.py:standard_hetero_t --workdir=runs/fedmoe \
        --config.method=fedmoe --config.seed=1

The same command again resumes an unfinished run (raising `num_rounds` extends a finished one);
a changed seed, model, data or method is refused. Bad input (config, data, checkpoints) exits
with status 2 and one line on stderr; earlier results in the workdir are left as they were.
SIGTERM / SIGINT finish the current round, save a checkpoint and exit with 143 / 130 (128 + signal).
Pretraining has its own command: `python -m fedmoe_jax.pretrain --config=configs/pretrain.py ...`.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from fedmoe_jax.cli_common import (
    default_compilation_cache,
    exit_if_disk_full,
    fail,
    flags_parser,
    loaded_config,
    use_compilation_cache,
)

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/cpu.py:standard_hetero_t (ml_collections).")
flags.DEFINE_string("workdir", None, "Run directory: config.json, checkpoints, metrics.jsonl, summary.json.")
flags.DEFINE_list("seeds", [], "Run these seeds of the config together, their rounds vectorized in one "
                  "program (fedmoe_jax.federated.runs); --workdir must then contain {seed}.")
flags.DEFINE_bool("progress", True, "Show tqdm progress bars.")
flags.DEFINE_bool("config_help", False, "List every config field with its value (the --config file's and "
                  "overrides', else the defaults) and its documentation, then exit.")
flags.DEFINE_string("jax_cache", default_compilation_cache(),
                    "Persistent JAX compilation cache directory ('' = off); default: $FEDMOE_JAX_CACHE, "
                    "else $JAX_COMPILATION_CACHE_DIR, else ~/.cache/fedmoe_jax/xla.")

NONFINITE_EXIT = 3  # a diverged update (NaN/inf or over max_update_ratio): see federated.rounds
SCHEMA, EXAMPLE = "fedmoe_jax/experiment/config.py", "configs/tiny.py"
parse_flags = flags_parser(SCHEMA, EXAMPLE)


def main(argv: list[str]) -> None:
    if FLAGS.config_help:
        from fedmoe_jax.experiment.config import default_config, describe_config

        if len(argv) > 1:
            fail(f"unexpected arguments {argv[1:]}; pass options as --flag=value")
        print(describe_config(_CONFIG.value if _CONFIG.value is not None else default_config()))
        return
    config = loaded_config(_CONFIG, argv, "method", SCHEMA, EXAMPLE, FLAGS.workdir,
                           "the run directory; the same one again resumes")
    use_compilation_cache(FLAGS.jax_cache)
    from fedmoe_jax.errors import ConfigError
    from fedmoe_jax.federated.loop import MemoryCapExceeded
    from fedmoe_jax.federated.preemption import RunInterrupted
    from fedmoe_jax.federated.trainer import NonFiniteUpdate

    try:
        from fedmoe_jax.experiment import run_experiment, run_experiments

        if FLAGS.seeds:
            seeds, workdirs = seed_workdirs(FLAGS.seeds, FLAGS.workdir)
            for result, workdir in zip(run_experiments(config, seeds, workdirs, FLAGS.progress), workdirs):
                print(format_summary(result, workdir), flush=True)
            return
        result = run_experiment(config, FLAGS.workdir, progress=FLAGS.progress)
    except (ConfigError, MemoryCapExceeded) as e:
        fail(str(e))
    except NonFiniteUpdate as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(NONFINITE_EXIT)
    except RunInterrupted as e:  # SIGTERM / SIGINT: checkpointed at a round boundary
        print(f"interrupted: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_status)
    except Exception as e:
        exit_if_disk_full(e)  # one line, exit 4: free space, the same command resumes
        raise
    print(format_summary(result, FLAGS.workdir), flush=True)


def seed_workdirs(seeds: list[str], template: str) -> tuple[list[int], list[str]]:
    """`--seeds=0,1,2 --workdir=runs/x/seed={seed}` -> the seeds and one workdir per seed."""
    from fedmoe_jax.errors import ConfigError

    try:
        values = [int(s) for s in seeds]
    except ValueError:
        raise ConfigError(f"--seeds={','.join(seeds)} must be integers, e.g. --seeds=0,1,2") from None
    if "{seed}" not in template:
        raise ConfigError(f"--workdir={template} needs a {{seed}} placeholder with --seeds, "
                          "e.g. --workdir=runs/x/seed={seed}")
    if len(set(values)) != len(values) or min(values) < 0:
        raise ConfigError(f"--seeds={','.join(seeds)} must be distinct non-negative integers")
    return values, [template.replace("{seed}", str(s)) for s in values]


def format_summary(result: dict, workdir: str) -> str:
    """A few lines for the terminal: the test scores and where everything is."""
    test = result.get("test", {})
    scores = ", ".join(f"{k} {v:.2f}" for k, v in test.items()) or "no test scores"
    lines = [f"{result.get('method', '?')} ({result.get('setting', '?')}, seed {result.get('seed', '?')}): "
             f"{scores}"]
    if result.get("comm_gib_per_transfer") is not None:  # None: no round ran (num_rounds=0)
        ends = result.get("experts_end", {})
        lines.append(f"  comm {result['comm_gib_per_transfer']:.4f} GiB per transfer; experts per client "
                     f"{ends.get('mean', float('nan')):.1f} (min {ends.get('min')}, max {ends.get('max')})")
    lines.append(f"  results: {os.path.join(workdir, 'summary.json')}; per round: "
                 f"{os.path.join(workdir, 'metrics.jsonl')}; "
                 f"TensorBoard: {os.path.join(workdir, 'tensorboard')}")
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> None:
    app.run(main, argv=argv, flags_parser=parse_flags)


if __name__ == "__main__":
    run()

__all__ = ["format_summary", "main", "run", "seed_workdirs"]
