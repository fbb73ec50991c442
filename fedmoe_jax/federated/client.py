"""Local training of one client's sub-MoE, written for `vmap` over a cohort.

`make_local_train` returns a pure function that runs `lax.scan` over the client's local steps with a
fresh optax optimizer state. Updates are masked so that absent or padded expert slots, padded steps
and padded examples change nothing (weight decay and momentum included). Algorithm hooks add a
loss term (FedProx) or correct gradients (SCAFFOLD) without forking the loop.

Shape letters: B batch, S input tokens, T target tokens, L MoE layers, E slots per MoE layer
(the narrow model's experts), K local steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.traverse_util import flatten_dict, unflatten_dict

from fedmoe_jax.federated.algorithm import LocalHooks
from fedmoe_jax.federated.submodel import moe_layer_paths
from fedmoe_jax.models.moe import RoutingStats
from fedmoe_jax.models.switch import SwitchConfig, SwitchTransformer, shift_right, switch_loss

Array = jax.Array
PyTree = Any

BATCH_KEYS = ("inputs", "input_mask", "targets", "target_mask", "example_mask")


def model_batch(batches: Mapping[str, Any]) -> dict[str, Any]:
    """The arrays local training and evaluation read from `FederatedData` batches (`BATCH_KEYS`)."""
    return {k: batches[k] for k in BATCH_KEYS}


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Weights of Eq. (1): label smoothing, load balance (its alpha), router z-loss."""

    label_smoothing: float = 0.1
    lb_loss_weight: float = 0.001
    z_loss_weight: float = 0.001


def expert_update_mask(params: Mapping[str, Any], config: SwitchConfig, valid: Array) -> dict:
    """1.0/0.0 per parameter entry: 0 for expert slots (and their router columns) not held.

    Args: params: a narrow tree; valid: `<bool>[L, E]` slots holding a real expert.
    """
    flat = flatten_dict(dict(params))
    paths = moe_layer_paths(config)
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


def make_local_train(
    config: SwitchConfig,
    optimizer: optax.GradientTransformation,
    loss_config: LossConfig = LossConfig(),
    hooks: LocalHooks = LocalHooks(),
) -> Callable[..., tuple[PyTree, dict[str, Array], RoutingStats]]:
    """Local training `(params, batches, step_mask, valid, rng, extra) -> (params, metrics, stats)`.

    Args of the returned function (one client; `vmap` it for a cohort):
      params: the client's sub-MoE (narrow tree for `config`, whose `num_experts` is the slot count).
      batches: dict of `[K, B, S]` / `[K, B, T]` int arrays `inputs`, `input_mask`, `targets`,
        `target_mask`, and `example_mask [K, B]`.
      step_mask: `<bool>[K]` real steps (padded steps leave params and optimizer state unchanged).
      valid: `<bool>[L, E]` slots holding a real expert (also the router restriction).
      rng: the client's key (`fold_in(fold_in(root, round), client_id)`).
      extra: the client's algorithm state for the hooks (None if unused).
    Returns: trained params, metrics (means over real steps: loss, ce, lb_loss, z_loss, and
      num_steps), and routing statistics summed over the real steps.
    """
    model = SwitchTransformer(config)

    def loss_fn(params, anchor, batch, valid, rng, extra):
        ex = batch["example_mask"].astype(jnp.float32)
        enc_mask = batch["input_mask"] * ex[:, None]
        dec_mask = batch["target_mask"] * ex[:, None]
        dropout_rng, jitter_rng = jax.random.split(rng)
        out = model.apply(
            {"params": params}, batch["inputs"], shift_right(batch["targets"],
                                                             config.decoder_start_token_id,
                                                             config.pad_token_id),
            enc_mask, dec_mask, expert_mask=valid, deterministic=False,
            rngs={"dropout": dropout_rng, "jitter": jitter_rng},
        )
        loss, metrics = switch_loss(out, batch["targets"], dec_mask, loss_config.label_smoothing,
                                    loss_config.lb_loss_weight, loss_config.z_loss_weight)
        if hooks.loss_term is not None:
            term = hooks.loss_term(params, anchor, extra)
            loss = loss + term
            metrics = {**metrics, "loss": loss, "hook_loss": term}
        return loss, (metrics, out.routing)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def local_train(params, batches, step_mask, valid, rng, extra=None):
        update_mask = expert_update_mask(params, config, valid)
        opt_state = optimizer.init(params)
        anchor = params

        def step(carry, inputs):
            params, opt_state = carry
            batch, real, index = inputs
            (_, (metrics, stats)), grads = grad_fn(params, anchor, batch, valid,
                                                   jax.random.fold_in(rng, index), extra)
            if hooks.grad_correction is not None:
                grads = hooks.grad_correction(grads, extra)
            updates, new_opt_state = optimizer.update(grads, opt_state, params)
            if hooks.update_correction is not None:
                updates = hooks.update_correction(updates, extra)
            updates = jax.tree.map(lambda u, m: u * m, updates, update_mask)
            new_params = optax.apply_updates(params, updates)
            keep = lambda new, old: jnp.where(real, new, old)  # noqa: E731
            params = jax.tree.map(keep, new_params, params)
            opt_state = jax.tree.map(keep, new_opt_state, opt_state)
            real_f = real.astype(jnp.float32)
            metrics = jax.tree.map(lambda m: m * real_f, metrics)
            stats = jax.tree.map(lambda s: s * real_f, stats)
            return (params, opt_state), (metrics, stats)

        k = step_mask.shape[0]
        (params, _), (metrics, stats) = jax.lax.scan(
            step, (params, opt_state), (batches, step_mask, jnp.arange(k))
        )
        n = jnp.maximum(step_mask.astype(jnp.float32).sum(), 1.0)
        metrics = {name: value.sum() / n for name, value in metrics.items()}
        metrics["num_steps"] = step_mask.astype(jnp.float32).sum()
        stats = stats.total()
        return params, metrics, stats

    return local_train
