"""The pretraining loop: T5 span corruption (plus reconstruction) on the embedded corpus, from scratch.

`pretrain` trains `SwitchTransformer(config)` and returns its params and loss history;
`input_dependence` measures whether the result uses its encoder input. The recipe and its
measurements: docs/pretraining.md.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedmoe_jax.data.span_corruption import SpanCorruptionStream, embedded_documents
from fedmoe_jax.federated.client import make_train_step
from fedmoe_jax.federated.optimizers import make_optimizer
from fedmoe_jax.federated.preemption import RunInterrupted, requested_stop
from fedmoe_jax.federated.run_checkpoint import RunCheckpointer, abstract_like
from fedmoe_jax.models.objective import LossConfig, SwitchMoE, seq2seq_loss
from fedmoe_jax.models.switch import SwitchConfig, SwitchTransformer

log = logging.getLogger(__name__)

# Hyperparameters of `pretrain` (all part of the cache key).
DEFAULTS: dict[str, Any] = dict(
    batch_size=32,
    input_len=64,
    target_len=16,
    # T5's optimizer: factored second moments, updates scaled by each parameter's RMS and clipped
    # at RMS 1. AdamW at 3e-3 (recipe 2) left the encoder unused even after 20k steps: the decoder
    # became an unconditional span LM (measurements: docs/pretraining.md).
    optimizer="adafactor",
    learning_rate=1e-2,
    warmup_steps=60,
    weight_decay=0.0,
    noise_density=0.15,
    mean_span_length=3.0,
    # share of examples whose target is the chunk's start reconstructed (SpanCorruptionStream): the
    # copy-from-input that extractive RC needs; span corruption alone did not teach it at this scale
    reconstruct_fraction=0.5,
    lb_loss_weight=0.01,
    z_loss_weight=0.001,
    dropout_rate=0.0,  # T5.1.1: no dropout in pretraining (None: the config's)
    # Routing while pretraining: capacity ceil(cf * T / E) per sequence (None: the config's own).
    capacity_factor=2.0,
    clip_norm=1.0,
)
# Batches of `input_dependence` measured after a pretraining, and the gap (nats) under which the
# result is reported as not using its input.
HEALTH_BATCHES = 4
MIN_INPUT_GAP = 0.05


def train_config(config: SwitchConfig, dropout_rate: float | None = DEFAULTS["dropout_rate"],
                 capacity_factor: float | None = DEFAULTS["capacity_factor"]) -> SwitchConfig:
    """The config pretraining runs with: `config` with the pretraining dropout and routing.

    `capacity_factor` (not None) routes with `dispatch="capacity"`, `expert_capacity=None` and that
    factor, whatever the config's own routing (switch-small-16's absolute capacity of 64 slots per
    expert and sequence computes 16x the tokens and makes a step ~3x slower on CPU; Switch
    pretraining used factors of 1.0-1.25). Neither changes a parameter shape.
    """
    if dropout_rate is not None:
        config = config.replace(dropout_rate=float(dropout_rate))
    if capacity_factor is not None:
        config = config.replace(dispatch="capacity", expert_capacity=None,
                                capacity_factor=float(capacity_factor))
    return config


def injected_optimizer(name: str, weight_decay: float) -> optax.GradientTransformation:
    """`optimizers.make_optimizer(name, lr, weight_decay)` with the rate `lr` an injected
    hyperparameter (`state.hyperparams["learning_rate"]`, set per step)."""
    make_optimizer(name, 0.0)  # an unknown name fails here, not inside a trace
    return optax.inject_hyperparams(
        lambda learning_rate: make_optimizer(name, learning_rate, weight_decay))(learning_rate=0.0)


@functools.lru_cache(maxsize=8)
def _programs(cfg: SwitchConfig, optimizer: str, weight_decay: float, clip_norm: float,
              lb_loss_weight: float, z_loss_weight: float):
    """Jitted `(init, optimizer init, train step)`, kept so that repeated pretrainings of a config
    (tests, sweeps) trace and compile once. The learning rate is an argument of the step, not a
    constant, so one program serves any number of steps and any schedule. `train_step` is the whole
    update (loss, gradients, clipping, optimizer); nothing else in the loop touches the params."""
    model = SwitchTransformer(cfg)
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), injected_optimizer(optimizer, weight_decay))

    def init(key, input_len, target_len):
        return model.init(key, jnp.ones((1, input_len), jnp.int32),
                          jnp.ones((1, target_len), jnp.int32))["params"]

    # the engine's one training step; every expert trainable (expert_mask None, no update mask)
    step = make_train_step(SwitchMoE(cfg, LossConfig(0.0, lb_loss_weight, z_loss_weight)), tx)

    def train_step(params, opt_state, batch, key, lr):
        clip_state, inner = opt_state
        opt_state = (clip_state, inner._replace(hyperparams={**inner.hyperparams, "learning_rate": lr}))
        params, opt_state, metrics, _ = step(params, opt_state, batch, key, None)
        return params, opt_state, metrics

    return (jax.jit(init, static_argnums=(1, 2)), jax.jit(tx.init),
            jax.jit(train_step, donate_argnums=(0, 1)))


def learning_rate_schedule(steps: int, learning_rate: float, warmup_steps: int) -> np.ndarray:
    """float32 `[steps]`: the rate of each update from `optax.warmup_cosine_decay_schedule` (linear
    from 0 over `min(warmup, steps // 2)` steps, then a cosine to 0 at `steps`), precomputed so that
    the jitted step takes it as an input."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(warmup_steps, steps // 2), steps)
    return np.asarray(jax.vmap(schedule)(jnp.arange(steps)), np.float32)


def pretrain(
    config: SwitchConfig,
    tokenizer,
    steps: int,
    batch_size: int = DEFAULTS["batch_size"],
    input_len: int = DEFAULTS["input_len"],
    target_len: int = DEFAULTS["target_len"],
    learning_rate: float = DEFAULTS["learning_rate"],
    warmup_steps: int = DEFAULTS["warmup_steps"],
    seed: int = 0,
    progress: bool = True,
    *,
    optimizer: str = DEFAULTS["optimizer"],
    weight_decay: float = DEFAULTS["weight_decay"],
    noise_density: float = DEFAULTS["noise_density"],
    mean_span_length: float = DEFAULTS["mean_span_length"],
    reconstruct_fraction: float = DEFAULTS["reconstruct_fraction"],
    lb_loss_weight: float = DEFAULTS["lb_loss_weight"],
    z_loss_weight: float = DEFAULTS["z_loss_weight"],
    dropout_rate: float | None = DEFAULTS["dropout_rate"],
    capacity_factor: float | None = DEFAULTS["capacity_factor"],
    clip_norm: float = DEFAULTS["clip_norm"],
    documents: Sequence[np.ndarray] | None = None,
    data_dir: str | None = None,
    stats: dict | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 500,
) -> tuple[dict, list[float]]:
    """Pretrain `SwitchTransformer(config)` from scratch with span corruption -> `(params, history)`.

    `optimizer` (`optimizers.make_optimizer`: Adafactor, T5's, by default, or AdamW; `weight_decay`
    decoupled)
    after gradient clipping at global norm `clip_norm`, with linear warmup to `learning_rate`
    over `warmup_steps` (capped at steps // 2) and cosine decay to 0 at `steps`; loss = CE (no label
    smoothing) + `lb_loss_weight` * load balance + `z_loss_weight` * router z-loss
    (`models.switch_loss`). Dropout is `dropout_rate` during pretraining (None: the config's; T5.1.1
    pretrains without) and routing uses `capacity_factor` (see `train_config`). `documents` (token
    arrays without EOS) default to the embedded corpus (`embedded_documents(tokenizer, data_dir)`).
    `history` is the loss of every step. A `stats`
    dict gets `compile_seconds` (the first step), `train_seconds` and `steps_per_second` (the rest),
    and `input_dependence` (`input_dependence` on `HEALTH_BATCHES` batches of another corruption, with
    `span_corruption_gap`: the gap on span-corruption batches alone).
    Measured cost: docs/pretraining.md (switch-small-16: 3.4 steps/s on 2 idle CPU cores).

    `checkpoint_dir`: save the training state (params, optimizer, loss history, the batch stream's
    position) there every `checkpoint_every` steps, and continue from the newest valid one found
    there: the result is bit-identical to an uninterrupted pretraining. Inside an active
    `StopSignals` (the CLI), SIGTERM / SIGINT save at the next step and raise `RunInterrupted`.
    """
    from tqdm.auto import tqdm

    if steps < 1:
        raise ValueError(f"steps={steps}; pretrain needs at least 1 step")
    if config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"config.vocab_size={config.vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size} pieces")
    cfg = train_config(config, dropout_rate, capacity_factor)
    if documents is None:
        documents = embedded_documents(tokenizer, data_dir)
    stream = SpanCorruptionStream(
        documents, input_len, target_len, noise_density, mean_span_length,
        sentinel_start=cfg.vocab_size - 1, seed=seed, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
        unk_id=tokenizer.unk_id, reconstruct_fraction=float(reconstruct_fraction),
    )
    init_fn, opt_init_fn, step_fn = _programs(cfg, str(optimizer), float(weight_decay), float(clip_norm),
                                              float(lb_loss_weight), float(z_loss_weight))
    key = jax.random.key(seed)
    init_key, key = jax.random.split(key)
    params = init_fn(init_key, input_len, target_len)
    opt_state = opt_init_fn(params)
    lrs = learning_rate_schedule(steps, learning_rate, warmup_steps)
    history: list[float] = []
    first, stream_state, checkpointer = 0, None, None
    if checkpoint_dir is not None:
        checkpointer = RunCheckpointer(checkpoint_dir, max_to_keep=2, save_every=checkpoint_every)
        identity = dict(model=cfg.identity(), steps=steps, seed=seed, batch_size=batch_size,
                        input_len=input_len, target_len=target_len, learning_rate=learning_rate,
                        warmup_steps=warmup_steps, optimizer=optimizer, weight_decay=weight_decay,
                        noise_density=noise_density,
                        mean_span_length=mean_span_length, reconstruct_fraction=reconstruct_fraction,
                        lb_loss_weight=lb_loss_weight,
                        z_loss_weight=z_loss_weight, clip_norm=clip_norm, documents=len(documents))
        restored = checkpointer.restore_latest(abstract_like({"params": params, "opt_state": opt_state}),
                                               identity, keys=tuple(identity))
        if restored is not None:
            first, state, meta = restored
            params, opt_state = state["params"], state["opt_state"]
            history, stream_state = list(meta["history"]), meta["stream"]
            log.info("pretraining resumes at step %d of %d from %s", first, steps, checkpoint_dir)
    batches = stream.batches(batch_size, stream_state)
    pending: list[jax.Array] = []

    def flush(bar) -> None:
        if pending:
            history.extend(float(x) for x in jax.device_get(pending))
            bar.update(len(pending))
            bar.set_postfix(loss=f"{history[-1]:.3f}")
            pending.clear()

    def save(step: int, force: bool = False) -> None:
        checkpointer.save(step, {"params": params, "opt_state": opt_state},
                          {**identity, "history": history, "stream": batches.state()}, force=force)

    start = first_done = time.perf_counter()
    with tqdm(total=steps, initial=first, desc="pretrain", unit="step", disable=not progress) as bar:
        try:
            for step in range(first, steps):
                params, opt_state, metrics = step_fn(params, opt_state, next(batches),
                                                     jax.random.fold_in(key, step), lrs[step])
                pending.append(metrics["loss"])
                if step == first:
                    jax.block_until_ready(metrics["loss"])
                    first_done = time.perf_counter()
                due = checkpointer is not None and (step + 1) % checkpoint_every == 0 and step + 1 < steps
                if len(pending) == 10 or step == steps - 1 or due:
                    flush(bar)
                if due:
                    save(step + 1)
                signum = requested_stop()
                if signum is not None and step + 1 < steps:
                    flush(bar)
                    if checkpointer is not None:
                        save(step + 1, force=True)
                    raise RunInterrupted(signum, step + 1, checkpoint_dir, unit="step")
        finally:
            if checkpointer is not None:
                checkpointer.close()
    end = time.perf_counter()
    if not all(math.isfinite(x) for x in history):
        raise FloatingPointError("pretraining diverged (non-finite loss); lower learning_rate")
    if stats is not None:
        done = steps - first
        stats.update(compile_seconds=first_done - start, train_seconds=end - first_done,
                     steps_per_second=(done - 1) / (end - first_done) if done > 1 else None)
        # another packing and corruption of the corpus (seed + 1): the objective as trained, and
        # span corruption alone (the reconstruction half depends on its input by construction)
        def probe(fraction):
            it = dataclasses.replace(stream, seed=seed + 1, reconstruct_fraction=fraction).batches(batch_size)
            return input_dependence(cfg, params, [next(it) for _ in range(HEALTH_BATCHES)])

        stats["input_dependence"] = {**probe(stream.reconstruct_fraction),
                                     "span_corruption_gap": probe(0.0)["gap"]}
    return jax.device_get(params), history


def input_dependence(config: SwitchConfig, params: dict, batches: Sequence[dict[str, np.ndarray]]) -> dict:
    """How much the model's predictions use the encoder input: the span-corruption CE (no router
    losses, deterministic) of each batch with its own inputs and with every example's inputs
    replaced by the next example's (rolled by one along B) -> `{"own_ce", "other_ce", "gap"}`,
    means over `batches` (dicts of `[B, S]` / `[B, T]` arrays as `SpanCorruptionBatches` yields).

    `gap = other_ce - own_ce` (nats per target token) is ~0 when the decoder has become an
    unconditional language model of the targets: recipe 2 (AdamW 3e-3) had 0.000 after 800 steps
    and 0.02 after 20k; a model that fine-tunes to extract answers needs a clear gap.
    """
    cfg = config.replace(dropout_rate=0.0)
    model = SwitchTransformer(cfg)

    @jax.jit
    def ce(p, b, inputs, input_mask):
        batch = {**b, "inputs": inputs, "input_mask": input_mask}
        return seq2seq_loss(model, p, batch, LossConfig(0.0, 0.0, 0.0))[1][0]["ce"]

    own, other = [], []
    for b in batches:
        b = {k: jnp.asarray(v) for k, v in b.items()}
        own.append(float(ce(params, b, b["inputs"], b["input_mask"])))
        other.append(float(ce(params, b, jnp.roll(b["inputs"], 1, 0), jnp.roll(b["input_mask"], 1, 0))))
    own_ce, other_ce = float(np.mean(own)), float(np.mean(other))
    return {"own_ce": own_ce, "other_ce": other_ce, "gap": other_ce - own_ce}
