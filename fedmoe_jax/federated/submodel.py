"""Sub-MoEs as data: expert maps, gathered expert slots, and modular aggregation of a cohort.

A client's sub-MoE is its expert map (bool `[L, E]`). For training, the kept experts of each MoE
layer are gathered into `S` slots (S = E_max of the cohort, bucketed) with a validity mask, so a
client holds and trains only `S` experts per layer and `vmap` sees uniform shapes; the narrow model is
`SwitchTransformer(narrow_config(config, valid))` (S experts) applied with `expert_mask=valid`.

Shape letters: N clients, C cohort, L MoE layers, E global experts, S gathered slots.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from fedmoe_jax.federated.aggregate import (
    finalize_mean,
    finalize_scatter_mean,
    scatter_weighted_sums,
    weighted_sums,
)
from fedmoe_jax.federated.model import MoELayout
from fedmoe_jax.models.moe import is_concrete, put_experts, take_experts
from fedmoe_jax.models.objective import capacity_bound, narrow_config  # noqa: F401  (engine names)

Array = jax.Array


def moe_layer_paths(model: Any) -> tuple[tuple[str, ...], ...]:
    """Parameter path of each MoE layer, in the order of the L axis: `model.moe_layer_paths` of a
    `FederatedModel` or a `SwitchConfig` (encoder first)."""
    return tuple(tuple(path) for path in model.moe_layer_paths)


def param_bytes(params: Mapping[str, Any], config: MoELayout) -> tuple[int, np.ndarray]:
    """Bytes of the dense part, and of one expert (its `wi`/`wo` and router column) per layer `[L]`."""
    flat = flatten_dict(dict(params))
    paths = moe_layer_paths(config)
    expert = np.zeros(len(paths), np.int64)
    dense = 0
    for key, leaf in flat.items():
        size = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        layer = next((i for i, p in enumerate(paths) if key[: len(p)] == p), None)
        if layer is None:
            dense += size
        else:
            expert[layer] += size // config.num_experts
    return dense, expert


def bucket_width(max_kept: int, num_experts: int) -> int:
    """Slots S for a cohort whose largest sub-MoE keeps `max_kept` experts in some layer.

    The next power of two (so few distinct widths, hence few compilations), capped at E.
    """
    if not 1 <= max_kept <= num_experts:
        raise ValueError(f"max_kept={max_kept} must be between 1 and num_experts={num_experts}")
    return int(min(num_experts, 1 << (int(max_kept) - 1).bit_length()))


def expert_slots(expert_maps: Array, width: int) -> tuple[Array, Array]:
    """Kept experts of each layer, ascending, then padding.

    Args:
      expert_maps: `<bool>[..., L, E]`.
      width: S, at least the largest kept count.
    Returns: indices `<int32>[..., L, S]` (padding slots point at some unkept expert) and valid
      `<bool>[..., L, S]`.
    """
    maps = jnp.asarray(expert_maps, bool)
    if is_concrete(maps) and maps.size:
        most = int(np.asarray(maps).sum(-1).max())
        if most > width:
            raise ValueError(f"width={width} slots cannot hold a sub-MoE keeping {most} experts in a layer")
    order = jnp.argsort(~maps, axis=-1, stable=True)[..., :width].astype(jnp.int32)
    valid = jnp.take_along_axis(maps, order, axis=-1)
    return order, valid


def gather_submodel(params: Mapping[str, Any], config: MoELayout, indices: Array) -> dict:
    """One client's narrow parameters: each MoE layer's experts `indices [L, S]`; dense as is."""
    flat = dict(flatten_dict(dict(params)))
    for layer, path in enumerate(moe_layer_paths(config)):
        sub = take_experts(_layer(flat, path), indices[layer])
        _set_layer(flat, path, sub)
    return unflatten_dict(flat)


def scatter_submodel(params: Mapping[str, Any], sub_params: Mapping[str, Any], config: MoELayout,
                     indices: Array, valid: Array) -> dict:
    """Write one client's narrow parameters back into the global tree (valid slots only)."""
    flat = dict(flatten_dict(dict(params)))
    sub_flat = flatten_dict(dict(sub_params))
    for layer, path in enumerate(moe_layer_paths(config)):
        merged = put_experts(_layer(flat, path), _layer(sub_flat, path), indices[layer], valid[layer])
        _set_layer(flat, path, merged)
    moe_keys = _moe_keys(flat, config)
    for key, value in sub_flat.items():
        if key not in moe_keys:
            flat[key] = value
    return unflatten_dict(flat)


def cohort_sums(global_params: Mapping[str, Any], client_params: Mapping[str, Any], config: MoELayout,
                indices: Array, valid: Array, weights: Array) -> dict:
    """Numerators and denominators of `aggregate_cohort`, per flat key; they add over sub-cohorts."""
    flat_g = flatten_dict(dict(global_params))
    flat_c = flatten_dict(dict(client_params))
    moe_keys = _moe_keys(flat_g, config)
    sums = {}
    for key, current in flat_g.items():
        if key in moe_keys:
            layer, axis = moe_keys[key]
            sums[key] = scatter_weighted_sums(flat_c[key], indices[:, layer], valid[:, layer], weights,
                                              current.shape[axis], axis)
        else:
            sums[key] = weighted_sums(flat_c[key], weights)
    return sums


def zero_cohort_sums(global_params: Mapping[str, Any], config: MoELayout, indices: Array,
                     valid: Array, weights: Array) -> dict:
    """Zeros shaped like `cohort_sums` of the cohort `indices / valid [C, L, S]`, `weights [C]`: the
    start of a sum over sub-cohorts. Shapes come from the gathered sub-MoEs alone, so nothing of the
    local training is traced for them."""
    def sums():
        narrow = jax.vmap(lambda idx: gather_submodel(global_params, config, idx))(indices)
        return cohort_sums(global_params, narrow, config, indices, valid, weights)

    return jax.tree.map(jnp.zeros_like, jax.eval_shape(sums))


def finalize_aggregate(global_params: Mapping[str, Any], sums: Mapping[tuple[str, ...], tuple],
                       config: MoELayout) -> dict:
    """The new global tree from `cohort_sums` (summed over sub-cohorts if chunked)."""
    flat_g = flatten_dict(dict(global_params))
    moe_keys = _moe_keys(flat_g, config)
    out = {}
    for key, current in flat_g.items():
        num, den = sums[key]
        if key in moe_keys:
            out[key] = finalize_scatter_mean(num, den, current, moe_keys[key][1])
        else:
            out[key] = finalize_mean(num, den, current)
    return unflatten_dict(out)


def aggregate_cohort(global_params: Mapping[str, Any], client_params: Mapping[str, Any],
                     config: MoELayout, indices: Array, valid: Array, weights: Array) -> dict:
    """The paper's modular aggregation of a cohort's trained narrow sub-MoEs.

    Args:
      global_params: the current global tree (E experts per MoE layer).
      client_params: the cohort's trained narrow trees, leaves `[C, ...]` (S slots per MoE layer).
      indices / valid: `[C, L, S]` from `expert_slots`.
      weights: `[C]` example counts (0 for padding clients).
    Returns: the new global tree. Dense tensors: FedAvg over the cohort. Each expert (`wi`, `wo`) and
    its router column: mean over the clients holding it; one holder overwrites; none keeps it.
    """
    sums = cohort_sums(global_params, client_params, config, indices, valid, weights)
    return finalize_aggregate(global_params, sums, config)


def _moe_keys(flat: Mapping[tuple[str, ...], Any], config: MoELayout) -> dict[tuple[str, ...], tuple]:
    """Flat keys of expert-indexed leaves -> (MoE layer, expert axis within the leaf)."""
    keys = {}
    for layer, path in enumerate(moe_layer_paths(config)):
        for key in flat:
            if key[: len(path)] != path:
                continue
            rest = key[len(path):]
            if rest == ("router", "kernel"):
                keys[key] = (layer, 1)
            elif rest in (("router", "bias"),) or rest[0] == "experts":
                keys[key] = (layer, 0)
    return keys


def _layer(flat: Mapping[tuple[str, ...], Any], path: tuple[str, ...]) -> dict:
    sub = {k[len(path):]: v for k, v in flat.items() if k[: len(path)] == path}
    if not sub:
        raise ValueError(f"params have no MoE layer at {'/'.join(path)}; are they for this config?")
    return unflatten_dict(sub)


def _set_layer(flat: dict, path: tuple[str, ...], layer_params: Mapping[str, Any]) -> None:
    for k, v in flatten_dict(dict(layer_params)).items():
        flat[path + k] = v
