"""The cache of pretrained models: one Hugging Face checkpoint per key, shipped or built under a lock.

`pretrained_params(config, steps)` returns the params of the entry `<name>-<sha256 of the key>`:
from the models shipped in `fedmoe_jax/data/pretrained/`, else from `cache_dir`, else trained
(`train.pretrain`) into `cache_dir`. What an entry holds and how the key is made: docs/pretraining.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any

import jax
import numpy as np

from fedmoe_jax.data.span_corruption import tokenizer_fingerprint
from fedmoe_jax.models.switch import SwitchConfig
from fedmoe_jax.pretrain.train import DEFAULTS, MIN_INPUT_GAP, pretrain, train_config

log = logging.getLogger(__name__)

# Bump when the recipe changes what a given key trains (invalidates every cached entry).
# 2: dropout masks and router jitter from models.random (counter hash); 3: Adafactor by default
RECIPE_VERSION = 3
DEFAULT_STEPS = 3000  # the original WordNet-only corpus (fedmoe_jax/data/embedded)
# The WordNet + Debian benchmark (fedmoe_jax/data/benchmark): its loss still fell at 10,000 steps
BENCHMARK_STEPS = 30000
DEFAULT_CACHE_DIR = "runs/pretrained"
# Entries that ship with the package, looked up before the cache: a rebuild on another machine (CPU
# model, XLA flags) differs in the last bits, which thousands of steps amplify into another model, so
# the CPU-scale reproduction starts every run, on every machine, from these committed bytes.
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                           "pretrained")
ENTRY_FILE = "pretrain.json"
# SwitchConfig fields a Hugging Face config.json does not hold (or cannot: expert_capacity=None);
# they are passed back as `load_hf_switch` overrides and do not change parameter shapes.
RUNTIME_FIELDS = ("dispatch", "dropped_token_mode", "renormalize_gates", "capacity_factor",
                  "expert_capacity", "dtype", "param_dtype")


def _hyperparameters(steps: int, seed: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(kwargs) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"unknown pretraining argument(s) {', '.join(unknown)}; use {sorted(DEFAULTS)}")
    hp = {**DEFAULTS, **kwargs}
    for k, default in DEFAULTS.items():  # 1 and 1.0 are one key
        if hp[k] is not None and default is not None:
            hp[k] = type(default)(hp[k])
    return dict(sorted({**hp, "steps": int(steps), "seed": int(seed)}.items()))


def cache_key(config: SwitchConfig, steps: int, seed: int = 0, tokenizer=None, data_dir: str | None = None,
              **pretrain_kwargs: Any) -> dict[str, Any]:
    """Everything a cached pretrained model depends on (its SHA-256 names the entry)."""
    from fedmoe_jax.data.embedded import embedded_dir
    from fedmoe_jax.data.wordnet import MANIFEST_FILE

    if tokenizer is None:
        from fedmoe_jax.data import embedded_tokenizer

        tokenizer = embedded_tokenizer(data_dir)
    hp = _hyperparameters(steps, seed, pretrain_kwargs)
    manifest = embedded_dir(data_dir).joinpath(MANIFEST_FILE).read_bytes()
    return {
        "recipe_version": RECIPE_VERSION,
        "model": train_config(config, hp["dropout_rate"], hp["capacity_factor"]).identity(),
        "hyperparameters": hp,
        "data_manifest_sha256": hashlib.sha256(manifest).hexdigest(),
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
    }


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def entry_name(key: dict[str, Any]) -> str:
    """`d<d_model>-l<enc>x<dec>-e<experts>-v<vocab>-s<steps>-<12 hex of the key's SHA-256>`."""
    m, hp = key["model"], key["hyperparameters"]
    return (f"d{m['d_model']}-l{m['num_layers']}x{m['num_decoder_layers']}-e{m['num_experts']}-"
            f"v{m['vocab_size']}-s{hp['steps']}-{_digest(key)[:12]}")


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _locked(path: str):
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for %s (another process is building this pretrained model)", path)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load_entry(path: str, key: dict[str, Any], trained: SwitchConfig) -> tuple[dict, dict]:
    """`(params, pretrain.json)` of a complete entry; ValueError when anything does not verify."""
    from fedmoe_jax.checkpoints import load_hf_switch
    from fedmoe_jax.checkpoints.hf_switch import WEIGHTS_FILE

    try:
        with open(os.path.join(path, ENTRY_FILE)) as f:
            info = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {ENTRY_FILE}: {e}") from None
    if not isinstance(info, dict) or info.get("key") != key:
        raise ValueError(f"{ENTRY_FILE} does not hold this entry's key")
    weights = os.path.join(path, WEIGHTS_FILE)
    if not os.path.exists(weights) or _file_sha256(weights) != info.get("weights_sha256"):
        raise ValueError(f"{WEIGHTS_FILE} is missing or its SHA-256 differs from {ENTRY_FILE}")
    loaded, params = load_hf_switch(path, **{f: getattr(trained, f) for f in RUNTIME_FIELDS})
    if loaded != trained:
        diff = [f.name for f in dataclasses.fields(trained)
                if getattr(loaded, f.name) != getattr(trained, f.name)]
        raise ValueError(f"config.json differs from the requested model in {', '.join(diff)}")
    dtype = trained.jnp_param_dtype
    return jax.tree.map(lambda x: np.asarray(x, dtype), params), info


def _hf_config(trained: SwitchConfig, hp: dict[str, Any]) -> SwitchConfig:
    """The config an entry is saved with: HF needs an absolute expert capacity, so a None capacity is
    written as the longest sequence (and restored from RUNTIME_FIELDS on load)."""
    if trained.expert_capacity is not None:
        return trained
    return trained.replace(expert_capacity=max(hp["input_len"], hp["target_len"]))


def _entry_of(config: SwitchConfig, steps: int, seed: int, tokenizer, data_dir: str | None,
              pretrain_kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any], SwitchConfig, str]:
    """`(tokenizer, key, trained config, entry name)` of the entry these arguments name (tokenizer
    None: the embedded one of `data_dir`)."""
    if tokenizer is None:
        from fedmoe_jax.data import embedded_tokenizer

        tokenizer = embedded_tokenizer(data_dir)
    key = cache_key(config, steps, seed, tokenizer, data_dir, **pretrain_kwargs)
    hp = key["hyperparameters"]
    return tokenizer, key, train_config(config, hp["dropout_rate"], hp["capacity_factor"]), entry_name(key)


def _build_entry(path: str, key: dict[str, Any], trained: SwitchConfig, config: SwitchConfig,
                 tokenizer, data_dir, progress: bool) -> None:
    from fedmoe_jax.checkpoints import save_hf_switch
    from fedmoe_jax.checkpoints.hf_switch import WEIGHTS_FILE

    hp = key["hyperparameters"]
    kwargs = {k: hp[k] for k in DEFAULTS}
    start, stats = time.time(), {}
    parent = os.path.dirname(path)
    partial = partial_dir(path)
    params, history = pretrain(config, tokenizer, steps=hp["steps"], seed=hp["seed"], progress=progress,
                               data_dir=data_dir, stats=stats, checkpoint_dir=partial, **kwargs)
    seconds = time.time() - start
    health = stats["input_dependence"]
    if health["gap"] < MIN_INPUT_GAP:
        log.warning("pretrained %s uses its input little: span-corruption CE %.3f with its own inputs vs "
                    "%.3f with another example's (gap %.3f < %.2f nats); more steps help",
                    os.path.basename(path), health["own_ce"], health["other_ce"], health["gap"],
                    MIN_INPUT_GAP)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        # with spiece.model: loadable as init="hf"
        save_hf_switch(_hf_config(trained, hp), params, tmp, tokenizer=tokenizer)
        tail = history[-min(len(history), 20):]
        info = {
            "key": key,
            "entry": os.path.basename(path),
            "num_params": int(sum(np.size(x) for x in jax.tree.leaves(params))),
            "loss_history": history,
            "initial_loss": history[0],
            "final_loss": history[-1],
            "final_loss_mean20": float(np.mean(tail)),
            "seconds": round(seconds, 3),  # all of it: corpus, compilation, training
            "compile_seconds": round(stats["compile_seconds"], 3),  # the first step
            "steps_per_second": stats["steps_per_second"],  # the other steps
            "input_dependence": stats["input_dependence"],
            "device": str(jax.devices()[0].platform),
            "num_devices": jax.device_count(),
            "built_with": build_environment(),
            "weights_sha256": _file_sha256(os.path.join(tmp, WEIGHTS_FILE)),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        with open(os.path.join(tmp, ENTRY_FILE), "w") as f:
            json.dump(info, f, indent=1)
        for file in os.listdir(tmp):  # mkdtemp / safetensors make them private; the cache is shared
            os.chmod(os.path.join(tmp, file), 0o644)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(partial, ignore_errors=True)


# The vector extensions XLA:CPU's code generation depends on (a virtual CPU's name often hides them).
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "amx_tile")


def build_environment() -> dict[str, Any]:
    """What a build's last bits depend on besides its key: the CPU (name and vector extensions),
    jax/jaxlib and `XLA_FLAGS`."""
    import platform

    import jaxlib

    cpu, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        cpu, flags = info.get("model name", cpu), set(info.get("flags", "").split())
    return {"cpu": cpu, "isa": [f for f in ISA_FLAGS if f in flags], "cpu_count": os.cpu_count(),
            "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def partial_dir(path: str) -> str:
    """Where an unfinished build of the entry `path` keeps its pretraining checkpoints (resumed by
    the next build; deleted when the entry is complete)."""
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.partial")


def pretrained_entry(
    config: SwitchConfig,
    steps: int = DEFAULT_STEPS,
    cache_dir: str = DEFAULT_CACHE_DIR,
    seed: int = 0,
    progress: bool = True,
    *,
    tokenizer=None,
    data_dir: str | None = None,
    shipped_dir: str | None = SHIPPED_DIR,
    build: bool = True,
    **pretrain_kwargs: Any,
) -> tuple[dict, dict]:
    """`(params, info)`: like `pretrained_params`; `info` is the entry's `pretrain.json` plus `path`,
    `cached` (True when it was loaded without training) and `shipped` (True when it came from
    `shipped_dir`, which is looked up first; None skips it). `build=False`: `PretrainedModelMissing`
    instead of pretraining when the model is neither shipped nor cached."""
    tokenizer, key, trained, name = _entry_of(config, steps, seed, tokenizer, data_dir, pretrain_kwargs)
    from fedmoe_jax.checkpoints.hf_switch import config_to_hf

    config_to_hf(trained.replace(expert_capacity=trained.expert_capacity or 1))  # ValueError early
    os.makedirs(cache_dir, exist_ok=True)
    if shipped_dir and os.path.isdir(os.path.join(shipped_dir, name)):
        shipped = os.path.join(shipped_dir, name)
        try:
            params, info = _load_entry(shipped, key, trained)
            return params, {**info, "path": shipped, "cached": True, "shipped": True}
        except (ValueError, OSError) as e:
            log.warning("the shipped pretrained model %s does not verify (%s; a partial checkout?): "
                        "using the cache in %s instead, whose model may differ in the last bits",
                        shipped, e, cache_dir)
    path = os.path.join(cache_dir, name)
    with _locked(os.path.join(cache_dir, name + ".lock")):
        for stale in os.listdir(cache_dir):  # left by a builder that died (we hold the lock)
            if stale.startswith(f".{name}.tmp-"):
                shutil.rmtree(os.path.join(cache_dir, stale), ignore_errors=True)
        cached = os.path.exists(path)
        if cached:
            try:
                params, info = _load_entry(path, key, trained)
            except (ValueError, OSError) as e:
                log.warning("pretrained model %s is corrupt (%s); rebuilding it", path, e)
                aside = tempfile.mkdtemp(prefix=f".{name}.corrupt-", dir=cache_dir)
                os.replace(path, os.path.join(aside, name))
                shutil.rmtree(aside, ignore_errors=True)
                cached = False
        if not cached and not build:
            raise PretrainedModelMissing(
                f"pretrained model {name} is neither shipped ({shipped_dir}) nor cached in {cache_dir}"
                f" and building it ({steps} steps) is off")
        if not cached:
            log.info("pretraining %s for %d steps (cache miss)", name, steps)
            _build_entry(path, key, trained, config, tokenizer, data_dir, progress)
            params, info = _load_entry(path, key, trained)
    return params, {**info, "path": path, "cached": cached, "shipped": False}


def export_partial_step(config: SwitchConfig, steps: int, cache_dir: str, seed: int, step: int, out: str,
                        *, tokenizer=None, data_dir: str | None = None, **pretrain_kwargs: Any) -> dict:
    """Write the params of an unfinished pretraining at checkpoint `step` (the entry `pretrained_entry`
    would build for these arguments; its `.partial` folder) to `out` as a Hugging Face directory with the
    tokenizer's `spiece.model`, and `out/pretrain_partial.json` (entry, step, key, loss history so far):
    a model that `model.init="hf"` runs start from, to measure how far pretraining has come before it
    ends. Returns that JSON. ValueError (one line) when the step is not there."""
    from fedmoe_jax.checkpoints import save_hf_switch
    from fedmoe_jax.federated.run_checkpoint import read_step_part

    tokenizer, key, trained, name = _entry_of(config, steps, seed, tokenizer, data_dir, pretrain_kwargs)
    partial = partial_dir(os.path.join(cache_dir, name))
    available = sorted(int(n) for n in os.listdir(partial) if n.isdigit()) if os.path.isdir(partial) else []
    if step not in available:
        raise ValueError(f"no pretraining checkpoint of step {step} for {name} in {cache_dir} (steps there: "
                         f"{', '.join(map(str, available)) or 'none'})")
    params, meta = read_step_part(partial, step, "params")  # read only: a live pretraining goes on
    save_hf_switch(_hf_config(trained, key["hyperparameters"]), params, out, tokenizer=tokenizer)
    info = {"entry": name, "step": step, "of_steps": steps, "key": key, "loss_history": meta["history"]}
    with open(os.path.join(out, "pretrain_partial.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


class PretrainedModelMissing(ValueError):
    """The pretrained model is neither shipped nor cached, and building it was not allowed."""


def pretrained_params(
    config: SwitchConfig,
    steps: int = DEFAULT_STEPS,
    cache_dir: str = DEFAULT_CACHE_DIR,
    seed: int = 0,
    progress: bool = True,
    build: bool = True,
    **pretrain_kwargs: Any,
) -> dict:
    """Params of `config` pretrained for `steps` steps: from the cache, else trained and cached.

    `pretrain_kwargs` are `pretrain`'s hyperparameters (`DEFAULTS`), plus `tokenizer` (default: the
    embedded one) and `data_dir` (the embedded benchmark's folder). The entry is
    `cache_dir/<name>-<key sha256[:12]>/` (docs/pretraining.md); the params are NumPy arrays
    in `config.param_dtype`, shaped for `config` (its dropout rate does not enter the key when
    pretraining overrides it, the default). Safe to call from parallel processes. The config must
    be exportable to Hugging Face (top_k=1, no gated FFN, sparse steps that divide the layers).
    `build=False` raises `PretrainedModelMissing` instead of pretraining a model that is neither
    shipped nor cached (for runs that must start from known bytes).
    """
    return pretrained_entry(config, steps, cache_dir, seed, progress, build=build, **pretrain_kwargs)[0]
