"""One federated round as one compiled program: gather sub-MoEs, train the cohort, aggregate.

`make_round_step` returns a callable that, for a (padded) cohort,
  1. gathers each client's kept experts into S slots (`gather_submodel`, vmapped),
  2. trains all clients at once (`make_local_train`, vmapped; the client axis sharded over the
     mesh axis `clients`),
  3. aggregates modularly (`aggregate_cohort`: dense FedAvg, experts over their holders),
and returns the new global parameters, per-client metrics and routing statistics mapped back to
the global expert axis. One program is compiled per slot width S (bucketed), never per round.

Shape letters: C cohort (padded), L MoE layers, E global experts, S slots, K local steps,
B batch, S_in / T input / target tokens.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from fedmoe_jax.federated.algorithm import LocalHooks
from fedmoe_jax.federated.client import (
    LossConfig,
    expert_update_mask,
    make_local_train,
    model_batch,
)
from fedmoe_jax.federated.evaluate import client_eval_fn
from fedmoe_jax.federated.model import FederatedModel, MoELayout, as_federated_model
from fedmoe_jax.federated.sharding import CLIENTS, client_sharding, param_sharding, replicated
from fedmoe_jax.federated.submodel import (
    cohort_sums,
    finalize_aggregate,
    gather_submodel,
    zero_cohort_sums,
)
from fedmoe_jax.models.decoding import Decoding
from fedmoe_jax.models.moe import RoutingStats
from fedmoe_jax.models.switch import SwitchConfig

Array = jax.Array
PyTree = Any
log = logging.getLogger(__name__)


@dataclasses.dataclass
class RoundOutput:
    """Result of one round. Arrays have the padded cohort axis C first where per client."""

    params: PyTree  # new global parameters (the aggregate)
    # [C] each: loss, ce, lb_loss, z_loss, num_steps, finite (1: aggregated), and `routing_counts`
    metrics: dict[str, Array]
    routing: RoutingStats  # tokens_per_expert / prob_mass [C, L, E]; dropped, num_tokens [C, L]
    held: Array  # <bool>[L, E] experts held by a weighted cohort client (the ones aggregation moved)
    client_params: PyTree | None = None  # the cohort's trained sub-MoEs [C, ...] (return_clients=True)
    # with `eval_batches`: each trained sub-MoE on them, (loss [C], RoutingStats [C, L, S], tokens [C, ...])
    evaluation: tuple | None = None


def to_global_experts(stats: RoutingStats, indices: Array, valid: Array, num_experts: int) -> RoutingStats:
    """Map per-slot statistics `[C, L, S]` onto the global expert axis `[C, L, E]`."""
    onehot = jax.nn.one_hot(indices, num_experts, dtype=jnp.float32) * valid[..., None]
    return stats.replace(
        tokens_per_expert=jnp.einsum("clse,cls->cle", onehot, stats.tokens_per_expert),
        prob_mass=jnp.einsum("clse,cls->cle", onehot, stats.prob_mass),
    )


def routing_counts(stats: RoutingStats) -> dict[str, Array]:
    """`routed` / `dropped`: real token-choices routed / dropped by capacity, summed over the MoE
    layers `[C]` (sums: they add over steps and sub-cohorts)."""
    return {"routed": stats.tokens_per_expert.sum((-2, -1)), "dropped": stats.dropped.sum(-1)}


def sub_cohorts(tree: PyTree, c: int, chunk: int) -> PyTree:
    """Leaves `[C, ...]` -> `[C / chunk, chunk, ...]`, for a `lax.scan` over sub-cohorts."""
    if c % chunk:
        raise ValueError(f"cohort of {c} is not a multiple of chunk_size={chunk}")
    return jax.tree.map(lambda a: a.reshape((c // chunk, chunk) + a.shape[1:]), tree)


def merge_sub_cohorts(tree: PyTree, c: int) -> PyTree:
    """Inverse of `sub_cohorts`: leaves `[C / chunk, chunk, ...]` -> `[C, ...]`."""
    return jax.tree.map(lambda a: a.reshape((c,) + a.shape[2:]), tree)


def update_ratio(new: PyTree, old: PyTree) -> Array:
    """`||new - old||_2 / max(||old||_2, 1)`, global norms over all leaves (a scalar; `jax.vmap` it
    for one ratio per client). The floor of 1 keeps a model that starts near zero from flagging
    ordinary steps."""
    sq = lambda t: sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(t))  # noqa: E731
    return jnp.sqrt(sq(jax.tree.map(jnp.subtract, new, old))) / jnp.maximum(jnp.sqrt(sq(old)), 1.0)


def exclude_diverged(trained: PyTree, received: PyTree, metrics: dict[str, Array],
                     max_update_ratio: float = 0.0) -> tuple[PyTree, dict[str, Array]]:
    """Clients whose local update diverged get their received parameters back (leaves `[C, ...]`)
    and `metrics["finite"] = 0` (aggregation weight 0): one client's divergence never poisons the
    global model. Diverged: local training went non-finite (`metrics["finite"]` `<f32>[C]` = 0, from
    `make_local_train`: a NaN/inf parameter or loss at some step), the mean loss is not finite, or
    (with `max_update_ratio` > 0) the update is finite but exploding, `update_ratio(trained,
    received) > max_update_ratio`. `metrics["update_ratio"]` `[C]`: that ratio, inf for a non-finite
    client."""
    finite = (metrics["finite"] > 0) & jnp.isfinite(metrics["loss"])
    ratio = jax.vmap(update_ratio)(trained, received)
    ratio = jnp.where(finite & jnp.isfinite(ratio), ratio, jnp.inf)
    ok = jnp.isfinite(ratio)
    if max_update_ratio > 0:
        ok = ok & (ratio <= max_update_ratio)

    def keep(t, r):
        return jnp.where(ok.reshape((-1,) + (1,) * (t.ndim - 1)), t, r)

    return (jax.tree.map(keep, trained, received),
            {**metrics, "finite": ok.astype(jnp.float32), "update_ratio": ratio})


# Clients per sub-cohort on CPU. Measured (experiments/benchmark.py, cpu-small, 8 clients x 4 steps,
# 2-core machine, idle): all 8 vmapped 6.2 client-steps/s, sub-cohorts of 4: 7.4, of 2: 7.1, of 1
# (a scan over clients): 7.1; each client jitted on its own: 6.7. Wider vmaps turn the model's matmuls
# into batched ones that XLA:CPU runs less well, and hold more activations at once.
CPU_CHUNK = 4


def auto_chunk_size(cohort: int, mesh: Mesh | None) -> int | None:
    """Sub-cohort size for `make_round_step(chunk_size="auto")`: on the CPU backend without a mesh,
    the largest divisor of `cohort` up to `CPU_CHUNK`; otherwise None (the whole cohort vmapped)."""
    if mesh is not None or jax.default_backend() != "cpu":
        return None
    return max(d for d in range(1, min(CPU_CHUNK, cohort) + 1) if cohort % d == 0)


class MemoryCapExceeded(ValueError):
    """Even one client per sub-cohort needs more memory than the cap (one line: sizes and the fix)."""


def program_bytes(compiled: Any) -> int:
    """Peak bytes per device of a compiled program from XLA's memory analysis: arguments, outputs
    and temporaries, less what outputs reuse from donated arguments."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def device_memory_cap(device: Any = None) -> int | None:
    """The memory an accelerator offers a program (`memory_stats()["bytes_limit"]`); None on CPU
    and where the backend does not say."""
    device = device or jax.local_devices()[0]
    if device.platform == "cpu":
        return None
    stats = device.memory_stats() or {}
    return int(stats["bytes_limit"]) if "bytes_limit" in stats else None


def chunk_candidates(cohort: int, mesh: Mesh | None, start: int | None) -> list[int | None]:
    """Sub-cohort sizes to try under a memory cap, largest first: `start` (None: all `cohort`
    at once), then every smaller divisor of `cohort` (multiples of the mesh's client axis)."""
    step = 1 if mesh is None else int(mesh.shape[CLIENTS])
    first = cohort if start is None else start
    sizes = [d for d in range(first, 0, -1) if cohort % d == 0 and d % step == 0]
    return [None if d == cohort else d for d in sizes]


def fit_under_cap(c: int, mesh: Mesh | None, memory_cap: int, compile_chunk: Callable[[int | None], Any],
                  tried: dict[int | None, int], what: str, fix: str, detail: str = ""
                  ) -> tuple[int | None, Any]:
    """`(chunk, program)`: the first of `chunk_candidates(c, ...)` whose compiled program
    (`compile_chunk(chunk)`) needs at most `memory_cap` bytes per device (`program_bytes`, recorded in
    `tried`); `MemoryCapExceeded` (one line: `what`, the sizes, `detail`, `fix`) when not even
    sub-cohorts of one client fit."""
    for chunk in chunk_candidates(c, mesh, auto_chunk_size(c, mesh)):
        program = compile_chunk(chunk)
        need = tried[chunk] = program_bytes(program)
        if need <= memory_cap:
            if len(tried) > 1:  # a larger sub-cohort did not fit
                log.info("%s of %d clients: sub-cohorts of %s to fit the memory cap of %.2f GB "
                         "(%.2f GB each)", what, c, chunk or c, memory_cap / 1e9, need / 1e9)
            return chunk, program
    size, need = min(tried.items(), key=lambda item: item[1])
    raise MemoryCapExceeded(
        f"{what} needs {need / 1e9:.2f} GB per device even in sub-cohorts of {size or c} client(s){detail} "
        f"over the memory cap of {memory_cap / 1e9:.2f} GB: {fix}")


def make_round_step(
    model: FederatedModel | SwitchConfig,
    optimizer: optax.GradientTransformation,
    loss_config: LossConfig | None = None,
    hooks: LocalHooks = LocalHooks(),
    mesh: Mesh | None = None,
    return_clients: bool = False,
    chunk_size: int | None | str = "auto",
    runs: bool = False,
    memory_cap: int | None = None,
    eval_max_length: int | None = None,
    max_update_ratio: float = 0.0,
    decoding: Decoding | None = None,
) -> Callable[..., RoundOutput]:
    """Build `round_step(params, indices, valid, batches, step_mask, weights, rngs, extra=None,
    eval_batches=None)` for `model`: any `FederatedModel` (a `SwitchConfig` is trained as
    `SwitchMoE(config, loss_config, decoding)`); one program per narrowed model `model.narrow(valid)`.

    Args of `round_step`:
      params: global parameters (E experts per MoE layer), replicated.
      indices / valid: `<int32>[C, L, S]`, `<bool>[C, L, S]` from `expert_slots`.
      batches: dict of `[C, K, B, ...]` arrays (see `make_local_train`); step_mask `<bool>[C, K]`.
      weights: `[C]` aggregation weights (training examples; 0 for padding clients).
      rngs: `[C]` per-client keys. extra: per-client algorithm state `[C, ...]` or None.
      eval_batches: None, or `[C, K', B, ...]` validation batches (`cohort_eval_batches`): each client's
        trained sub-MoE is then validated inside the round, right after its sub-cohort trained
        (`client_eval_fn`: loss, routing statistics, the tokens `decoding` (default greedy) generates
        up to `eval_max_length`), so the trained models need not leave the program
        (`RoundOutput.evaluation`).
    With a mesh, C must be a multiple of the `clients` axis size (see `padded_cohort_size`).
    `return_clients=True` also returns the trained narrow sub-MoEs (for validating each client's own
    model, the paper's Algorithm 1). `chunk_size` trains the cohort in sub-cohorts of that many clients
    one after another (`lax.scan`), accumulating the aggregation sums, so memory holds one chunk's
    sub-MoEs at a time (unless `return_clients`); C must then be a multiple of it. `"auto"`
    (`auto_chunk_size`): on CPU without a mesh, sub-cohorts of up to `CPU_CHUNK` clients, else all at once.
    `runs=True`: R independent runs (seeds) in one program, every argument and output with a leading
    runs axis R (`params [R, ...]`, `indices [R, C, L, S]`, ...; `jax.vmap` of the round), no mesh.
    `memory_cap` (bytes per device, with `chunk_size="auto"`): the first of `chunk_candidates` whose
    compiled round fits (`program_bytes`; with `runs`, all R runs' sub-cohorts together) is used, one
    choice per slot width and cohort size; `MemoryCapExceeded` if not even sub-cohorts of one client fit.
    `max_update_ratio` (> 0): a client whose update is larger than this times its received sub-MoE
    (`update_ratio`) is left out of aggregation like a non-finite one (`exclude_diverged`).
    """
    if runs and mesh is not None:
        raise ValueError("runs=True vmaps whole rounds on one device; pass mesh=None")
    model = as_federated_model(model, loss_config, decoding)
    # (narrow model, chunk, validating in the round) -> compiled round
    compiled: dict[tuple[FederatedModel, int | None, bool], Callable] = {}

    def build(narrow: FederatedModel, params: PyTree, chunk: int | None) -> Callable:
        local_train = make_local_train(narrow, optimizer, hooks=hooks)
        axis = CLIENTS if mesh is not None else None
        train_cohort = jax.vmap(local_train, spmd_axis_name=axis)
        eval_cohort = None
        if eval_max_length is not None:
            eval_cohort = jax.vmap(client_eval_fn(narrow, eval_max_length), spmd_axis_name=axis)

        def train_and_sum(params, indices, valid, batches, step_mask, weights, rngs, extra, eval_batches):
            narrow = jax.vmap(lambda idx: gather_submodel(params, model, idx))(indices)
            trained, metrics, stats = train_cohort(narrow, batches, step_mask, valid, rngs, extra)
            metrics = {**metrics, **routing_counts(stats)}
            trained, metrics = exclude_diverged(trained, narrow, metrics, max_update_ratio)
            sums = cohort_sums(params, trained, model, indices, valid, weights * metrics["finite"])
            evaluation = None
            if eval_batches is not None:
                if eval_cohort is None:
                    raise ValueError("eval_batches need make_round_step(eval_max_length=...)")
                evaluation = eval_cohort(trained, model_batch(eval_batches), valid)
            return sums, metrics, stats, (trained if return_clients else None), evaluation

        def round_fn(params, indices, valid, batches, step_mask, weights, rngs, extra, eval_batches):
            cohort = (indices, valid, batches, step_mask, weights, rngs, extra, eval_batches)
            c = indices.shape[0]
            if chunk is None or chunk >= c:
                sums, metrics, stats, trained, evaluation = train_and_sum(params, *cohort)
            else:
                chunks = sub_cohorts(cohort, c, chunk)
                first = jax.tree.map(lambda a: a[0], chunks)
                zero = zero_cohort_sums(params, model, first[0], first[1], first[4])

                def body(total, chunk):
                    sums, *per_client = train_and_sum(params, *chunk)
                    return jax.tree.map(jnp.add, total, sums), tuple(per_client)

                sums, per_chunk = jax.lax.scan(body, zero, chunks)
                metrics, stats, trained, evaluation = merge_sub_cohorts(per_chunk, c)
            new_params = finalize_aggregate(params, sums, model)
            used = (weights > 0) & (metrics["finite"] > 0)  # excluded (diverged) clients move nothing
            held = jnp.einsum("clse,c->le", jax.nn.one_hot(indices, model.num_experts) * valid[..., None],
                              used.astype(jnp.float32)) > 0
            stats = to_global_experts(stats, indices, valid, model.num_experts)
            return new_params, metrics, stats, held, (trained if return_clients else None), evaluation

        if runs:
            return jax.jit(jax.vmap(round_fn))
        if mesh is None:
            return jax.jit(round_fn)
        rep, per_client = replicated(mesh), client_sharding(mesh)
        global_params = param_sharding(params, model, mesh)
        return jax.jit(
            round_fn,
            in_shardings=(global_params, per_client, per_client, per_client, per_client, per_client,
                          per_client, per_client, per_client),
            out_shardings=(global_params, per_client, per_client, rep, per_client, per_client),
        )

    def build_eval(narrow: FederatedModel, params: PyTree, chunk: int | None) -> Callable:
        if eval_max_length is None:
            raise ValueError("evaluating sub-MoEs needs make_round_step(eval_max_length=...)")
        eval_cohort = jax.vmap(client_eval_fn(narrow, eval_max_length),
                               spmd_axis_name=CLIENTS if mesh is not None else None)

        def one_chunk(params, indices, valid, eval_batches):
            narrow = jax.vmap(lambda idx: gather_submodel(params, model, idx))(indices)
            return eval_cohort(narrow, model_batch(eval_batches), valid)

        def eval_fn(params, indices, valid, eval_batches):
            cohort, c = (indices, valid, eval_batches), indices.shape[0]
            if chunk is None or chunk >= c:
                return one_chunk(params, *cohort)
            _, out = jax.lax.scan(lambda _, xs: (None, one_chunk(params, *xs)), None,
                                  sub_cohorts(cohort, c, chunk))
            return merge_sub_cohorts(out, c)

        if mesh is None:
            return jax.jit(eval_fn)
        per_client = client_sharding(mesh)
        return jax.jit(eval_fn, in_shardings=(param_sharding(params, model, mesh), per_client, per_client,
                                              per_client), out_shardings=per_client)

    # Programs are keyed by kind: True / False, a round validating its cohort or not; "eval", `evaluate`.
    # (narrow model, cohort, kind) -> program chosen under memory_cap, {chunk: bytes} of those tried
    fitted: dict[tuple[FederatedModel, int, bool | str], Callable] = {}
    memory_needs: dict[tuple[FederatedModel, int, bool | str], dict] = {}

    def fit(narrow: FederatedModel, c: int, args: tuple, kind: bool | str | None = None) -> Callable:
        """The program compiled for the largest sub-cohort that fits in `memory_cap` (shapes of `args`:
        kept per cohort size, unlike the jitted programs in `compiled`); a round unless kind="eval"."""
        kind = args[-1] is not None if kind is None else kind
        if kind == "eval":
            builder, what = build_eval, "an evaluation"
            fix = "lower eval_batch_size or data.max_input_len / max_target_len, or raise memory_cap_gb"
        else:
            builder, what = build, "a round"
            fix = ("lower batch_size or data.max_input_len / max_target_len, shard experts (mesh.experts), "
                   "or raise memory_cap_gb")
        seeds = f" ({int(args[1].shape[0])} runs at once: pass fewer --seeds together)," if runs else ""
        chunk, program = fit_under_cap(
            c, mesh, memory_cap, lambda chunk: builder(narrow, args[0], chunk).lower(*args).compile(),
            memory_needs.setdefault((narrow, c, kind), {}), what, fix, detail=seeds)
        compiled[(narrow, chunk, kind)] = program
        return program

    def program_for(narrow: FederatedModel, c: int, args: tuple, kind: bool | str) -> Callable:
        """The compiled program of this kind for the cohort of `args` (fitted under `memory_cap`)."""
        if memory_cap is not None and chunk_size == "auto":
            if (narrow, c, kind) not in fitted:
                fitted[(narrow, c, kind)] = fit(narrow, c, args, kind)
            return fitted[(narrow, c, kind)]
        chunk = auto_chunk_size(c, mesh) if chunk_size == "auto" else chunk_size
        if (narrow, chunk, kind) not in compiled:
            builder = build_eval if kind == "eval" else build
            compiled[(narrow, chunk, kind)] = builder(narrow, args[0], chunk)
        return compiled[(narrow, chunk, kind)]

    def round_step(params, indices, valid, batches, step_mask, weights, rngs, extra=None,
                   eval_batches=None) -> RoundOutput:
        args = (params, indices, valid, batches, step_mask, weights, rngs, extra, eval_batches)
        program = program_for(model.narrow(valid), int(indices.shape[-3]), args,
                              eval_batches is not None)
        return RoundOutput(*program(*args))

    def evaluate(params, indices, valid, eval_batches) -> tuple:
        """Validate sub-MoEs of `params` without training them: `(loss [C], RoutingStats [C, L, S],
        tokens [C, ...])`, gathered and evaluated inside one program in the sub-cohorts a round of this
        width would use (under `memory_cap`: the largest that fits), as `RoundOutput.evaluation`."""
        args = (params, indices, valid, eval_batches)
        return program_for(model.narrow(valid), int(indices.shape[-3]), args, "eval")(*args)

    round_step.evaluate = evaluate
    round_step.compiled = compiled  # exposed for tests and diagnostics
    round_step.memory_needs = memory_needs
    round_step.fit = fit  # (narrow model, C, args) -> the program `memory_cap` picks; args may be abstract
    return round_step


def make_personal_step(
    model: FederatedModel | SwitchConfig,
    optimizer: optax.GradientTransformation,
    loss_config: LossConfig | None = None,
    hooks: LocalHooks = LocalHooks(),
    mesh: Mesh | None = None,
    chunk_size: int | None | str = "auto",
    memory_cap: int | None = None,
    max_update_ratio: float = 0.0,
) -> Callable[..., tuple[PyTree, dict[str, Array], RoutingStats]]:
    """Local training without a server: `(params [C, ...] full trees, batches, step_mask, rngs, extra)
    -> (trained [C, ...], metrics [C], routing [C, L, E])`; every client holds every expert. A client
    whose update diverged (non-finite, or above `max_update_ratio`) keeps its previous model
    (`exclude_diverged`).

    `chunk_size`: sub-cohorts of that many clients trained one after another (`lax.scan`), as in
    `make_round_step`. `"auto"`: the whole cohort at once, or under `memory_cap` (bytes per device) the
    largest sub-cohort whose compiled step fits (`fit_under_cap`, candidates from `auto_chunk_size`
    down; `personal_step.memory_needs` keeps `{cohort: {chunk: bytes}}`). Unlike a round, "auto" makes
    no CPU sub-cohorts: `results/cpu_reproduction_wordnet`'s `local` runs trained the whole cohort at once."""
    model = as_federated_model(model, loss_config)
    all_experts = jnp.ones((model.num_moe_layers, model.num_experts), bool)
    local_train = make_local_train(model.narrow(all_experts), optimizer, hooks=hooks)
    one = lambda p, b, m, k, e: local_train(p, b, m, all_experts, k, e)  # noqa: E731
    train = jax.vmap(one, spmd_axis_name=CLIENTS if mesh is not None else None)
    compiled: dict[int | None, Callable] = {}
    fitted: dict[int, Callable] = {}  # cohort size -> program chosen under memory_cap
    memory_needs: dict[int, dict] = {}  # cohort size -> {chunk: bytes} of those tried

    def build(chunk: int | None) -> Callable:
        def step(params, batches, step_mask, rngs, extra):
            cohort = (params, batches, step_mask, rngs, extra)
            c = step_mask.shape[0]
            if chunk is None or chunk >= c:
                trained, metrics, stats = train(*cohort)
            else:
                _, out = jax.lax.scan(lambda carry, xs: (carry, train(*xs)), None,
                                      sub_cohorts(cohort, c, chunk))
                trained, metrics, stats = merge_sub_cohorts(out, c)
            trained, metrics = exclude_diverged(trained, params, {**metrics, **routing_counts(stats)},
                                                max_update_ratio)
            return trained, metrics, stats

        if mesh is None:
            return jax.jit(step)
        per_client = client_sharding(mesh)
        return jax.jit(step, in_shardings=per_client, out_shardings=per_client)

    def personal_step(params, batches, step_mask, rngs, extra=None):
        c = int(step_mask.shape[0])
        args = (params, batches, step_mask, rngs, extra)
        if memory_cap is not None and chunk_size == "auto":
            if c not in fitted:
                _, fitted[c] = fit_under_cap(
                    c, mesh, memory_cap, lambda chunk: build(chunk).lower(*args).compile(),
                    memory_needs.setdefault(c, {}), "local training",
                    "lower batch_size or data.max_input_len / max_target_len, or raise memory_cap_gb")
            return fitted[c](*args)
        chunk = None if chunk_size == "auto" else chunk_size
        if chunk not in compiled:
            compiled[chunk] = build(chunk)
        return compiled[chunk](*args)

    personal_step.compiled, personal_step.memory_needs = compiled, memory_needs  # for tests, diagnostics
    return personal_step


def make_server_update(layout: MoELayout | SwitchConfig, server_optimizer: optax.GradientTransformation):
    """FedOpt server step: the pseudo-gradient `params - aggregate` fed to an optax optimizer.

    `optax.sgd(1.0)` reproduces plain FedAvg; momentum, Adam or Yogi give FedAvgM / FedAdam /
    FedYogi. Experts no cohort client held get no update (their momentum does not move them).
    Returns `(init(params) -> opt_state, update(params, aggregate, held, opt_state) -> (params,
    opt_state))`, the latter jitted.
    """

    def update(params, aggregate, held, opt_state):
        pseudo_grad = jax.tree.map(lambda p, a: p - a, params, aggregate)
        updates, opt_state = server_optimizer.update(pseudo_grad, opt_state, params)
        updates = jax.tree.map(lambda u, m: u * m, updates, expert_update_mask(params, layout, held))
        return optax.apply_updates(params, updates), opt_state

    # The aggregate is a fresh round output nobody else holds: its buffers are reused (donated).
    # The old parameters and optimizer state are not donated, so a failure later in the round
    # leaves the server state intact.
    return server_optimizer.init, jax.jit(update, donate_argnums=(1,))
