"""A pretraining config (configs/pretrain.py) -> the cached model, `pretrain.json` and a loss plot.

`run_pretrain` is what `python -m fedmoe_jax.pretrain` runs: validate the config, get the entry
through the cache (`cache.pretrained_entry`; trained only on a miss) and write the workdir's report.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from fedmoe_jax.errors import ConfigError
from fedmoe_jax.federated.optimizers import OPTIMIZERS
from fedmoe_jax.federated.preemption import StopSignals
from fedmoe_jax.federated.run_checkpoint import CheckpointError
from fedmoe_jax.models.switch import NAMED_CONFIGS, SwitchConfig, get_config
from fedmoe_jax.pretrain.cache import DEFAULT_CACHE_DIR, SHIPPED_DIR, export_partial_step, pretrained_entry
from fedmoe_jax.pretrain.train import DEFAULTS, MIN_INPUT_GAP


def model_config(config) -> SwitchConfig:
    """The SwitchConfig of a pretrain ConfigDict: `model.name` with `model.num_experts` and
    `model.vocab_size` when not 0."""
    name = config.model.name
    if name not in NAMED_CONFIGS:
        raise ConfigError(f"config.model.name={name!r} is invalid: use one of "
                          f"{', '.join(sorted(NAMED_CONFIGS))}")
    overrides = {}
    for field in ("num_experts", "vocab_size"):
        value = config.model.get(field, 0)
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f"config.model.{field}={value!r} is invalid: use an integer >= 0 "
                              "(0: the named config's)")
        if value:
            overrides[field] = value
    try:
        return get_config(name, **overrides)
    except ValueError as e:
        raise ConfigError(f"config.model is invalid: {e}") from None


def _validate(config) -> None:
    if "method" in config:
        raise ConfigError(f"config.method={config.method!r}: this is an experiment config; run it with "
                          "python -m fedmoe_jax.main (pretraining configs look like configs/pretrain.py)")
    rules = [
        ("steps", config.get("steps", 0) >= 1, "use >= 1"),
        ("seed", config.get("seed", 0) >= 0, "use a non-negative integer"),
        ("batch_size", config.get("batch_size", 0) >= 1, "use >= 1"),
        ("input_len", config.get("input_len", 0) >= 4, "use >= 4"),
        ("target_len", config.get("target_len", 0) >= 3, "use >= 3"),
        ("learning_rate", config.get("learning_rate", 0) > 0, "use > 0"),
        ("optimizer", config.get("optimizer", OPTIMIZERS[0]) in OPTIMIZERS, f"use one of {OPTIMIZERS}"),
        ("weight_decay", config.get("weight_decay", 0.0) >= 0, "use >= 0"),
        ("warmup_steps", config.get("warmup_steps", -1) >= 0, "use >= 0"),
        ("cache_dir", bool(config.get("cache_dir", "x")), "give a folder"),
        ("noise_density", 0 < config.get("noise_density", 0.15) < 1, "use a value in (0, 1)"),
        ("mean_span_length", config.get("mean_span_length", 3.0) >= 1, "use >= 1"),
        ("reconstruct_fraction", 0 <= config.get("reconstruct_fraction", 0.0) <= 1, "use a value in [0, 1]"),
    ]
    for key, ok, fix in rules:
        if not ok:
            raise ConfigError(f"config.{key}={config.get(key)!r} is invalid: {fix}")
    data_dir = config.get("data_dir", "")
    if data_dir:
        from fedmoe_jax.data.embedded import load_manifest

        try:
            load_manifest(data_dir)
        except ValueError as e:
            raise ConfigError(f"config.data_dir={data_dir!r} is invalid: {e}") from None


def _checked(config) -> tuple[SwitchConfig, dict]:
    """A validated config's model and the pretraining hyperparameters it sets (`train.DEFAULTS` keys)."""
    _validate(config)
    return model_config(config), {k: config[k] for k in DEFAULTS if k in config}


def _plot(path: str, history: list[float], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(np.arange(1, len(history) + 1), history, lw=0.8, alpha=0.5, label="per step")
    w = max(1, min(25, len(history) // 10))
    if len(history) >= w > 1:
        smooth = np.convolve(history, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(w, len(history) + 1) - (w - 1) / 2, smooth, lw=1.5, label=f"centred mean of {w}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (CE + router losses)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_pretrain(config, workdir: str) -> dict:
    """Pretrain (through the cache) the model of a `configs/pretrain.py` config; write the report.

    Writes `workdir/pretrain.json` (final loss, steps/s, checkpoint path, whether it came from the
    cache, the loss history) and `workdir/pretrain_loss.png`; returns the summary dict.
    """
    cfg, kwargs = _checked(config)
    os.makedirs(workdir, exist_ok=True)
    start = time.time()
    with StopSignals():  # SIGTERM / SIGINT: checkpoint the pretraining, exit; the same command resumes
        _, info = pretrained_entry(cfg, int(config.steps), config.get("cache_dir") or DEFAULT_CACHE_DIR,
                                   int(config.seed), bool(config.get("progress", True)),
                                   data_dir=config.get("data_dir") or None,
                                   shipped_dir=SHIPPED_DIR if config.get("use_shipped", True) else None,
                                   **kwargs)
    history = info["loss_history"]
    summary = {
        "seed": int(config.seed),
        "model": config.model.name,
        "data_dir": config.get("data_dir") or None,
        "num_experts": cfg.num_experts,
        "num_params": info["num_params"],
        "steps": int(config.steps),
        "hyperparameters": info["key"]["hyperparameters"],
        "checkpoint": os.path.abspath(info["path"]),
        "cached": info["cached"],
        "shipped": info["shipped"],
        "initial_loss": info["initial_loss"],
        "final_loss": info["final_loss"],
        "final_loss_mean20": info["final_loss_mean20"],
        "pretrain_seconds": info["seconds"],
        "compile_seconds": info.get("compile_seconds"),
        "steps_per_second": info["steps_per_second"],
        "input_dependence": info["input_dependence"],
        "wall_seconds": round(time.time() - start, 3),
        "loss_history": history,
    }
    with open(os.path.join(workdir, "pretrain.json"), "w") as f:
        json.dump(summary, f, indent=1)
    _plot(os.path.join(workdir, "pretrain_loss.png"), history,
          f"{config.model.name} ({cfg.num_experts} experts): span-corruption pretraining")
    rate, gap = summary["steps_per_second"], summary["input_dependence"]["gap"]
    source = ("shipped with the package" if info["shipped"] else "loaded from cache" if info["cached"]
              else "trained")
    print(f"pretrained {summary['model']} ({cfg.num_experts} experts, {summary['num_params']:,} params)"
          f" {source}: loss {summary['initial_loss']:.3f} -> "
          f"{summary['final_loss_mean20']:.3f} (mean of last 20 steps), "
          f"{'-' if rate is None else f'{rate:.2f}'} steps/s; input dependence {gap:.3f} nats"
          f"{'' if gap >= MIN_INPUT_GAP else ' (too little: the decoder ignores the encoder)'}; "
          f"checkpoint {summary['checkpoint']}")
    return summary


def export_pretraining(config, step: int, out: str) -> dict:
    """`cache.export_partial_step` for a `configs/pretrain.py` config: its unfinished pretraining at
    checkpoint `step` -> `out` (a Hugging Face directory with the tokenizer, `pretrain_partial.json`).
    A missing step is a `ConfigError` naming the steps there."""
    cfg, kwargs = _checked(config)
    try:
        info = export_partial_step(cfg, int(config.steps), config.get("cache_dir") or DEFAULT_CACHE_DIR,
                                   int(config.seed), step, out, data_dir=config.get("data_dir") or None,
                                   **kwargs)
    except CheckpointError:
        raise
    except ValueError as e:  # the step is not there
        raise ConfigError(str(e)) from None
    history = info["loss_history"]
    tail = history[-min(len(history), 100):]
    print(f"exported {info['entry']} at step {step} of {info['of_steps']} to {out} (loss over the last "
          f"{len(tail)} steps {float(np.mean(tail)):.3f})", flush=True)
    return info
