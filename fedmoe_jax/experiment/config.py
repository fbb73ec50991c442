"""The experiment config schema: every field `fedmoe_jax.main` reads, with the CPU-scale defaults.

Config files under `configs/` start from `default_config()` and change values; `validate` checks
the result before any compute (unknown keys, wrong types, inconsistent values: `ConfigError`, which
the CLI turns into exit status 2 and one line). Fields marked [ASSUMPTION] are ours where the paper
is silent (docs/reproducing.md, "Deviations from the paper").
"""

from __future__ import annotations

import math
import re
import textwrap

import ml_collections

from fedmoe_jax.errors import ConfigError

# setting name -> (sampling, partition): the paper's federated settings
SETTINGS = {
    "standard_hetero_t": ("uniform", "T"),
    "standard_hetero_td": ("uniform", "TD"),
    "enforced_hetero_t": ("enforced", "T"),
    "enforced_hetero_td": ("enforced", "TD"),
}
# data.source values: the two benchmarks shipped in the package, or prepared TFDS datasets
DATA_SOURCES = ("benchmark", "embedded", "tfds")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "fedmoe"  # a registered method (fedmoe_jax.algorithms.registry)
    c.setting = "standard_hetero_t"  # one of SETTINGS: sets the sampling and the data partition
    c.seed = 0  # run seed: cohorts, batches, initialisation, budgets, the partition's Dirichlet draws
    c.num_rounds = 30  # federated rounds (Stage 2); 0: only test the initial model
    c.cohort_size = 5  # Standard settings: 5 of N; Enforced settings sample one client per task (3)
    c.batch_size = 8  # examples per local step
    # Local work per round, the same for every method: 24 AdamW steps at 1e-3 (about 2/3 of an epoch
    # of a CPU-scale client's ~300 examples). Measured with FedMoE on cpu.py:standard_hetero_t, seed
    # 0, test TC / RC / TS: 8 steps at 3e-4: 4.7 / 0.0 / 0.25; 8 at 1e-3: 9.0 / 0.7 / 0.84; 8 at 3e-3:
    # 8.7 / 0.0 / 0.80; 24 at 1e-3: 14.7 / 4.7 / 0.82 (13 minutes per run on one core).
    c.local_steps = 24  # optimizer steps per round (capped by the client's data: one epoch at most)
    c.learning_rate = 1e-3  # constant [ASSUMPTION: paper gives none]
    c.optimizer = "adamw"  # local optimizer: "adamw" or "adafactor" (T5's; federated/optimizers.py)
    c.weight_decay = 0.01  # decoupled (Adafactor: weight_decay_rate; 0 = none)
    c.eval_every = 1  # validate the cohort every this many rounds (drives recommendation)
    c.eval_batch_size = 32  # examples per batch when validating the cohort
    c.max_eval_examples = 64  # per client per validation (0: the whole split)
    c.checkpoint_every = 1  # save the run state every this many rounds (and at a SIGTERM / SIGINT)
    # a diverged client update (NaN/inf, or over max_update_ratio) is always left out of aggregation;
    # "stop": end the run (exit 3), "exclude": record it in metrics.jsonl (`nonfinite_clients`,
    # `exploding_clients`) and go on
    c.on_nonfinite = "exclude"
    # diverged = an update larger than this times the model it started from (||new - old|| /
    # max(||old||, 1)); an aggregate over it ends the run (exit 3); 0: check non-finite values only
    c.max_update_ratio = 10.0
    # memory per device a round may use (GB): the cohort trains in sub-cohorts small enough to fit;
    # 0: the accelerator's own limit, no cap on CPU (where sub-cohorts of 4 are the default anyway)
    c.memory_cap_gb = 0.0

    c.data = ml_collections.ConfigDict()
    # "benchmark" (shipped: WordNet topics, WordNet reading, Debian package summaries; docs/data.md),
    # "embedded" (shipped: the original WordNet-only benchmark, kept as an option) or "tfds"
    # (AG News / SQuAD / XSum)
    c.data.source = "benchmark"
    c.data.dir = ""  # tfds: the prepared data dir; benchmark / embedded: "" = the copy inside the package
    c.data.tokenizer = ""  # a spiece.model; "": the shipped data's, or the HF checkpoint's (model.init="hf")
    c.data.num_clients = 30  # N clients, split over the three tasks by task_ratios
    c.data.task_ratios = (1.0, 1.0, 1.0)  # clients per task (TC, RC, TS), relative
    c.data.alpha = 0.5  # Dirichlet label skew of the TD settings [ASSUMPTION]
    c.data.train_examples_per_task = 3000  # 0: all (CPU scale keeps a slice of each task)
    c.data.eval_examples_per_task = 600  # validation and test examples per task (0: all)
    c.data.max_input_len = 64  # tokens per input (longer inputs are cut)
    c.data.max_target_len = 16  # tokens per target, and the length of greedy decoding
    c.data.min_examples = 2  # per client and split

    c.model = ml_collections.ConfigDict()
    c.model.name = "switch-small-16"  # a name in fedmoe_jax.models.NAMED_CONFIGS
    c.model.init = "pretrained"  # "pretrained" (our pretraining, cached), "hf" (local HF dir), "random"
    c.model.path = ""  # hf: the checkpoint dir; pretrained: cache dir ("" = runs/pretrained)
    c.model.baseline_path = ""  # hf: the full-model baselines' checkpoint (paper: switch-base-8)
    # pretraining steps (they name the model) of init="pretrained"; 0: the shipped models' (benchmark:
    # pretrain.BENCHMARK_STEPS = 30,000; embedded: pretrain.DEFAULT_STEPS = 3,000)
    c.model.pretrain_steps = 0
    # init="pretrained": pretrain the model when it is neither shipped nor cached. False: exit 2 instead
    # (a reproduction that must start from the shipped bytes, not a rebuild that differs in the last bits).
    c.model.build_pretrained = True
    # Full-model baselines (fedprox, scaffold, fedavg, local) train a smaller MoE, as the paper's
    # switch-base-8 next to FedMoE's switch-base-32: same dims, this many experts per layer.
    c.model.baseline_num_experts = 4
    c.model.expert_capacity = 0  # tokens per expert per sequence (0: the named config's)
    # capacity = capacity_factor * tokens / experts of the layer (a client's sub-MoE: the experts it keeps);
    # > 0 replaces expert_capacity. HF's absolute 64 slots per expert suit 512-token inputs; at 64
    # tokens they make the experts compute mostly padding (2.5x slower steps on CPU, measured).
    c.model.capacity_factor = 2.0
    # "dropless" (every routed token computed, nothing dropped; on CPU as batched matmuls over blocks
    # of expert-sorted tokens, 1.1-1.3x faster rounds than capacity factor 2, BENCHMARKS.md) or
    # "capacity" (Switch / Hugging Face semantics: tokens past an expert's capacity are dropped).
    # "": the named config's (capacity).
    c.model.dispatch = "dropless"
    c.model.dropout_rate = -1.0  # < 0: the named config's (Switch: 0.1)
    # Rematerialize each block in training: "none", "full" or "dots" (SwitchConfig.remat; "": the
    # named config's, none). Trades compute for activation memory on GPU/TPU (XLA:CPU saves nothing,
    # BENCHMARKS.md); values do not change, so it may be switched when a run is resumed.
    c.model.remat = ""

    c.loss = ml_collections.ConfigDict()
    c.loss.label_smoothing = 0.1  # of the cross-entropy
    c.loss.lb_loss_weight = 0.001  # Switch load-balancing loss weight
    c.loss.z_loss_weight = 0.001  # router z-loss weight

    c.memory = ml_collections.ConfigDict()
    # Client budgets drawn uniformly from {low, low+step, ..., high}. relative=True: fractions of the
    # global model's training memory (CPU scale); False: GB (paper: 18..24 GB for switch-base-32).
    c.memory.relative = True
    c.memory.budget_low = 0.45  # smallest budget (a fraction, or GB when relative=False)
    c.memory.budget_high = 0.7  # largest budget
    c.memory.budget_step = 0.05  # spacing of the budgets drawn between them
    c.memory.mem_fraction = 0.8  # alpha of Eq. 3 [ASSUMPTION]

    c.stage1 = ml_collections.ConfigDict()
    c.stage1.rounds = 5  # Stage 1: LoRA fine-tuning rounds before measuring expert activations
    c.stage1.rank = 8  # LoRA rank
    c.stage1.alpha = 16.0  # LoRA alpha (scale alpha / rank)
    c.stage1.learning_rate = 1e-3  # of the LoRA fine-tuning
    c.stage1.local_steps = 4  # LoRA steps per Stage 1 round
    c.stage1.min_experts_per_layer = 1  # a sub-MoE keeps at least this many experts in every layer

    c.stage2 = ml_collections.ConfigDict()
    c.stage2.patience = 2  # rounds without improvement before a recommendation [ASSUMPTION]
    c.stage2.num_references = 3  # K of Eq. 5 [ASSUMPTION]
    # [DEVIATION] an equal validation score at a lower validation loss counts as an improvement
    # (patience counter and trial acceptance); without it, scores stuck at 0 roll back every trial
    c.stage2.loss_tie_break = True

    c.random_moe = ml_collections.ConfigDict()
    c.random_moe.experts_per_layer = 4  # paper: 8 of 32; CPU scale: 4 of 16

    c.fedprox = ml_collections.ConfigDict()
    c.fedprox.mu = 0.01  # weight of FedProx's proximal term (mu / 2) ||w - w_global||^2

    c.fedavg_ft = ml_collections.ConfigDict()
    # FedAvg + FT: local steps each client fine-tunes the final global model on its own training data
    # before its test (0: local_steps, one round's worth) [ASSUMPTION: not in the paper]
    c.fedavg_ft.local_steps = 0

    c.eval = ml_collections.ConfigDict()
    c.eval.test_examples = 0  # per client on its test split (0: all it holds)
    c.eval.batch_size = 64  # examples per batch in the final test evaluation
    c.eval.global_model = True  # also score the full global model on every client's test split
    c.eval.unseen_local_steps = 4  # clients never sampled: fine-tune this many steps, then test (0: off)
    c.eval.predictions = 4  # per client and model: decoded test predictions kept in predictions.jsonl
    # validate every client (not only the sampled cohort) every this many rounds and after the last:
    # metrics.jsonl's full_val_score*, the curve of time-to-target (0: off)
    c.eval.full_every = 5

    c.decoding = ml_collections.ConfigDict()
    # How every evaluation generates (in-round validation, which Stage 2 reads, and the final test):
    # 1 greedy, > 1 beam search [ASSUMPTION: the paper does not say; greedy as HF generate by default]
    c.decoding.num_beams = 1
    # per task (TC, RC, TS): beam search ranks finished outputs by log-probability / length ** this
    # (> 0 favours longer outputs; greedy ignores it)
    c.decoding.length_penalty = (1.0, 1.0, 1.0)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.enabled = True  # shard the cohort over all devices when there is more than one
    c.mesh.experts = 1  # size of the expert-parallel mesh axis
    return c


def field_docs(source_of=None) -> dict[str, str]:
    """`{flattened key: its documentation}`, read from the comments beside and above each assignment in
    the source of `source_of` (default: `default_config`), so the schema's comments are its one set of
    docs. A key without a comment maps to ""."""
    import inspect

    docs, block = {}, []
    for line in inspect.getsource(source_of or default_config).splitlines():
        text = line.strip()
        if text.startswith("#"):
            block.append(text.lstrip("# ").strip())
            continue
        match = re.match(r"c\.([\w.]+)\s*=\s*(.*)$", text)
        if match and "ConfigDict()" not in match.group(2):
            inline = match.group(2).split("  # ", 1)[1].strip() if "  # " in match.group(2) else ""
            docs[match.group(1)] = " ".join([*block, inline]).strip()
        block = []
    return docs


def describe_config(config=None) -> str:
    """Every field of `config` (default: `default_config()`) with its value and its documentation
    (`field_docs`); fields that may change when a run is resumed are marked."""
    config = default_config() if config is None else config
    docs, values = field_docs(), flatten(config)
    lines = []
    for key in [*(k for k in docs if k in values), *sorted(set(values) - set(docs))]:  # schema order
        value = values[key]
        mark = "  [may change on resume]" if is_resumable(key) else ""
        lines.append(f"{key} = {value!r}{mark}")
        if docs.get(key):
            lines += [f"    {part}" for part in textwrap.wrap(docs[key], 96)]
    return "\n".join(lines)


# Keys that may change when a run is resumed (everything else defines the run).
RESUMABLE_KEYS = ("num_rounds", "checkpoint_every", "on_nonfinite", "max_update_ratio", "memory_cap_gb",
                  "eval", "mesh", "model.remat", "model.build_pretrained")


def is_resumable(key: str) -> bool:
    """Whether flattened key `key` ("eval.every", "model.remat", ...) may change on resume."""
    return key in RESUMABLE_KEYS or key.split(".")[0] in RESUMABLE_KEYS


def _flatten(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, ml_collections.ConfigDict | dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def flatten(config) -> dict:
    """`{"a.b": value}` for every leaf of a (nested) ConfigDict or dict."""
    return _flatten(config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config)


def _type_ok(value, default) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, tuple | list):
        return isinstance(value, tuple | list) and all(_type_ok(v, default[0]) for v in value)
    return True


def validate(config) -> None:
    """Check a config against the schema before any compute; raise `ConfigError` (one line)."""
    from fedmoe_jax.federated.optimizers import OPTIMIZERS
    from fedmoe_jax.models.switch import NAMED_CONFIGS

    if "method" not in config:
        raise ConfigError("the config has no method, so it is not an experiment config; a pretraining config "
                          "(configs/pretrain.py) runs with python -m fedmoe_jax.pretrain --config=FILE "
                          "--workdir=DIR")
    schema, given = flatten(default_config()), flatten(config)
    unknown = sorted(set(given) - set(schema))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(unknown)}; see fedmoe_jax/experiment/config.py "
                          "for the fields (misspelled?)")
    missing = sorted(set(schema) - set(given))
    if missing:
        raise ConfigError(f"config lacks key(s) {', '.join(missing)}; start config files from "
                          "fedmoe_jax.experiment.config.default_config()")
    for key, default in schema.items():
        if not _type_ok(given[key], default):
            raise ConfigError(f"config.{key}={given[key]!r} has type {type(given[key]).__name__}; "
                              f"expected {type(default).__name__} like the default {default!r}")
        values = given[key] if isinstance(given[key], tuple | list) else (given[key],)
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ConfigError(f"config.{key}={given[key]!r} is not finite: give a finite number")
    from fedmoe_jax.algorithms.registry import get_method, method_names

    c = config
    n = c.data.num_clients
    methods = method_names()
    method = get_method(c.method) if c.method in methods else None
    model = NAMED_CONFIGS.get(c.model.name)
    experts = model.num_experts if model is not None else None
    rules = [
        ("method", method is not None, f"use one of {', '.join(methods)}"),
        ("setting", c.setting in SETTINGS, f"use one of {', '.join(SETTINGS)}"),
        ("seed", c.seed >= 0, "use a non-negative integer"),
        ("num_rounds", c.num_rounds >= 0, "use >= 0"),
        ("data.num_clients", n >= 3, "use >= 3 (every task needs a client)"),
        ("cohort_size", 1 <= c.cohort_size <= n, f"use 1..data.num_clients ({n})"),
        ("batch_size", c.batch_size >= 1, "use >= 1"),
        ("local_steps", c.local_steps >= 1, "use >= 1"),
        ("learning_rate", c.learning_rate > 0, "use > 0"),
        ("weight_decay", c.weight_decay >= 0, "use >= 0"),
        ("eval_every", c.eval_every >= 0, "use >= 0 (0: never)"),
        ("eval_batch_size", c.eval_batch_size >= 1, "use >= 1"),
        ("max_eval_examples", c.max_eval_examples >= 0, "use >= 0 (0: the whole split)"),
        ("checkpoint_every", c.checkpoint_every >= 1, "use >= 1"),
        ("memory_cap_gb", c.memory_cap_gb >= 0, "use >= 0 (0: the accelerator's limit)"),
        ("on_nonfinite", c.on_nonfinite in ("exclude", "stop"), "use 'exclude' or 'stop'"),
        ("max_update_ratio", c.max_update_ratio >= 0, "use >= 0 (0: no ratio check)"),
        ("optimizer", c.optimizer in OPTIMIZERS, f"use one of {', '.join(OPTIMIZERS)}"),
        ("data.source", c.data.source in DATA_SOURCES, f"use one of {', '.join(map(repr, DATA_SOURCES))}"),
        ("data.dir", c.data.source != "tfds" or bool(c.data.dir),
         "data.source='tfds' needs the prepared TFDS dir (python -m fedmoe_jax.data.tfds_sources prepare)"),
        ("data.task_ratios", len(c.data.task_ratios) == 3 and min(c.data.task_ratios) > 0,
         "give three positive weights (TC, RC, TS)"),
        ("data.alpha", c.data.alpha > 0, "use > 0"),
        ("data.train_examples_per_task", c.data.train_examples_per_task >= 0, "use >= 0 (0: all)"),
        ("data.eval_examples_per_task", c.data.eval_examples_per_task >= 0, "use >= 0 (0: all)"),
        ("data.max_input_len", c.data.max_input_len >= 2, "use >= 2"),
        ("data.max_target_len", c.data.max_target_len >= 2, "use >= 2"),
        ("data.min_examples", c.data.min_examples >= 1, "use >= 1"),
        ("model.name", model is not None, f"use one of {', '.join(sorted(NAMED_CONFIGS))}"),
        ("model.init", c.model.init in ("pretrained", "hf", "random"), "use 'pretrained', 'hf' or 'random'"),
        ("model.path", c.model.init != "hf" or bool(c.model.path),
         "model.init='hf' needs a local Hugging Face checkpoint dir"),
        ("model.baseline_path", c.model.init != "hf" or method is None or not method.full_model
         or bool(c.model.baseline_path), "full-model baselines with model.init='hf' need their checkpoint"),
        ("model.pretrain_steps", c.model.pretrain_steps >= 0, "use >= 0 (0: the default)"),
        ("model.expert_capacity", c.model.expert_capacity >= 0, "use >= 0 (0: the named config's)"),
        ("model.capacity_factor", c.model.capacity_factor >= 0, "use >= 0 (0: expert_capacity)"),
        ("model.dispatch", c.model.dispatch in ("", "capacity", "dropless"), "use 'capacity' or 'dropless'"),
        ("model.dropout_rate", c.model.dropout_rate < 1, "use a rate in [0, 1) (< 0: the named config's)"),
        ("model.remat", c.model.remat in ("", "none", "full", "dots"), "use 'none', 'full' or 'dots'"),
        ("loss.label_smoothing", 0 <= c.loss.label_smoothing < 1, "use a value in [0, 1)"),
        ("loss.lb_loss_weight", c.loss.lb_loss_weight >= 0, "use >= 0"),
        ("loss.z_loss_weight", c.loss.z_loss_weight >= 0, "use >= 0"),
        ("memory.budget_low", 0 < c.memory.budget_low <= c.memory.budget_high,
         "need 0 < memory.budget_low <= memory.budget_high"),
        ("memory.budget_high", not c.memory.relative or c.memory.budget_high <= 1,
         "relative budgets are fractions of the full model: use <= 1"),
        ("memory.budget_step", c.memory.budget_step > 0, "use > 0"),
        ("memory.mem_fraction", 0 < c.memory.mem_fraction <= 1, "use a value in (0, 1]"),
        ("stage1.rounds", c.stage1.rounds >= 0, "use >= 0 (0: measure the initial model)"),
        ("stage1.rank", c.stage1.rank >= 1, "use >= 1"),
        ("stage1.alpha", c.stage1.alpha > 0, "use > 0"),
        ("stage1.learning_rate", c.stage1.learning_rate > 0, "use > 0"),
        ("stage1.local_steps", c.stage1.local_steps >= 1, "use >= 1"),
        ("stage2.patience", c.stage2.patience >= 1, "use >= 1"),
        ("stage2.num_references", 1 <= c.stage2.num_references, "use >= 1"),
        ("fedprox.mu", c.fedprox.mu >= 0, "use >= 0"),
        ("fedavg_ft.local_steps", c.fedavg_ft.local_steps >= 0, "use >= 0 (0: local_steps)"),
        ("eval.test_examples", c.eval.test_examples >= 0, "use >= 0 (0: all)"),
        ("eval.batch_size", c.eval.batch_size >= 1, "use >= 1"),
        ("eval.unseen_local_steps", c.eval.unseen_local_steps >= 0, "use >= 0 (0: off)"),
        ("eval.predictions", c.eval.predictions >= 0, "use >= 0 (0: none)"),
        ("eval.full_every", c.eval.full_every >= 0, "use >= 0 (0: off)"),
        ("decoding.num_beams", c.decoding.num_beams >= 1, "use >= 1 (1: greedy)"),
        ("decoding.length_penalty", len(c.decoding.length_penalty) == 3, "use three numbers (TC, RC, TS)"),
        ("mesh.experts", c.mesh.experts >= 1, "use >= 1"),
    ]
    if experts is not None:
        rules += [
            ("model.baseline_num_experts", 1 <= c.model.baseline_num_experts <= experts,
             f"use 1..{experts} (the experts of {c.model.name})"),
            ("random_moe.experts_per_layer", 1 <= c.random_moe.experts_per_layer <= experts,
             f"use 1..{experts} (the experts of {c.model.name})"),
            ("stage1.min_experts_per_layer", 1 <= c.stage1.min_experts_per_layer <= experts,
             f"use 1..{experts} (the experts of {c.model.name})"),
        ]
    if method is not None and method.checks is not None:
        rules += method.checks(c)
    for key, ok, fix in rules:
        if not ok:
            value = flatten(c)[key]
            raise ConfigError(f"config.{key}={value!r} is invalid: {fix}")


def parse_setting_arg(arg: str) -> tuple[str, str | None]:
    """`"setting"` or `"setting,method"` (the `:ARG` of configs/cpu.py and configs/paper.py)."""
    parts = [p.strip() for p in (arg or "standard_hetero_t").split(",")]
    from fedmoe_jax.algorithms.registry import method_names

    if len(parts) > 2 or parts[0] not in SETTINGS or (len(parts) == 2 and parts[1] not in method_names()):
        raise ConfigError(f"config argument {arg!r} must be SETTING or SETTING,METHOD with SETTING in "
                          f"{', '.join(SETTINGS)} and METHOD in {', '.join(method_names())}")
    return parts[0], parts[1] if len(parts) == 2 else None
