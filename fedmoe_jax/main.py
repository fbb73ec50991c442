"""The command line: run one experiment (or the pretraining) from an ml_collections config.

    python -m fedmoe_jax.main --config=configs/cpu.py:standard_hetero_t --workdir=runs/fedmoe \
        --config.method=fedmoe --config.seed=1

The same command again resumes an unfinished run (raising `num_rounds` extends a finished one);
a changed seed, model, data or method is refused. Bad input (config, data, checkpoints) exits
with status 2 and one line on stderr; earlier results in the workdir are left as they were.
SIGTERM / SIGINT finish the current round, save a checkpoint and exit with 143 / 130 (128 + signal).
"""

from __future__ import annotations

import logging
import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/cpu.py:standard_hetero_t (ml_collections).")
flags.DEFINE_string("workdir", None, "Run directory: config.json, checkpoints, metrics.jsonl, summary.json.")
flags.DEFINE_list("seeds", [], "Run these seeds of the config together, their rounds vectorized in one "
                  "program (fedmoe_jax.federated.runs); --workdir must then contain {seed}.")
flags.DEFINE_bool("progress", True, "Show tqdm progress bars.")
flags.DEFINE_string("jax_cache", os.environ.get("FEDMOE_JAX_CACHE", ""),
                    "Persistent JAX compilation cache directory ('' = off).")

USAGE_EXIT = 2
NONFINITE_EXIT = 3  # a client update held NaN/inf and on_nonfinite='stop'


def fail(message: str) -> None:
    """One line on stderr, exit status 2."""
    message = re.sub(r"^[\w.]*ConfigError: ", "", message.strip())
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(USAGE_EXIT)


def _unknown_key(e: BaseException, argv: list[str]) -> tuple[str, str | None]:
    """The dotted key of the --config.KEY=V override that named a missing key (`e`: its KeyError),
    and ml_collections' suggestion for it (dotted the same way) when it made one."""
    while isinstance(e, AttributeError | KeyError) and e.args and isinstance(e.args[0], BaseException):
        e = e.args[0]  # ml_collections wraps the KeyError in an AttributeError
    text = str(e.args[0] if e.args else e)
    quoted = re.search(r"'([^']+)'", text)
    name = quoted.group(1) if quoted else text.strip()
    overrides = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    key = next((k for k in overrides if k.rsplit(".", 1)[-1] == name), name)
    hint = re.search(r'Did you mean "([^"]+)"', text)
    return key, (key[:len(key) - len(name)] + hint.group(1)) if hint else None


def _config_problem(e: BaseException, argv: list[str] = ()) -> str:
    """One line for a config file that failed to load or an override that failed to apply."""
    from fedmoe_jax.errors import ConfigError

    while e.__cause__ is not None and not isinstance(e, ConfigError):
        e = e.__cause__
    text = str(e).strip()
    if isinstance(e, ConfigError):
        return text
    if isinstance(e, AttributeError | KeyError):
        key, suggestion = _unknown_key(e, list(argv))
        if key in FLAGS and key != "config":
            return f"unknown config key {key!r}: --{key} is an option of this command, not a config key"
        meant = f" (did you mean {suggestion!r}?)" if suggestion else ""
        return (f"unknown config key {key!r}{meant}: check the --config.KEY=VALUE overrides against "
                "fedmoe_jax/experiment/config.py")
    if isinstance(e, OSError):
        reason = next((ln.strip() for ln in text.splitlines() if "Errno" in ln), text.splitlines()[0])
        return f"the --config file could not be loaded ({reason}); pass e.g. --config=configs/tiny.py"
    return f"the --config could not be loaded: {type(e).__name__}: {text.splitlines()[0] if text else ''}"


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with a one-line exit-2 error instead of a usage dump."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        cause = e.__cause__ or e.__context__
        if isinstance(cause, AttributeError | KeyError | OSError | ValueError) and "flag --" not in str(e):
            fail(_config_problem(cause, argv))
        fail(str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
    except Exception as e:  # noqa: BLE001 - a config file that fails to load is bad input
        fail(_config_problem(e, argv))
    return argv


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; pass options as --flag=value")
    try:
        config = _CONFIG.value
        if config is not None:
            config.get("method")  # a config file that failed to load raises here
    except Exception as e:  # noqa: BLE001
        fail(_config_problem(e, sys.argv))
    if config is None:
        fail("--config is required, e.g. --config=configs/tiny.py")
    if not FLAGS.workdir:
        fail("--workdir is required (the run directory; the same one again resumes)")
    logging.getLogger("fedmoe_jax").setLevel(logging.INFO)
    for noisy in ("absl", "jax"):  # orbax / rouge-score / backend-probing INFO chatter
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if FLAGS.jax_cache:
        import jax

        jax.config.update("jax_compilation_cache_dir", FLAGS.jax_cache)
    from fedmoe_jax.errors import ConfigError
    from fedmoe_jax.federated.loop import MemoryCapExceeded
    from fedmoe_jax.federated.preemption import RunInterrupted
    from fedmoe_jax.federated.trainer import NonFiniteUpdate

    try:
        if config.get("method") == "pretrain":
            from fedmoe_jax.pretrain import run_pretrain

            if "progress" in config:
                config.progress = config.progress and FLAGS.progress
            run_pretrain(config, FLAGS.workdir)  # prints its own summary line
            return
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
    if "comm_gib_per_transfer" in result:
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
