"""One experiment from a config: data, model, Stage 1, the method's rounds, evaluation, summary.

`run_experiment(config, workdir)` is what `python -m fedmoe_jax.main` runs. Everything a run
needs to be resumed or audited lands in `workdir` (the paper's run logging):

    config.json      the resolved config (a rerun with different defining keys is refused)
    partition.*      the client -> task map and example indices (with sha256)
    budgets.json     memory budgets M_k in bytes, the memory model's dense / expert bytes
    stage1.npz       FedMoE variants: p [N, L, E], measured clients, maps and theta after Stage 1
    checkpoints/     orbax checkpoints of the rounds (exact resume)
    metrics.jsonl    one row per round (+ TensorBoard events); FedMoE rows carry their
                     adjust / accept / rollback `events`
    experts.npz      client tasks, initial / final expert maps, latest activation probabilities
    summary.json     final per-task test scores, comm, memory, expert counts (written last)

Input problems (config, data, checkpoints) raise `ConfigError` with one line; the CLI exits 2.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from fedmoe_jax.algorithms.registry import get_method
from fedmoe_jax.data.tasks import TASKS
from fedmoe_jax.errors import ConfigError
from fedmoe_jax.experiment.build import Experiment, build, prepare_workdir
from fedmoe_jax.experiment.config import validate
from fedmoe_jax.federated.preemption import StopSignals
from fedmoe_jax.files import (
    EXPERTS_FILE,
    PREDICTIONS_FILE,
    SUMMARY_FILE,
    atomic_write,
    json_kind,
    save_npz,
    workdir_lock,
    write_json,
)

log = logging.getLogger("fedmoe_jax")


def evaluate_final(exp: Experiment) -> dict[str, Any]:
    """Personalized test scores (after the method's fine-tuning, if it has one: FedAvg + FT), and
    optionally the global model and the never-sampled clients."""
    t, e = exp.trainer, exp.config.eval
    kw = dict(max_examples=e.test_examples or None, batch_size=e.batch_size, predictions=e.predictions)
    out = {"test": t.evaluate("test", local_steps=fine_tune_steps(exp.config), **kw)}
    if e.global_model and t.algorithm.aggregates:
        out["global_test"] = t.evaluate("test", model="global", **kw)
    unseen = t.unseen_clients()
    if e.unseen_local_steps and len(unseen):
        out["unseen_test"] = t.evaluate("test", clients=unseen, local_steps=e.unseen_local_steps, **kw)
    return out


def fine_tune_steps(config: ml_collections.ConfigDict) -> int:
    """The local steps each client fine-tunes before the personalized test (0: the method has none)."""
    steps = get_method(config.method).fine_tune_steps
    return steps(config) if steps else 0


def write_predictions(path: str, trainer, evaluation: dict[str, Any]) -> None:
    """`predictions.jsonl`: one object per kept test example (`client`, `task`, `model`: "own",
    "global" or "unseen", `id`, `prediction`, `references`)."""
    lines = []
    for key, model in (("test", "own"), ("global_test", "global"), ("unseen_test", "unseen")):
        for client, result in evaluation.get(key, {}).get("clients", {}).items():
            task = trainer.data.partition.task_of(int(client))
            lines += [json.dumps({"client": int(client), "task": task, "model": model, **ex})
                      for ex in result.get("examples", [])]
    atomic_write(path, "".join(line + "\n" for line in lines))


def mean_scores(result: dict[str, Any]) -> dict[str, float]:
    """The per-task mean scores of a `FederatedTrainer.evaluate` result (without its per-client detail)."""
    return {k: v for k, v in result.items() if k not in ("clients", "split")}


def write_results(exp: Experiment, evaluation: dict[str, Any], seconds: float) -> dict[str, Any]:
    """`experts.npz` and `summary.json` (last, atomically)."""
    t, config = exp.trainer, exp.config
    summary = t.summary(exp.memory, evaluation["test"])
    summary.update(
        method=config.method, setting=config.setting, seed=config.seed, model=config.model.name,
        num_experts=t.config.num_experts, num_moe_layers=t.config.num_moe_layers,
        test_clients={str(k): {"task": t.data.partition.task_of(k), "score": r["score"]}
                      for k, r in evaluation["test"]["clients"].items()},
        wall_seconds=seconds, config=config.to_dict(), init_fingerprint=exp.init_fingerprint,
    )
    if steps := fine_tune_steps(config):
        summary["fine_tune_steps"] = steps
    for key in ("global_test", "unseen_test"):
        if key in evaluation:
            summary[key] = mean_scores(evaluation[key])
    summary.update(t.algorithm.summary_fields(t.history))
    if exp.stage1 is not None:
        counts = exp.stage1["maps"].sum((1, 2))
        summary["stage1"] = {"experts_mean": float(counts.mean()),
                             "measured": int(exp.stage1["measured"].sum()),
                             "lora_loss": exp.stage1["lora_loss"].tolist(),
                             "seconds": float(exp.stage1["seconds"])}
    if exp.workdir is not None:
        arrays = {"client_tasks": np.asarray([TASKS.index(t.data.partition.task_of(k))
                                              for k in range(t.data.num_clients)], np.int32),
                  "initial_maps": t.initial_maps, "final_maps": t.states.expert_maps,
                  "probs": t.states.probs, "budgets_bytes": exp.budgets}
        if exp.stage1 is not None:
            arrays["stage1_probs"] = exp.stage1["probs"]
        save_npz(os.path.join(exp.workdir, EXPERTS_FILE), **arrays)
        write_predictions(os.path.join(exp.workdir, PREDICTIONS_FILE), t, evaluation)
        write_json(os.path.join(exp.workdir, SUMMARY_FILE), summary)
    return summary


def finished_summary(workdir: str, num_rounds: int) -> dict[str, Any] | None:
    """The run's `summary.json` if it was written after at least `num_rounds` rounds, else None."""
    path = os.path.join(workdir, SUMMARY_FILE)
    try:
        with open(path) as f:
            summary = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        raise ConfigError(f"{path} is unreadable; delete it to evaluate the run again") from None
    if not isinstance(summary, dict):
        raise ConfigError(f"{path} holds a JSON {json_kind(summary)}, not a summary; delete it to "
                          "evaluate the run again (the checkpoints are intact)")
    return summary if summary.get("rounds", -1) >= num_rounds else None


def run_experiment(config: ml_collections.ConfigDict, workdir: str | None, progress: bool = True
                   ) -> dict[str, Any]:
    """Set up (or resume), run the rounds, evaluate on the test splits, write `summary.json`.

    SIGTERM / SIGINT stop the run at the next round boundary with a checkpoint (`RunInterrupted`,
    `fedmoe_jax.federated.preemption`); the same call again resumes."""
    validate(config)  # before the workdir is touched
    with workdir_lock(workdir):  # one run per workdir
        return _run_locked(config, workdir, progress)


def _run_locked(config: ml_collections.ConfigDict, workdir: str | None, progress: bool) -> dict[str, Any]:
    """`run_experiment` once its workdir is locked."""
    start = time.time()
    if workdir is not None:  # validated by the caller; nothing is written before `build`
        prepare_workdir(config, workdir, write=False)
    finished = None if workdir is None else finished_summary(workdir, config.num_rounds)
    if finished is not None:
        log.info("%s already finished %d rounds; summary: %s", workdir, finished["rounds"],
                 os.path.join(workdir, SUMMARY_FILE))
        return finished
    with StopSignals() as stop:  # SIGTERM / SIGINT: checkpoint at the next round boundary and stop
        exp = build(config, workdir, progress)
        t = exp.trainer
        try:
            t.run(progress=progress, stop=stop)
            evaluation = evaluate_final(exp)
            return write_results(exp, evaluation, time.time() - start)
        finally:
            t.close()


def vectorizable(config: ml_collections.ConfigDict) -> str | None:
    """Why the seeds of `config` cannot share one round program (None if they can)."""
    if not get_method(config.method).aggregates:
        return f"method {config.method!r} trains personal models without a server"
    if config.mesh.enabled and jax.device_count() > 1:
        return "the cohort is sharded over several devices (set --config.mesh.enabled=False)"
    return None


def run_experiments(config: ml_collections.ConfigDict, seeds: Sequence[int], workdirs: Sequence[str],
                    progress: bool = True) -> list[dict[str, Any]]:
    """`run_experiment` for several seeds of one config, their rounds vectorized (`RunGroup`).

    Each seed gets its own workdir, data partition, Stage 1, checkpoints and summary, exactly as if
    run alone; finished seeds are skipped, unfinished ones resumed. Methods without a server
    (`local`) and multi-device meshes fall back to one run after another.
    """
    if len(seeds) != len(workdirs) or len(set(workdirs)) != len(workdirs):
        raise ConfigError("give one distinct workdir per seed")
    start = time.time()
    configs = []
    for seed in seeds:
        c = config.copy_and_resolve_references()
        c.seed = int(seed)
        configs.append(c)
    for c in configs:
        validate(c)
    with contextlib.ExitStack() as locks:
        for w in workdirs:
            locks.enter_context(workdir_lock(w))
        return _run_seeds(config, configs, workdirs, progress, start)


def _run_seeds(config, configs, workdirs, progress, start) -> list[dict[str, Any]]:
    """`run_experiments` once every seed's workdir is locked."""
    from fedmoe_jax.federated.runs import RunGroup

    for c, w in zip(configs, workdirs):
        prepare_workdir(c, w, write=False)  # validated by the caller
    results: dict[int, dict[str, Any]] = {}
    todo = []
    for i, (c, w) in enumerate(zip(configs, workdirs)):
        finished = finished_summary(w, c.num_rounds)
        if finished is not None:
            results[i] = finished
        else:
            todo.append(i)
    reason = vectorizable(config)
    if reason is not None or len(todo) < 2:
        if reason is not None and len(todo) > 1:
            log.info("seeds run one after another: %s", reason)
        for i in todo:
            results[i] = _run_locked(configs[i], workdirs[i], progress)
        return [results[i] for i in range(len(configs))]
    exps = []
    with StopSignals() as stop:
        try:
            for i in todo:
                exps.append(build(configs[i], workdirs[i], progress))
            RunGroup([e.trainer for e in exps]).run(progress=progress, stop=stop)
            for i, exp in zip(todo, exps):
                results[i] = write_results(exp, evaluate_final(exp), time.time() - start)
        finally:
            for exp in exps:
                exp.trainer.close()
    return [results[i] for i in range(len(configs))]


__all__ = ["evaluate_final", "finished_summary", "mean_scores", "run_experiment", "run_experiments",
           "vectorizable", "write_results"]
