"""Demo of the model stack: train a small Switch Transformer on a sequence-reversal task.

Runs on a 2-core CPU in under two minutes: trains with AdamW under `jit` through the engine's one
training step (`fedmoe_jax.federated.client.make_train_step`), shows progress with tqdm,
decodes held-out inputs greedily with the KV cache, and writes to `--workdir`:
`metrics.json` (loss curve, exact-match accuracy, per-layer expert usage), `loss.png` and
`expert_usage.png` (the activation probabilities p[L, E] that FedMoE's Stage 1 is built on).
The main job is the federated pipeline (`make demo`); this is the model stack alone (`make model-demo`).

    python experiments/model_demo.py --config=configs/model_demo.py --config.steps=2000 \
        --workdir=runs/model_demo
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from fedmoe_jax.federated.client import make_train_step
from fedmoe_jax.models import SwitchTransformer, get_config, shift_right
from fedmoe_jax.models.decoding import greedy_decode
from fedmoe_jax.models.objective import LossConfig, SwitchMoE

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "model_demo.py"),
    "Demo config file (ml_collections).")
flags.DEFINE_string("workdir", "runs/model_demo", "Where metrics and figures are written.")

EOS = 1


def make_batch(rng: np.random.Generator, n: int, max_len: int, vocab: int) -> tuple[np.ndarray, ...]:
    """Random token strings (ids 3..V-1, length 3..max_len) -> the same string reversed, then EOS."""
    lengths = rng.integers(3, max_len + 1, n)
    src = np.zeros((n, max_len + 1), np.int32)
    tgt = np.zeros((n, max_len + 1), np.int32)
    for i, n_tok in enumerate(lengths):
        toks = rng.integers(3, vocab, n_tok)
        src[i, :n_tok], src[i, n_tok] = toks, EOS
        tgt[i, :n_tok], tgt[i, n_tok] = toks[::-1], EOS
    return src, (src > 0).astype(np.int32), tgt, (tgt > 0).astype(np.int32)


def plot(workdir: str, losses: list[float], usage: np.ndarray, names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(losses)
    ax.set(xlabel="step", ylabel="training loss", yscale="log", title="Switch Transformer, reversal")
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "loss.png"), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3))
    im = ax.imshow(usage, cmap="viridis", vmin=0.0, aspect="auto")
    ax.set(xlabel="expert", ylabel="MoE layer", title="expert activation probability p[L, E]")
    ax.set_yticks(range(len(names)), names)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "expert_usage.png"), dpi=120)
    plt.close(fig)


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    cfg = _CONFIG.value
    try:
        if cfg.steps < 1 or cfg.batch_size < 1 or cfg.max_len < 3 or cfg.vocab_size < 4:
            raise ValueError("steps and batch_size must be >= 1, max_len >= 3, vocab_size >= 4")
        config = get_config(cfg.model, vocab_size=cfg.vocab_size,
                            expert_capacity=cfg.max_len + 1, **cfg.model_overrides.to_dict())
        os.makedirs(FLAGS.workdir, exist_ok=True)
    except (ValueError, TypeError) as e:
        print(f"error: bad config: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"error: cannot create --workdir {FLAGS.workdir}: {e.strerror}", file=sys.stderr)
        sys.exit(2)
    model = SwitchTransformer(config)
    rng = np.random.default_rng(cfg.seed)
    batch = lambda r, n: make_batch(r, n, cfg.max_len, cfg.vocab_size)  # noqa: E731
    src, src_mask, tgt, tgt_mask = batch(rng, cfg.batch_size)
    params = model.init(jax.random.key(cfg.seed), src, shift_right(tgt))["params"]
    warmup = min(cfg.warmup_steps, cfg.steps // 2)
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, cfg.steps)
    tx = optax.adamw(schedule, weight_decay=cfg.weight_decay)
    opt_state = tx.init(params)
    print(f"devices: {jax.devices()}  model: {config.num_moe_layers} MoE layers x "
          f"{config.num_experts} experts, {sum(x.size for x in jax.tree.leaves(params)):,} params")

    # the engine's one training step (every expert trainable, no dropout: rng None)
    objective = SwitchMoE(config, LossConfig(label_smoothing=0.0, lb_loss_weight=cfg.lb_loss_weight))
    every_expert = jnp.ones((config.num_moe_layers, config.num_experts), bool)
    step_fn = make_train_step(objective, tx)

    @jax.jit
    def train_step(params, opt_state, src, src_mask, tgt, tgt_mask):
        batch = {"inputs": src, "input_mask": src_mask, "targets": tgt, "target_mask": tgt_mask}
        params, opt_state, metrics, _ = step_fn(params, opt_state, batch, None, every_expert)
        return params, opt_state, metrics

    losses = []
    start = time.time()
    with tqdm(range(cfg.steps), desc="train", unit="step") as bar:
        for step in bar:
            params, opt_state, metrics = train_step(params, opt_state, *batch(rng, cfg.batch_size))
            losses.append(float(metrics["loss"]))
            if step % 20 == 0 or step == cfg.steps - 1:
                bar.set_postfix(loss=f"{losses[-1]:.3f}", lb=f"{float(metrics['lb_loss']):.3f}")
    train_s = time.time() - start

    src, src_mask, tgt, tgt_mask = batch(np.random.default_rng(cfg.seed + 1), cfg.eval_examples)
    decoded = greedy_decode(model, params, src, src_mask, max_length=cfg.max_len + 1)
    pred = np.asarray(decoded.tokens)
    exact = float(np.mean(np.all((pred == tgt) | (tgt_mask == 0), axis=1)))
    out = model.apply({"params": params}, src, shift_right(tgt), src_mask, tgt_mask)
    usage = np.asarray(out.routing.activation_probs)
    names = [f"{stack}.block_{i}" for stack, i in config.moe_layer_names]

    metrics = {
        "config": cfg.to_dict(),
        "train_steps": cfg.steps,
        "train_seconds": round(train_s, 2),
        "final_loss": losses[-1],
        "loss_curve": losses,
        "eval_exact_match": exact,
        "eval_examples": int(src.shape[0]),
        "dropped_fraction": [float(x) for x in np.asarray(out.routing.dropped_fraction)],
        "expert_usage": {n: [round(float(p), 4) for p in row] for n, row in zip(names, usage)},
    }
    with open(os.path.join(FLAGS.workdir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    plot(FLAGS.workdir, losses, usage, names)
    print(f"trained {cfg.steps} steps in {train_s:.1f}s, final loss {losses[-1]:.4f}")
    print(f"greedy decoding, held-out exact match: {exact:.1%} of {src.shape[0]} sequences")
    for n, row in zip(names, usage):
        print(f"  {n:18s} p = " + " ".join(f"{p:.2f}" for p in row))
    print(f"wrote {FLAGS.workdir}/metrics.json, loss.png, expert_usage.png")


if __name__ == "__main__":
    app.run(main)
