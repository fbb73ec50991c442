"""Local training of one client's sub-MoE, written for `vmap` over a cohort.

`make_train_step` is the one optimizer step of every training loop (rounds, Stage 1's LoRA rounds,
pretraining). `make_local_train` returns a pure function that runs it in a `lax.scan` over the
client's local steps with a fresh optax optimizer state. Updates are masked so that absent or padded
expert slots, padded steps and padded examples change nothing (weight decay and momentum included).
Algorithm hooks add a loss term (FedProx) or correct gradients (SCAFFOLD) without forking the loop.

Shape letters: B batch, S input tokens, T target tokens, L MoE layers, E slots per MoE layer
(the narrow model's experts), K local steps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.traverse_util import flatten_dict, unflatten_dict

from fedmoe_jax.federated.algorithm import LocalHooks
from fedmoe_jax.federated.model import FederatedModel, MoELayout, as_federated_model
from fedmoe_jax.federated.submodel import moe_layer_paths
from fedmoe_jax.models.moe import RoutingStats
from fedmoe_jax.models.objective import LossConfig
from fedmoe_jax.models.switch import SwitchConfig

Array = jax.Array
PyTree = Any

BATCH_KEYS = ("inputs", "input_mask", "targets", "target_mask", "example_mask")
# read when present: each example's task (index in `fedmoe_jax.data.tasks.TASKS`), for per-task decoding
OPTIONAL_BATCH_KEYS = ("task",)


def model_batch(batches: Mapping[str, Any]) -> dict[str, Any]:
    """The arrays local training and evaluation read from `FederatedData` batches (`BATCH_KEYS`, and
    `OPTIONAL_BATCH_KEYS` where the batches have them)."""
    present = [k for k in OPTIONAL_BATCH_KEYS if k in batches]
    return {k: batches[k] for k in BATCH_KEYS + tuple(present)}


def expert_update_mask(params: Mapping[str, Any], layout: MoELayout, valid: Array) -> dict:
    """1.0/0.0 per parameter entry: 0 for expert slots (and their router columns) not held.

    Args: params: a narrow tree; valid: `<bool>[L, E]` slots holding a real expert.
    """
    flat = flatten_dict(dict(params))
    paths = moe_layer_paths(layout)
    out = {}
    for key, leaf in flat.items():
        mask = jnp.ones((), leaf.dtype)
        for layer, path in enumerate(paths):
            if key[: len(path)] != path:
                continue
            v = valid[layer].astype(leaf.dtype)
            rest = key[len(path):]
            if rest == ("router", "kernel"):
                mask = v[None, :]
            else:
                mask = v.reshape((-1,) + (1,) * (leaf.ndim - 1))
        out[key] = mask
    return unflatten_dict(out)


def all_finite(tree: PyTree) -> Array:
    """`<bool>[]`: every entry of every leaf is finite (no NaN or inf)."""
    return jnp.all(jnp.stack([jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(tree)]))


def make_train_step(
    model: FederatedModel | SwitchConfig,
    optimizer: optax.GradientTransformation,
    loss_config: LossConfig | None = None,
    hooks: LocalHooks = LocalHooks(),
    merge: Callable[[PyTree, PyTree], PyTree] | None = None,
) -> Callable[..., tuple[PyTree, PyTree, dict[str, Array], RoutingStats]]:
    """The one optimizer step of every training loop: `(trainable, opt_state, batch, rng, valid,
    frozen=None, anchor=None, extra=None, update_mask=None, real=True) -> (trainable, opt_state,
    metrics, routing)`.

    What is trainable is a parameter: the sub-MoE itself (`merge=None`), or e.g. LoRA adapters over
    frozen weights (`merge(trainable, frozen)` -> the parameters `model.loss` applies; Stage 1).
    valid: `<bool>[L, S]` the router restriction. anchor / extra: the hooks' received model and
    algorithm state. update_mask: per-entry multipliers of the update (`expert_update_mask`: absent
    slots never move). real: False makes the step a no-op (padded steps), weight decay and optimizer
    state included. metrics: loss, ce, lb_loss, z_loss (+ hook_loss); routing `RoutingStats [L, S]`.
    """
    model = as_federated_model(model, loss_config)

    def loss_fn(trainable, frozen, anchor, batch, valid, rng, extra):
        params = trainable if merge is None else merge(trainable, frozen)
        loss, (metrics, routing) = model.loss(params, batch, valid, rng)
        if hooks.loss_term is not None:
            term = hooks.loss_term(trainable, anchor, extra)
            loss = loss + term
            metrics = {**metrics, "loss": loss, "hook_loss": term}
        return loss, (metrics, routing)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(trainable, opt_state, batch, rng, valid, frozen=None, anchor=None, extra=None,
             update_mask=None, real=True):
        (_, (metrics, routing)), grads = grad_fn(trainable, frozen, anchor, batch, valid, rng, extra)
        if hooks.grad_correction is not None:
            grads = hooks.grad_correction(grads, extra)
        updates, new_opt_state = optimizer.update(grads, opt_state, trainable)
        if hooks.update_correction is not None:
            updates = hooks.update_correction(updates, extra)
        if update_mask is not None:
            updates = jax.tree.map(lambda u, m: u * m, updates, update_mask)
        new = optax.apply_updates(trainable, updates)
        keep = lambda new, old: jnp.where(real, new, old)  # noqa: E731
        return (jax.tree.map(keep, new, trainable), jax.tree.map(keep, new_opt_state, opt_state),
                metrics, routing)

    return step


def make_local_train(
    model: FederatedModel | SwitchConfig,
    optimizer: optax.GradientTransformation,
    loss_config: LossConfig | None = None,
    hooks: LocalHooks = LocalHooks(),
    merge: Callable[[PyTree, PyTree], PyTree] | None = None,
) -> Callable[..., tuple[PyTree, dict[str, Array], RoutingStats]]:
    """Local training `(params, batches, step_mask, valid, rng, extra=None, frozen=None) -> (params,
    metrics, stats)`: `make_train_step` scanned over the client's K steps from a fresh optimizer state.

    Args of the returned function (one client; `vmap` it for a cohort):
      params: what is trainable: the client's sub-MoE (narrow tree of `model.narrow(valid)`, S slots),
        or with `merge` the adapters over `frozen` (then every entry trains).
      batches: dict of `[K, B, S_in]` / `[K, B, T]` int arrays `inputs`, `input_mask`, `targets`,
        `target_mask`, and `example_mask [K, B]` (what `model.loss` reads).
      step_mask: `<bool>[K]` real steps (padded steps leave params and optimizer state unchanged).
      valid: `<bool>[L, S]` slots holding a real expert (also the router restriction).
      rng: the client's key (`fold_in(fold_in(root, round), client_id)`); step k uses `fold_in(rng, k)`.
      extra: the client's algorithm state for the hooks (None if unused).
    `model`: a `FederatedModel` (or a `SwitchConfig` with `loss_config`). Returns: trained params,
    metrics (means over real steps: loss, ce, lb_loss, z_loss; num_steps; finite: 1.0 while every
    parameter and every real step's loss stayed finite, else 0.0), and routing statistics summed over
    the real steps.
    """
    model = as_federated_model(model, loss_config)
    train_step = make_train_step(model, optimizer, hooks=hooks, merge=merge)

    def local_train(params, batches, step_mask, valid, rng, extra=None, frozen=None):
        update_mask = expert_update_mask(params, model, valid) if merge is None else None
        opt_state = optimizer.init(params)
        anchor = params

        def step(carry, inputs):
            params, opt_state, finite = carry
            batch, real, index = inputs
            params, opt_state, metrics, stats = train_step(
                params, opt_state, batch, jax.random.fold_in(rng, index), valid, frozen=frozen,
                anchor=anchor, extra=extra, update_mask=update_mask, real=real)
            # tracked in the carry, not tested on the result: a flag that leaves the loop is not
            # fused (and so copied) into every consumer of the trained leaves (compile time)
            finite = finite & all_finite(params) & (jnp.isfinite(metrics["loss"]) | ~real)
            real_f = real.astype(jnp.float32)
            metrics = jax.tree.map(lambda m: m * real_f, metrics)
            stats = jax.tree.map(lambda s: s * real_f, stats)
            return (params, opt_state, finite), (metrics, stats)

        k = step_mask.shape[0]
        (params, _, finite), (metrics, stats) = jax.lax.scan(
            step, (params, opt_state, jnp.array(True)), (batches, step_mask, jnp.arange(k))
        )
        n = jnp.maximum(step_mask.astype(jnp.float32).sum(), 1.0)
        metrics = {name: value.sum() / n for name, value in metrics.items()}
        metrics["num_steps"] = step_mask.astype(jnp.float32).sum()
        metrics["finite"] = finite.astype(jnp.float32)
        stats = stats.total()
        return params, metrics, stats

    return local_train
