"""A finished run's personalized test scores after k local fine-tuning steps, for several k.

FedAvg + FT fine-tunes the final global model for `fedavg_ft.local_steps` steps (default: one round's
`local_steps`) on each client's training data before the client's test. This measures the whole curve
of that choice for any finished run (FedMoE: each client's sub-MoE of the global model) without
training the run again: k = 0 is the model as a method without fine-tuning is scored, and the run's
own k reproduces its summary exactly (same batches, same keys: `FederatedTrainer.evaluate`). With
`learning_rate` the fine-tuning uses that rate instead of the run's (the same optimizer otherwise): a
diagnostic of how much the result depends on it, never a tuned baseline.

The run directory is only read: the run is rebuilt in a temporary directory from a copy of what it
needs (config, partition, budgets, Stage-1 file, metrics and the final round's checkpoint).

    python experiments/fine_tune_curve.py --run=RUN_DIR --steps=0,6,12,24 [--learning_rate=1e-4] \
        [--out=DIR]
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import ml_collections

from fedmoe_jax.errors import ConfigError
from fedmoe_jax.files import PREDICTIONS_FILE, RUN_CONFIG_FILE, STAGE1_FILE, SUMMARY_FILE

# top-level files the rebuilt run does not need (the summary would make the copy a finished run)
_NOT_COPIED = (PREDICTIONS_FILE, SUMMARY_FILE)


def read_run_config(run_dir: str) -> ml_collections.ConfigDict:
    """The resolved config a run wrote to `run_dir/config.json`, keys added to the schema since at their
    defaults, validated (ConfigError, one line, if absent, unreadable or not a run's config)."""
    from fedmoe_jax.experiment.config import default_config, validate

    path = os.path.join(run_dir, RUN_CONFIG_FILE)
    try:
        with open(path) as f:
            saved = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{run_dir} has no {RUN_CONFIG_FILE}: pass the directory of a finished "
                          "run") from None
    except (OSError, ValueError):
        raise ConfigError(f"{path} is unreadable; restore it from the run's copy") from None
    if not isinstance(saved, dict) or not {"method", "setting", "seed", "num_rounds"} <= set(saved):
        raise ConfigError(f"{path} is not a run's config (no method, setting, seed and num_rounds); pass the "
                          "directory of a finished run")
    config = ml_collections.ConfigDict(_over(default_config().to_dict(), saved))
    try:
        validate(config)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return config


def _over(default: dict, saved: dict) -> dict:
    """`saved` laid over `default`, nested dicts merged (a key only `default` has keeps its value)."""
    out = dict(default)
    for k, v in saved.items():
        out[k] = _over(default[k], v) if isinstance(v, dict) and isinstance(default.get(k), dict) else v
    return out


def _copy_run(run_dir: str, workdir: str, final_round: int) -> None:
    """What rebuilding `run_dir`'s final state needs, copied to `workdir`: every top-level file but the
    summary and predictions, and only the final round's checkpoint step."""
    os.makedirs(os.path.join(workdir, "checkpoints"))
    for name in os.listdir(run_dir):
        src = os.path.join(run_dir, name)
        if os.path.isfile(src) and name not in _NOT_COPIED:
            shutil.copy2(src, os.path.join(workdir, name))
    step = str(final_round)
    shutil.copytree(os.path.join(run_dir, "checkpoints", step), os.path.join(workdir, "checkpoints", step))


def fine_tune_curve(run_dir: str, steps: Sequence[int], learning_rate: float | None = None,
                    progress: bool = False) -> dict[str, Any]:
    """Per-task mean test scores (and each client's score) of `run_dir`'s final model after each of
    `steps` local fine-tuning steps per client, every point starting from the same final model.

    Returns {"run", "method", "setting", "seed", "learning_rate", "run_fine_tune_steps", "curve": [
    {"steps": k, "tc_accuracy": .., "rc_f1": .., "ts_rouge2": .., "clients": {id: {"score", "loss"}}}, ...]}
    (the loss: the client's mean test loss, which moves even where a score does not).
    ConfigError (one line) for a directory that holds no finished run or a negative step count."""
    from fedmoe_jax.experiment.build import build
    from fedmoe_jax.experiment.run import fine_tune_steps, finished_summary, mean_scores
    from fedmoe_jax.federated.optimizers import make_optimizer

    if any(k < 0 for k in steps) or not steps:
        raise ConfigError(f"steps={list(steps)}; give one or more step counts >= 0, e.g. 0,6,12,24")
    if learning_rate is not None and not learning_rate > 0:
        raise ConfigError(f"learning_rate={learning_rate}; use > 0, or leave it out for the run's own")
    config = read_run_config(run_dir)
    summary = finished_summary(run_dir, config.num_rounds)
    if summary is None:
        raise ConfigError(f"{run_dir} holds no finished run (no {SUMMARY_FILE} after "
                          f"{config.num_rounds} rounds); finish it first")
    checkpoints = os.path.join(run_dir, "checkpoints")
    rounds = [int(n) for n in os.listdir(checkpoints) if n.isdigit()] if os.path.isdir(checkpoints) else []
    final = max(rounds, default=-1)
    if final < config.num_rounds:  # checked before `build`, which would run Stage 1 again
        raise ConfigError(f"{run_dir} has no checkpoint of its final round {config.num_rounds} (exported "
                          "runs keep none); pass the run directory the run itself wrote")
    if "stage1" in summary and not os.path.isfile(os.path.join(run_dir, STAGE1_FILE)):
        raise ConfigError(f"{run_dir} has no {STAGE1_FILE} (its Stage 1 would be run again, differently); "
                          "pass the run directory the run itself wrote")
    e = config.eval
    with tempfile.TemporaryDirectory(prefix="fine_tune_curve-") as tmp:
        workdir = os.path.join(tmp, "run")
        _copy_run(run_dir, workdir, final)
        try:
            trainer = build(config, workdir, progress).trainer
        except ConfigError as err:  # about the copy: name the run directory instead
            raise ConfigError(str(err).replace(workdir, run_dir)) from None
        try:
            if trainer.server.round < config.num_rounds:
                raise ConfigError(f"{run_dir}'s checkpoint of round {final} is damaged; its final model "
                                  "is not there")
            if learning_rate is not None:
                trainer.set_local_optimizer(make_optimizer(config.optimizer, learning_rate,
                                                           config.weight_decay))
            curve = []
            for k in steps:
                result = trainer.evaluate("test", local_steps=int(k), max_examples=e.test_examples or None,
                                          batch_size=e.batch_size)
                curve.append({"steps": int(k), **mean_scores(result),
                              "clients": {str(c): {"score": r["score"], "loss": r.get("loss")}
                                          for c, r in result["clients"].items()}})
        finally:
            trainer.close()
    return {"run": run_dir, "method": config.method, "setting": config.setting, "seed": config.seed,
            "learning_rate": learning_rate or config.learning_rate,
            "run_fine_tune_steps": fine_tune_steps(config), "curve": curve}


def curve_table(result: dict[str, Any]) -> str:
    """A Markdown table of a `fine_tune_curve` result: one row per step count."""
    from fedmoe_jax.data.tasks import PRIMARY_METRIC, TASKS

    keys = [f"{t}_{PRIMARY_METRIC[t]}" for t in TASKS]
    lines = [f"{result['method']}, {result['setting']}, seed {result['seed']}, fine-tuned at learning "
             f"rate {result['learning_rate']:g} (the run's own k: {result['run_fine_tune_steps']})", "",
             "| steps | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for row in result["curve"]:
        lines.append(f"| {row['steps']} | " + " | ".join(
            f"{row[k]:.2f}" if k in row else "-" for k in keys) + " |")
    return "\n".join(lines)


def run_fine_tune_curve(run_dir: str, steps: Sequence[int], learning_rate: float | None = None,
                        out: str = "", progress: bool = False) -> dict[str, Any]:
    """`fine_tune_curve`, printed as Markdown and, with `out`, written to `out/fine_tune_curve.json` and
    `.md` (nothing is written before the curve is measured)."""
    from fedmoe_jax.files import unwritable, write_report

    if out and (why := unwritable(out, folder=True)):
        raise ConfigError(f"--out={out}: {why}; pass another --out")
    result = fine_tune_curve(run_dir, steps, learning_rate, progress)
    text = curve_table(result)
    print(text)
    if out:
        write_report(out, "fine_tune_curve", result, text)
    return result
