"""Build one experiment from a config: workdir, data, model, budgets, the method (Stage 1 for FedMoE)
and the trainer. Input problems (config, data, checkpoints) raise `ConfigError` with one line.

Shape letters: N clients, L MoE layers, E experts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedmoe_jax.algorithms.registry import get_method
from fedmoe_jax.experiment.config import (
    SETTINGS,
    ConfigError,
    default_config,
    flatten,
    is_resumable,
    validate,
)
from fedmoe_jax.federated.optimizers import make_optimizer
from fedmoe_jax.files import (
    RUN_CONFIG_FILE,
    STAGE1_FILE,
    json_kind,
    save_npz,
    write_json,
)

log = logging.getLogger("fedmoe_jax")
SUBSAMPLE_SEED = 20240821  # the data slice of CPU-scale runs does not depend on the run seed
PyTree = Any


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def prepare_workdir(config: ml_collections.ConfigDict, workdir: str, write: bool = True) -> bool:
    """Check that `workdir` is writable and holds this run or none (only resumable keys,
    `config.RESUMABLE_KEYS`, may differ from its saved config); with `write`, create or update its
    `config.json`. Returns whether the run is new."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"workdir {workdir} is not writable ({e.strerror}); "
                          "pass a writable --workdir") from None
    path = os.path.join(workdir, RUN_CONFIG_FILE)
    current = config.to_dict()
    if not os.path.exists(path):
        if write:
            write_run_config(config, workdir)
        return True
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        raise ConfigError(f"{path} is unreadable; restore it, or start fresh with a new --workdir") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} holds a JSON {json_kind(saved)}, not a config; restore it, or start "
                          "fresh with a new --workdir")
    saved_flat, current_flat = flatten(saved), flatten(json.loads(json.dumps(current)))
    # A key the saved config lacks (added to the schema since) stands for its default.
    schema = flatten(json.loads(json.dumps(default_config().to_dict())))
    differ = sorted(k for k in set(saved_flat) | set(current_flat)
                    if not is_resumable(k)
                    and saved_flat.get(k, schema.get(k)) != current_flat.get(k, schema.get(k)))
    if differ:
        detail = "; ".join(f"{k}: saved {saved_flat.get(k)!r}, now {current_flat.get(k)!r}"
                           for k in differ[:4])
        raise ConfigError(f"{workdir} holds a different run ({detail}); rerun with its config to resume, "
                          "or pass a new --workdir to start fresh")
    if write:
        write_run_config(config, workdir)  # resumable keys (num_rounds, eval, ...) take the new values
    return False


def write_run_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """The workdir's `config.json`: the resolved config of the run."""
    write_json(os.path.join(workdir, RUN_CONFIG_FILE), config.to_dict())


# ---------------------------------------------------------------------------------------------
# Data and model
# ---------------------------------------------------------------------------------------------
def missing_inputs(config: ml_collections.ConfigDict) -> list[str]:
    """Every input file the config points to that is not there, all of them (not the first): the
    tokenizer, the Hugging Face checkpoint the method starts from (and the one the tokenizer comes
    from), the prepared TFDS datasets. Each item names the config key, the path and what is missing."""
    from fedmoe_jax.checkpoints.hf_switch import CONFIG_FILE, INDEX_FILE, WEIGHTS_FILE
    from fedmoe_jax.data.tokenizer import SPIECE_FILE

    m, d, out = config.model, config.data, []
    if d.tokenizer and not os.path.isfile(d.tokenizer):
        out.append(f"data.tokenizer {d.tokenizer}")
    if m.init == "hf":
        needs: dict[str, list[str]] = {}
        weights_key = "model.baseline_path" if get_method(config.method).full_model else "model.path"
        needs[weights_key] = [CONFIG_FILE, WEIGHTS_FILE]
        if not d.tokenizer:
            needs.setdefault("model.path", []).append(SPIECE_FILE)
        for key, files in needs.items():
            root = m.get(key.split(".")[1])
            if not root:
                out.append(f"{key} (not set)")
                continue
            if WEIGHTS_FILE in files and os.path.isfile(os.path.join(root, INDEX_FILE)):
                files = [f for f in files if f != WEIGHTS_FILE]  # sharded weights: the loader checks them
            lacking = [f for f in files if not os.path.isfile(os.path.join(root, f))]
            if lacking:
                out.append(f"{key} {root}: {', '.join(lacking)}")
    if d.source == "tfds" and d.dir:
        from fedmoe_jax.data.tfds_sources import TASK_DATASETS, is_prepared

        unprepared = [name for name in TASK_DATASETS.values() if not is_prepared(name, d.dir)]
        if unprepared:
            out.append(f"data.dir {d.dir}: {', '.join(unprepared)} not prepared (python -m "
                       "fedmoe_jax.data.tfds_sources prepare --dataset=NAME --data_dir=DIR, where there is "
                       "network)")
    return out


SHIPPED_SOURCES = ("benchmark", "embedded")  # data.source values read from a folder of the package's format


def shipped_data_dir(config: ml_collections.ConfigDict) -> str | None:
    """The folder a shipped-format benchmark is read from: `data.dir`, else the package's copy
    (`benchmark`: `fedmoe_jax/data/benchmark/`; `embedded`: None, the loaders' default). None for a
    source of another format (tfds), whose pretrained model is the embedded corpus's."""
    from fedmoe_jax.data import benchmark_dir

    d = config.data
    if d.source not in SHIPPED_SOURCES:
        return None
    return d.dir or (benchmark_dir() if d.source == "benchmark" else None)


def load_tokenizer(config: ml_collections.ConfigDict):
    from fedmoe_jax.data import embedded_tokenizer
    from fedmoe_jax.data.tokenizer import SPIECE_FILE, Tokenizer

    if config.data.tokenizer:
        return Tokenizer.from_file(config.data.tokenizer)
    if config.model.init == "hf":
        return Tokenizer.from_file(os.path.join(config.model.path, SPIECE_FILE))
    if config.data.source in SHIPPED_SOURCES:
        return embedded_tokenizer(shipped_data_dir(config))
    raise ConfigError("data.source='tfds' with a non-HF model needs data.tokenizer (a spiece.model path)")


def load_task_data(config: ml_collections.ConfigDict) -> dict:
    """`{task: {split: TaskData}}`, each task cut to the configured number of examples."""
    from fedmoe_jax.data import TASKS
    from fedmoe_jax.data.tasks import SPLITS

    d = config.data
    limit = {"train": d.train_examples_per_task or None, "validation": d.eval_examples_per_task or None,
             "test": d.eval_examples_per_task or None}
    if d.source in SHIPPED_SOURCES:
        from fedmoe_jax.data import load_embedded_benchmark

        bench = load_embedded_benchmark(data_dir=shipped_data_dir(config))
        return {t: {s: subsample(data, limit[s], (TASKS.index(t), SPLITS.index(s)))
                    for s, data in splits.items()} for t, splits in bench.items()}
    from fedmoe_jax.data.tfds_sources import load_tfds_task

    return {t: {s: load_tfds_task(t, s, d.dir, max_examples=limit[s]) for s in SPLITS} for t in TASKS}


def pretrain_steps(config: ml_collections.ConfigDict) -> int:
    """`model.pretrain_steps`, or (0) the steps of the models shipped for `data.source`."""
    from fedmoe_jax.pretrain import BENCHMARK_STEPS, DEFAULT_STEPS

    return config.model.pretrain_steps or (BENCHMARK_STEPS if config.data.source == "benchmark"
                                           else DEFAULT_STEPS)


def subsample(data, limit: int | None, stream: tuple[int, ...]):
    """A uniform random subset of `limit` examples (in file order), the same for every run seed:
    the embedded files are sorted by synset id (part of speech first), so a prefix is not a sample."""
    if limit is None or limit >= len(data):
        return data
    rng = np.random.default_rng([SUBSAMPLE_SEED, *stream])
    return data.take(np.sort(rng.choice(len(data), limit, replace=False)))


def make_run_partition(config: ml_collections.ConfigDict, task_data: dict):
    """The run's partition of `task_data` over its clients (setting, Dirichlet alpha, seed)."""
    from fedmoe_jax.data import assign_tasks, make_partition

    d = config.data
    return make_partition(task_data, assign_tasks(d.num_clients, ratios=tuple(d.task_ratios)),
                          setting=SETTINGS[config.setting][1], alpha=d.alpha, min_examples=d.min_examples,
                          seed=config.seed)


def build_federated_data(config: ml_collections.ConfigDict, tokenizer):
    """The tokenized `FederatedData` of the run's partition (`make_run_partition`)."""
    from fedmoe_jax.data import FederatedData

    d = config.data
    task_data = load_task_data(config)
    partition = make_run_partition(config, task_data)
    return FederatedData.build(task_data, partition, tokenizer, d.max_input_len, d.max_target_len)


def model_config(config: ml_collections.ConfigDict, tokenizer, full_model_baseline: bool):
    """The `SwitchConfig` of the method's global model (the smaller MoE for full-model baselines)."""
    from fedmoe_jax.models import get_config

    m = config.model
    overrides: dict[str, Any] = {"vocab_size": tokenizer.vocab_size, **runtime_overrides(config)}
    if full_model_baseline:
        overrides["num_experts"] = m.baseline_num_experts
    return get_config(m.name, **overrides)


def runtime_overrides(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Model fields that do not change parameter shapes: routing capacity, dispatch, dropout, remat."""
    m, out = config.model, {}
    if m.expert_capacity:
        out["expert_capacity"] = m.expert_capacity
    if m.capacity_factor:
        out.update(capacity_factor=m.capacity_factor, expert_capacity=None)
    if m.dispatch:
        out["dispatch"] = m.dispatch
    if m.dropout_rate >= 0:
        out["dropout_rate"] = m.dropout_rate
    if m.remat:
        out["remat"] = m.remat
    return out


def params_fingerprint(params: PyTree) -> str:
    """sha256 (first 16 hex digits) of every leaf's dtype, shape and bytes in tree-path order: which
    initial model a run started from (a pretrained cache entry rebuilt on another machine or with
    other XLA flags can differ in the last bits under the same key)."""
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(params)[0],
                             key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def initial_params(config: ml_collections.ConfigDict, cfg, full_model_baseline: bool, progress: bool):
    """`(SwitchConfig, params)` from the configured source (`model.init`)."""
    from fedmoe_jax.models import SwitchTransformer

    m = config.model
    if m.init == "hf":
        from fedmoe_jax.checkpoints import load_hf_switch

        path = m.baseline_path if full_model_baseline else m.path
        loaded_cfg, params = load_hf_switch(path, **runtime_overrides(config))
        if loaded_cfg.vocab_size < cfg.vocab_size:
            raise ConfigError(f"{path} has vocab {loaded_cfg.vocab_size} < the tokenizer's {cfg.vocab_size}; "
                              "use the checkpoint's own spiece.model")
        return loaded_cfg, params
    if m.init == "pretrained":
        from fedmoe_jax.pretrain import DEFAULT_CACHE_DIR, PretrainedModelMissing, pretrained_params

        try:
            # the model pretrained on this run's shipped corpus and tokenizer (`data.source`, `data.dir`)
            params = pretrained_params(cfg, steps=pretrain_steps(config),
                                       cache_dir=m.path or DEFAULT_CACHE_DIR, seed=0, progress=progress,
                                       build=m.build_pretrained, data_dir=shipped_data_dir(config))
        except PretrainedModelMissing as e:
            raise ConfigError(f"{e}: restore it (a partial checkout?), or pass "
                              "--config.model.build_pretrained=True to pretrain it here") from None
        return cfg, params
    ids = jnp.ones((1, 8), jnp.int32)  # one compiled program, not hundreds of eager ops (start-up)
    init = jax.jit(lambda key: SwitchTransformer(cfg).init(key, ids, ids)["params"])
    params = init(jax.random.key(config.seed))
    return cfg, jax.tree.map(np.asarray, params)


# ---------------------------------------------------------------------------------------------
# Method
# ---------------------------------------------------------------------------------------------
def decoding(config: ml_collections.ConfigDict):
    """The `Decoding` of every evaluation: greedy, or beam search with a length penalty per task
    (`decoding.*`)."""
    from fedmoe_jax.models.decoding import Decoding

    return Decoding(config.decoding.num_beams, tuple(float(p) for p in config.decoding.length_penalty))


def loss_config(config: ml_collections.ConfigDict):
    """The `LossConfig` of local training and Stage 1 (label smoothing, load-balance and z-loss)."""
    from fedmoe_jax.federated.client import LossConfig

    return LossConfig(config.loss.label_smoothing, config.loss.lb_loss_weight, config.loss.z_loss_weight)


def client_budgets(config: ml_collections.ConfigDict, memory) -> np.ndarray:
    """M_k in bytes `[N]`: absolute GB, or fractions of the global model's training memory."""
    from fedmoe_jax.algorithms.memory import draw_budgets

    m = config.memory
    budgets = draw_budgets(config.data.num_clients, m.budget_low, m.budget_high, config.seed, m.budget_step)
    scale = memory.full_model_bytes() if m.relative else 1e9
    return budgets * scale


def fedmoe_start(config, cfg, params, data, memory, budgets, workdir, progress):
    """Stage 1 (LoRA rounds, p on validation, Eq. 3 search), cached in `workdir/stage1.npz`."""
    from fedmoe_jax.algorithms.fedmoe.stage1 import initial_maps, run_stage1, stage1_eligible

    path = None if workdir is None else os.path.join(workdir, STAGE1_FILE)
    if path is not None and os.path.exists(path):
        try:
            with np.load(path) as z:
                out = {k: z[k] for k in z.files}
        except Exception as e:  # zipfile.BadZipFile, pickled or text data, a cut-off member, ...
            raise ConfigError(f"{path} is damaged ({type(e).__name__}); delete it and rerun: Stage 1 is "
                              "measured again") from None
        needed = {"probs", "maps", "measured", "lora_loss", "seconds"}  # what the run and its summary read
        if not needed <= set(out):
            raise ConfigError(f"{path} lacks Stage 1's {', '.join(sorted(needed - set(out)))}; delete it and "
                              "rerun: Stage 1 is measured again")
        return out
    s = config.stage1
    eligible = stage1_eligible(memory, budgets, s.rank)
    start = time.time()
    log.info("Stage 1: %d of %d clients fine-tune LoRA for %d rounds", eligible.sum(), len(eligible),
             s.rounds)
    result = run_stage1(cfg, params, data, eligible, rounds=s.rounds, rank=s.rank, alpha=s.alpha,
                        learning_rate=s.learning_rate, local_steps=s.local_steps,
                        batch_size=config.batch_size,
                        seed=config.seed, eval_batch_size=config.eval_batch_size,
                        max_eval_examples=config.max_eval_examples or None,
                        loss_config=loss_config(config), progress=progress,
                        memory_cap=memory_cap(config), mesh=make_mesh_for(config))  # as the rounds'
    maps, thetas = initial_maps(result.probs, memory, budgets, config.memory.mem_fraction,
                                s.min_experts_per_layer)
    out = {"probs": result.probs, "measured": result.measured, "lora_loss": np.asarray(result.lora_loss),
           "maps": maps, "thetas": thetas, "seconds": np.asarray(time.time() - start)}
    log.info("Stage 1 done in %.0f s: experts per client %.1f (min %d, max %d)", out["seconds"],
             maps.sum((1, 2)).mean(), maps.sum((1, 2)).min(), maps.sum((1, 2)).max())
    if path is not None:
        save_npz(path, **out)
    return out


def build_algorithm(config, cfg, params, data, memory, budgets, workdir, progress):
    """The method's `Algorithm` from the registry (and the Stage 1 result if it ran, else None)."""
    from fedmoe_jax.algorithms.registry import MethodContext
    from fedmoe_jax.algorithms.registry import build_algorithm as build_method

    stage1: dict = {}

    def run_stage1() -> dict:
        if "result" not in stage1:
            stage1["result"] = fedmoe_start(config, cfg, params, data, memory, budgets, workdir, progress)
        return stage1["result"]

    ctx = MethodContext(config, cfg, params, data, memory, budgets, run_stage1)
    return build_method(config.method, ctx), stage1.get("result")


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def make_mesh_for(config: ml_collections.ConfigDict):
    from fedmoe_jax.federated.sharding import make_mesh

    if not config.mesh.enabled or jax.device_count() == 1:
        return None
    if jax.device_count() % config.mesh.experts:
        raise ConfigError(f"mesh.experts={config.mesh.experts} does not divide the {jax.device_count()} "
                          "devices; use a divisor")
    return make_mesh(experts=config.mesh.experts)


def memory_cap(config: ml_collections.ConfigDict) -> int | None:
    """Bytes per device a round may use: `memory_cap_gb`, or (0) the accelerator's own limit."""
    from fedmoe_jax.federated.loop import device_memory_cap

    return int(config.memory_cap_gb * 1e9) if config.memory_cap_gb > 0 else device_memory_cap()


@dataclasses.dataclass
class Experiment:
    """Everything `setup` builds; `run` trains, evaluates and writes the summary."""

    config: ml_collections.ConfigDict
    workdir: str | None
    trainer: Any
    memory: Any
    budgets: np.ndarray
    stage1: dict | None
    setup_seconds: float
    init_fingerprint: str = ""  # `params_fingerprint` of the model the run started from


def check(config: ml_collections.ConfigDict, workdir: str | None) -> None:
    """Validate the config and, with a `workdir`, check that it is writable and holds this run or none
    (nothing is written: `build` writes the run's files once every input has loaded)."""
    validate(config)
    if workdir is not None:
        prepare_workdir(config, workdir, write=False)


def setup(config: ml_collections.ConfigDict, workdir: str | None, progress: bool = True) -> Experiment:
    """`check`, then `build`."""
    check(config, workdir)
    return build(config, workdir, progress)


def build(config: ml_collections.ConfigDict, workdir: str | None, progress: bool = True) -> Experiment:
    """Data, model, Stage 1 and the trainer of a `check`ed config (resuming what `workdir` holds).

    Bad input anywhere here (data, partition, checkpoint, resume) is a `ConfigError`."""
    from fedmoe_jax.algorithms.memory import MemoryModel
    from fedmoe_jax.federated.trainer import FederatedTrainer, RunSettings

    start = time.time()
    missing = missing_inputs(config)
    if missing:
        raise ConfigError(f"missing input(s): {'; '.join(missing)}")
    try:
        tokenizer = load_tokenizer(config)
        data = build_federated_data(config, tokenizer)
        full = get_method(config.method).full_model
        cfg = model_config(config, tokenizer, full)
        cfg, params = initial_params(config, cfg, full, progress)
        memory = MemoryModel(cfg, config.batch_size, data.input_len, data.target_len)
        budgets = client_budgets(config, memory)
        if workdir is not None:  # every input has loaded: only now does the workdir get the run's files
            write_run_config(config, workdir)  # `check` compared it with what the workdir holds
            data.partition.save(os.path.join(workdir, "partition"))
            write_json(os.path.join(workdir, "budgets.json"), {
                "budgets_bytes": budgets.tolist(), "dense_bytes": memory.dense_bytes,
                "expert_bytes": memory.expert_bytes.tolist(), "full_model_bytes": memory.full_model_bytes()})
        algorithm, stage1 = build_algorithm(config, cfg, params, data, memory, budgets, workdir, progress)
        settings = RunSettings(num_rounds=config.num_rounds, cohort_size=config.cohort_size,
                               sampling=SETTINGS[config.setting][0], batch_size=config.batch_size,
                               local_steps=config.local_steps, seed=config.seed, eval_every=config.eval_every,
                               eval_batch_size=config.eval_batch_size,
                               max_eval_examples=config.max_eval_examples or None,
                               on_nonfinite=config.on_nonfinite, max_update_ratio=config.max_update_ratio,
                               memory_cap_bytes=memory_cap(config),
                               full_eval_every=config.eval.full_every)
        optimizer = make_optimizer(config.optimizer, config.learning_rate, config.weight_decay)
        mesh = make_mesh_for(config)
        defining = {k: v for k, v in flatten(config).items() if not is_resumable(k)}
        # a key added to the schema after a checkpoint was written matches it at its default
        schema = {k: v for k, v in flatten(default_config()).items() if not is_resumable(k)}
        trainer = FederatedTrainer(cfg, params, data, tokenizer, algorithm, optimizer, settings,
                                   loss_config(config),
                                   mesh=mesh, workdir=workdir, checkpoint_every=config.checkpoint_every,
                                   run_meta={"config": defining}, run_meta_defaults={"config": schema},
                                   decoding=decoding(config))
    except ConfigError:
        raise
    except ValueError as e:  # the library's input checks: one line naming the problem and the fix
        raise ConfigError(str(e).splitlines()[0]) from None
    log.info("devices: %d x %s; mesh: %s", jax.device_count(), jax.devices()[0].platform,
             "none" if mesh is None else dict(mesh.shape))
    return Experiment(config, workdir, trainer, memory, budgets, stage1, time.time() - start,
                      params_fingerprint(params))
