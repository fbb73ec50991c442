"""FedMoE Stage 1 (the paper's Stage 1): measure expert activation probabilities, then search sub-MoEs.

1. Clients with enough memory fine-tune LoRA adapters on every expert of the full MoE for a few
   federated rounds (default 5): each round every eligible client trains the shared adapters
   locally (base weights frozen and passed once, clients vmapped in sub-cohorts under the memory
   cap like a Stage 2 round), and the server averages them weighted by training examples.
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
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from fedmoe_jax.algorithms.fedmoe.search import search_submodel, static_prediction
from fedmoe_jax.algorithms.memory import MemoryModel
from fedmoe_jax.data.client_arrays import FederatedData
from fedmoe_jax.federated.aggregate import finalize_mean, weighted_sums
from fedmoe_jax.federated.client import LossConfig, make_local_train, model_batch
from fedmoe_jax.federated.evaluate import client_eval_fn
from fedmoe_jax.federated.loop import auto_chunk_size, fit_under_cap, merge_sub_cohorts, sub_cohorts
from fedmoe_jax.federated.sharding import (
    CLIENTS,
    client_sharding,
    pad_clients,
    padded_cohort_size,
    param_sharding,
    place_params,
    replicate,
    replicated,
    shard_cohort,
    to_host,
)
from fedmoe_jax.federated.submodel import narrow_config
from fedmoe_jax.models.lora import init_lora, merge_lora
from fedmoe_jax.models.moe import RoutingStats
from fedmoe_jax.models.objective import SwitchMoE
from fedmoe_jax.models.switch import SwitchConfig, SwitchTransformer

PyTree = Any
STAGE1_SEED_OFFSET = 1_000_003  # Stage 1 batches use their own (seed, round) stream


@dataclasses.dataclass
class Stage1Result:
    probs: np.ndarray  # <f32>[N, L, E] activation probabilities (measured or predicted)
    measured: np.ndarray  # <bool>[N] clients that ran Stage 1
    lora_loss: list[float]  # example-weighted training loss per LoRA round
    chunks: dict[str, int | None] = dataclasses.field(default_factory=dict)  # sub-cohort per program


MEMORY_FIX = ("lower batch_size or data.max_input_len / max_target_len, set model.remat, "
              "or raise memory_cap_gb")


def make_lora_round(config: SwitchConfig, rank: int, alpha: float, learning_rate: float,
                    loss_config: LossConfig = LossConfig(), mesh: Mesh | None = None,
                    chunk: int | None = None) -> Callable[..., tuple[PyTree, jax.Array]]:
    """One federated LoRA round, jitted: `(base, lora, batches [C, K, B, ..], step_mask [C, K],
    weights [C], rngs [C]) -> (lora, loss)`.

    The frozen `base` and the global `lora` are passed once (never per client); each client trains
    its own copy of the adapters (AdamW, K steps), and the result is their example-weighted mean
    (`weights`; an all-zero cohort keeps `lora`). `chunk`: sub-cohorts of that many clients one
    after another (`lax.scan`, summing the weighted adapters), so memory holds one sub-cohort's
    adapters, merged weights and activations at a time; None: all C at once. With a mesh, the
    client axis is sharded over `clients` and `base` follows `param_sharding`.
    """
    all_experts = jnp.ones((config.num_moe_layers, config.num_experts), bool)
    model = SwitchMoE(config, loss_config).narrow(all_experts)  # capacity buffer of the whole layer
    local_train = make_local_train(model, optax.adamw(learning_rate),
                                   merge=lambda lora, base: merge_lora(base, lora, alpha, rank))

    def local(base, lora, batches, step_mask, rng):
        lora, metrics, _ = local_train(lora, batches, step_mask, all_experts, rng, frozen=base)
        return lora, metrics["loss"]

    train = jax.vmap(local, in_axes=(None, None, 0, 0, 0),
                     spmd_axis_name=CLIENTS if mesh is not None else None)

    def sums(base, lora, batches, step_mask, weights, rngs):
        """Weighted sums of one sub-cohort: adapters `(num, den)` per leaf, loss, weight."""
        trained, losses = train(base, lora, batches, step_mask, rngs)
        return (jax.tree.map(lambda v: weighted_sums(v, weights), trained),
                jnp.sum(losses * weights), weights.sum())

    def round_fn(base, lora, batches, step_mask, weights, rngs):
        cohort = (batches, step_mask, weights, rngs)
        c = step_mask.shape[0]
        if chunk is None or chunk >= c:
            adapters, loss_sum, weight = sums(base, lora, *cohort)
        else:
            chunks = sub_cohorts(cohort, c, chunk)
            zero = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                                jax.eval_shape(sums, base, lora, *jax.tree.map(lambda a: a[0], chunks)))
            body = lambda total, xs: (jax.tree.map(jnp.add, total, sums(base, lora, *xs)), None)  # noqa: E731
            (adapters, loss_sum, weight), _ = jax.lax.scan(body, zero, chunks)
        new = jax.tree.map(lambda nd, cur: finalize_mean(nd[0], nd[1], cur), adapters, lora,
                           is_leaf=lambda x: isinstance(x, tuple))
        return new, loss_sum / jnp.maximum(weight, 1.0)

    if mesh is None:
        return jax.jit(round_fn)
    rep, per_client = replicated(mesh), client_sharding(mesh)
    return jax.jit(round_fn, in_shardings=(_base_sharding(config, mesh), rep, per_client, per_client,
                                           per_client, per_client), out_shardings=(rep, rep))


def make_lora_measure(config: SwitchConfig, rank: int, alpha: float, mesh: Mesh | None = None,
                      chunk: int | None = None) -> Callable[..., RoutingStats]:
    """Routing statistics of the adapted model, jitted: `(base, lora, batches [C, K, B, ..]) ->
    RoutingStats [C, L, E]` (teacher-forced, every expert allowed, padding excluded).

    The adapters are merged once and every client applies the same tree (no per-client copy);
    `chunk` / `mesh` as in `make_lora_round`."""
    all_experts = jnp.ones((config.num_moe_layers, config.num_experts), bool)
    # every expert allowed: the capacity buffer of the unrestricted layer (narrow_config)
    one = client_eval_fn(narrow_config(config, all_experts), 1, decode=False)
    measure = jax.vmap(lambda p, b: one(p, b, all_experts)[1], in_axes=(None, 0),
                       spmd_axis_name=CLIENTS if mesh is not None else None)

    def measure_fn(base, lora, batches):
        adapted = merge_lora(base, lora, alpha, rank)
        c = batches["inputs"].shape[0]
        if chunk is None or chunk >= c:
            return measure(adapted, batches)
        _, stats = jax.lax.scan(lambda _, b: (None, measure(adapted, b)), None,
                                sub_cohorts(batches, c, chunk))
        return merge_sub_cohorts(stats, c)

    if mesh is None:
        return jax.jit(measure_fn)
    rep, per_client = replicated(mesh), client_sharding(mesh)
    return jax.jit(measure_fn, in_shardings=(_base_sharding(config, mesh), rep, per_client),
                   out_shardings=per_client)


def _base_sharding(config: SwitchConfig, mesh: Mesh) -> PyTree:
    """`param_sharding` of the base model (from its shapes; no parameters needed)."""
    shapes = jax.eval_shape(lambda: SwitchTransformer(config).init(
        jax.random.key(0), jnp.ones((1, 1), jnp.int32), jnp.ones((1, 1), jnp.int32))["params"])
    return param_sharding(shapes, config, mesh)


def abstract_stage1_args(config: SwitchConfig, rank: int, cohort: int, steps: int, batch: int,
                         input_len: int, target_len: int, eval_steps: int | None = None,
                         eval_batch: int | None = None) -> tuple[tuple, tuple]:
    """`jax.ShapeDtypeStruct` arguments of `make_lora_round` and `make_lora_measure` for a cohort of C
    clients (K `steps` of B examples; `eval_steps` validation batches of `eval_batch`, default K of B):
    no weights needed, for `.lower(...)` and XLA's memory analysis."""
    base = jax.eval_shape(lambda: SwitchTransformer(config).init(
        jax.random.key(0), jnp.ones((1, 1), jnp.int32), jnp.ones((1, 1), jnp.int32))["params"])
    lora = jax.eval_shape(lambda p: init_lora(p, config, rank, jax.random.key(0)), base)

    def batches(k, b=batch):
        i = lambda *shape: jax.ShapeDtypeStruct((cohort, k, b) + shape, jnp.int32)  # noqa: E731
        return {"inputs": i(input_len), "input_mask": i(input_len), "targets": i(target_len),
                "target_mask": i(target_len), "example_mask": i()}

    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), cohort))
    train = (base, lora, batches(steps), jax.ShapeDtypeStruct((cohort, steps), bool),
             jax.ShapeDtypeStruct((cohort,), jnp.float32), keys)
    return train, (base, lora, batches(eval_steps or steps, eval_batch or batch))


def stage1_program(build: Callable[[int | None], Callable], args: tuple, mesh: Mesh | None,
                   chunk_size: int | None | str = "auto", memory_cap: int | None = None,
                   what: str = "a Stage 1 program", tried: dict | None = None) -> tuple[int | None, Callable]:
    """`(chunk, program)` for the cohort of `args` (C = the leading axis of `args[2]`'s leaves), by the
    rule of Stage 2 rounds (`make_round_step`): with `memory_cap` (bytes per device) and "auto", the
    first sub-cohort size whose compiled `build(chunk)` fits (`fit_under_cap`; the sizes tried and
    their bytes land in `tried`); else `chunk_size` ("auto": `auto_chunk_size`)."""
    c = int(jax.tree.leaves(args[2])[0].shape[0])
    if memory_cap is not None and chunk_size == "auto":
        return fit_under_cap(c, mesh, memory_cap, lambda chunk: build(chunk).lower(*args).compile(),
                             {} if tried is None else tried, what, MEMORY_FIX)
    chunk = auto_chunk_size(c, mesh) if chunk_size == "auto" else chunk_size
    return chunk, build(chunk)


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
    chunk_size: int | None | str = "auto",
    memory_cap: int | None = None,
    mesh: Mesh | None = None,
) -> Stage1Result:
    """Federated LoRA fine-tuning of the full MoE on the eligible clients, then p on validation.

    Training and measuring run in sub-cohorts like a Stage 2 round (`chunk_size`, `memory_cap` in
    bytes per device, `mesh`: see `make_round_step`); the chosen sizes are in `Stage1Result.chunks`."""
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
    c, size = len(cohort), padded_cohort_size(len(cohort), mesh)
    pad = (lambda t: pad_clients(t, size)) if size != c else (lambda t: t)  # noqa: E731
    put = (lambda t: t) if mesh is None else (lambda t: shard_cohort(t, mesh))  # noqa: E731
    lora = init_lora(params, config, rank, jax.random.key(seed))
    base = params
    if mesh is not None:
        base, lora = place_params(params, config, mesh), replicate(lora, mesh)

    history, chunks, program = [], {}, None
    root = jax.random.key(seed + STAGE1_SEED_OFFSET)
    from tqdm import tqdm

    for r in tqdm(range(rounds), desc="stage 1 (LoRA)", unit="round", disable=not progress):
        batches = data.cohort_batches(cohort, r, seed + STAGE1_SEED_OFFSET, batch_size, num_steps=local_steps)
        keys = np.stack([jax.random.key_data(jax.random.fold_in(jax.random.fold_in(root, r), int(k)))
                         for k in cohort])
        args = (base, lora) + put((pad(model_batch(batches)), pad(batches["step_mask"]),
                                   pad(batches["num_examples"].astype(np.float32)),
                                   jax.random.wrap_key_data(pad(keys))))
        if program is None:
            chunks["train"], program = stage1_program(
                lambda chunk: make_lora_round(config, rank, alpha, learning_rate, loss_config, mesh, chunk),
                args, mesh, chunk_size, memory_cap, "a Stage 1 LoRA round")
        lora, loss = program(*args)
        history.append(float(to_host(loss)))

    eval_batches = put(pad(model_batch(data.cohort_eval_batches(cohort, eval_batch_size, "validation",
                                                                max_examples=max_eval_examples))))
    args = (base, lora, eval_batches)
    chunks["measure"], measure = stage1_program(
        lambda chunk: make_lora_measure(config, rank, alpha, mesh, chunk), args, mesh, chunk_size, memory_cap,
        "the Stage 1 measurement")
    measured = to_host(measure(*args).activation_probs)[:c]
    probs = np.zeros((data.num_clients, config.num_moe_layers, config.num_experts), np.float32)
    probs[cohort] = measured
    sizes = np.asarray(data.num_examples["train"], np.float64)
    probs = static_prediction(probs, sizes, tasks, eligible).astype(np.float32)
    return Stage1Result(probs, eligible, history, chunks)


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
