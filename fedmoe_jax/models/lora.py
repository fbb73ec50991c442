"""LoRA adapters on the experts of a Switch Transformer, as pure functions over parameter trees.

FedMoE's Stage 1 equips each expert with LoRA and fine-tunes only the adapters
while the base weights stay frozen. For an expert weight `W [in, out]` the adapted weight is
`W + (alpha / rank) * A @ B` with `A [in, r]` (random) and `B [r, out]` (zeros), so training starts
from the base model exactly. Adapters are stacked like the experts: `a [E, in, r]`, `b [E, r, out]`.
Working on trees (not modules) keeps `SwitchTransformer` unchanged: `merge_lora` builds the
parameters the model is applied with, and gradients reach only the adapters.

Shape letters: L MoE layers, E experts, D d_model, F d_ff, r rank.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from fedmoe_jax.models.switch import SwitchConfig

PyTree = Any


def _expert_paths(config: SwitchConfig, targets: tuple[str, ...]) -> list[tuple[str, ...]]:
    paths = []
    for stack, block in config.moe_layer_names:
        for name in targets:
            paths.append((stack, f"block_{block}", "mlp", "experts", name))
    return paths


def init_lora(params: PyTree, config: SwitchConfig, rank: int, key: jax.Array,
              targets: tuple[str, ...] = ("wi", "wo")) -> dict:
    """Adapters for the expert weights named in `targets` (default `wi`, `wo`) of every MoE layer.

    Returns a tree `{path...: {"a": [E, in, r], "b": [E, r, out]}}`; `a` ~ N(0, 1/in), `b` = 0.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    flat = flatten_dict(dict(params))
    out = {}
    for i, path in enumerate(_expert_paths(config, targets)):
        if path not in flat:
            raise ValueError(f"params have no expert weight {'/'.join(path)}; targets must be expert "
                             f"weights such as wi, wo (gated: wi_0, wi_1)")
        e, d_in, d_out = flat[path].shape
        a = jax.random.normal(jax.random.fold_in(key, i), (e, d_in, rank), jnp.float32) * d_in**-0.5
        out[path + ("a",)] = a.astype(flat[path].dtype)
        out[path + ("b",)] = jnp.zeros((e, rank, d_out), flat[path].dtype)
    return unflatten_dict(out)


def merge_lora(params: PyTree, lora: PyTree, alpha: float, rank: int) -> dict:
    """The adapted parameters: `W + (alpha / rank) * a @ b` for every adapted expert weight."""
    flat = dict(flatten_dict(dict(params)))
    scale = alpha / rank
    for key, ab in _adapters(lora).items():
        flat[key] = flat[key] + scale * jnp.einsum("eir,ero->eio", ab["a"], ab["b"]).astype(flat[key].dtype)
    return unflatten_dict(flat)


def _adapters(lora: PyTree) -> dict[tuple[str, ...], dict[str, jax.Array]]:
    flat = flatten_dict(dict(lora))
    grouped: dict[tuple[str, ...], dict[str, jax.Array]] = {}
    for key, value in flat.items():
        grouped.setdefault(key[:-1], {})[key[-1]] = value
    return grouped


def lora_param_count(lora: PyTree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(lora)))
