"""FedMoE Stage 1 (PAPER.md §5): measure expert activation probabilities, then search sub-MoEs.

1. Clients with enough memory fine-tune LoRA adapters on every expert of the full MoE for a few
   federated rounds (default 5): each round every eligible client trains the shared adapters
   locally (base weights frozen, vmapped over clients), and the server averages them weighted by
   training examples.
2. Each eligible client measures p_{i,j} = n_{i,j} / N on its validation split with the adapted
   model (teacher-forced, padding excluded; a token counts for the expert it chose).
3. Clients without enough memory get the static prediction (data-size-weighted mean of the
   measured clients of their task).
4. `initial_maps` runs the Eq. 3 search per client under `mem_fraction * budget`.

The adapters are discarded afterwards; only p is used. Shape letters: N clients, C cohort,
L MoE layers, E experts, K local steps, B batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedmoe_jax.algorithms.fedmoe import search_submodel, static_prediction
from fedmoe_jax.algorithms.memory import MemoryModel
from fedmoe_jax.data.federated import FederatedData
from fedmoe_jax.federated.aggregate import masked_weighted_mean
from fedmoe_jax.federated.client import LossConfig, model_batch
from fedmoe_jax.federated.evaluate import make_cohort_eval
from fedmoe_jax.models.lora import init_lora, merge_lora
from fedmoe_jax.models.switch import SwitchConfig, SwitchTransformer, shift_right, switch_loss

PyTree = Any
STAGE1_SEED_OFFSET = 1_000_003  # Stage 1 batches use their own (seed, round) stream


@dataclasses.dataclass
class Stage1Result:
    probs: np.ndarray  # <f32>[N, L, E] activation probabilities (measured or predicted)
    measured: np.ndarray  # <bool>[N] clients that ran Stage 1
    lora_loss: list[float]  # example-weighted training loss per LoRA round


def run_stage1(
    config: SwitchConfig,
    params: PyTree,
    data: FederatedData,
    eligible: np.ndarray,
    rounds: int = 5,
    rank: int = 8,
    alpha: float = 16.0,
    learning_rate: float = 1e-3,
    local_steps: int = 4,
    batch_size: int = 8,
    seed: int = 0,
    eval_batch_size: int = 16,
    max_eval_examples: int | None = 64,
    loss_config: LossConfig = LossConfig(),
    progress: bool = False,
) -> Stage1Result:
    """Federated LoRA fine-tuning of the full MoE on the eligible clients, then p on validation."""
    eligible = np.asarray(eligible, bool)
    if eligible.shape != (data.num_clients,):
        raise ValueError(f"eligible must have one entry per client ({data.num_clients}), "
                         f"got shape {eligible.shape}")
    cohort = np.flatnonzero(eligible).astype(np.int32)
    tasks = np.asarray([data.partition.task_of(c) for c in range(data.num_clients)])
    missing = sorted(set(tasks) - set(tasks[cohort]))
    if missing:
        raise ValueError(f"no client of task(s) {missing} has memory for Stage 1, so their probabilities "
                         "cannot be predicted; raise their budgets or lower the Stage 1 footprint")
    model = SwitchTransformer(config)
    tx = optax.adamw(learning_rate)
    lora = init_lora(params, config, rank, jax.random.key(seed))

    def local(base, lora, batches, step_mask, rng):
        opt_state = tx.init(lora)

        def step(carry, inputs):
            lora, opt_state = carry
            batch, real, index = inputs
            ex = batch["example_mask"].astype(jnp.float32)
            enc, dec = batch["input_mask"] * ex[:, None], batch["target_mask"] * ex[:, None]
            d_rng, j_rng = jax.random.split(jax.random.fold_in(rng, index))

            def loss_fn(lora):
                out = model.apply({"params": merge_lora(base, lora, alpha, rank)}, batch["inputs"],
                                  shift_right(batch["targets"], config.decoder_start_token_id,
                                              config.pad_token_id),
                                  enc, dec, deterministic=False, rngs={"dropout": d_rng, "jitter": j_rng})
                return switch_loss(out, batch["targets"], dec, loss_config.label_smoothing,
                                   loss_config.lb_loss_weight, loss_config.z_loss_weight)[0]

            loss, grads = jax.value_and_grad(loss_fn)(lora)
            updates, new_state = tx.update(grads, opt_state, lora)
            keep = lambda new, old: jnp.where(real, new, old)  # noqa: E731
            lora = jax.tree.map(keep, optax.apply_updates(lora, updates), lora)
            opt_state = jax.tree.map(keep, new_state, opt_state)
            return (lora, opt_state), loss * real

        (lora, _), losses = jax.lax.scan(step, (lora, opt_state),
                                         (batches, step_mask, jnp.arange(step_mask.shape[0])))
        return lora, losses.sum() / jnp.maximum(step_mask.sum(), 1)

    @jax.jit
    def federated_round(base, lora, batches, step_mask, weights, rngs):
        trained, losses = jax.vmap(local, in_axes=(None, None, 0, 0, 0))(base, lora, batches, step_mask, rngs)
        new = jax.tree.map(lambda v, cur: masked_weighted_mean(v, weights, None, cur), trained, lora)
        return new, jnp.sum(losses * weights) / jnp.maximum(weights.sum(), 1.0)

    history = []
    root = jax.random.key(seed + STAGE1_SEED_OFFSET)
    from tqdm import tqdm

    for r in tqdm(range(rounds), desc="stage 1 (LoRA)", unit="round", disable=not progress):
        batches = data.cohort_batches(cohort, r, seed + STAGE1_SEED_OFFSET, batch_size, num_steps=local_steps)
        keys = jnp.stack([jax.random.fold_in(jax.random.fold_in(root, r), int(c)) for c in cohort])
        lora, loss = federated_round(params, lora, model_batch(batches), batches["step_mask"],
                                     batches["num_examples"].astype(np.float32), keys)
        history.append(float(loss))

    measure = make_cohort_eval(config, data.target_len, decode=False)
    adapted = merge_lora(params, lora, alpha, rank)
    eval_batches = data.cohort_eval_batches(cohort, eval_batch_size, "validation",
                                            max_examples=max_eval_examples)
    stacked = jax.tree.map(lambda a: jnp.broadcast_to(a, (len(cohort),) + a.shape), adapted)
    all_experts = jnp.ones((len(cohort), config.num_moe_layers, config.num_experts), bool)
    _, stats, _ = measure(stacked, eval_batches, all_experts)
    probs = np.zeros((data.num_clients, config.num_moe_layers, config.num_experts), np.float32)
    probs[cohort] = np.asarray(stats.activation_probs)
    sizes = np.asarray(data.num_examples["train"], np.float64)
    probs = static_prediction(probs, sizes, tasks, eligible).astype(np.float32)
    return Stage1Result(probs, eligible, history)


def stage1_eligible(memory: MemoryModel, budgets: np.ndarray, rank: int = 8) -> np.ndarray:
    """Clients whose budget covers the full MoE plus LoRA (training state of the adapters only)."""
    cfg = memory.config
    lora_params = 2 * rank * (cfg.d_model + cfg.d_ff) * cfg.num_experts * cfg.num_moe_layers
    base = memory.full_model_bytes() / memory.state_multiplier  # frozen weights: no grads/moments
    need = base + lora_params * memory.bytes_per_param * memory.state_multiplier + memory.activation_bytes
    return np.asarray(budgets) >= need


def initial_maps(probs: np.ndarray, memory: MemoryModel, budgets: np.ndarray, mem_fraction: float = 0.8,
                 min_experts_per_layer: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 3 per client: maps `<bool>[N, L, E]` and thresholds theta `[N]` under `mem_fraction * M_k`."""
    if not 0 < mem_fraction <= 1:
        raise ValueError(f"mem_fraction={mem_fraction} must be in (0, 1]")
    maps, thetas = [], []
    for k, (p, budget) in enumerate(zip(probs, budgets)):
        try:
            mask, theta = search_submodel(p, memory.expert_bytes, memory.dense_bytes, mem_fraction * budget,
                                          min_experts_per_layer)
        except ValueError as e:
            raise ValueError(f"client {k}: {e}") from None
        maps.append(mask)
        thetas.append(theta)
    return np.stack(maps), np.asarray(thetas)
