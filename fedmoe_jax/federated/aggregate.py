"""Server aggregation as one jitted masked weighted mean (the paper's modular aggregation).

`masked_weighted_mean(values [C, ...], weights [C], mask, fallback)` is
`sum_c w_c m_c v_c / sum_c w_c m_c` where the denominator is positive, else `fallback`. Dense
tensors use an all-true mask (FedAvg); each expert and its router column use the holder mask, so an
expert held by one client is overwritten by its copy, by several is averaged over its holders only,
and by none keeps the previous value.

`scatter_weighted_mean` is the same mean for experts kept in a gathered layout (`[C, S, ...]` with
global indices `[C, S]`): it never materialises the `[C, E, ...]` tensor.

Shape letters: C clients in the cohort, E global experts, S gathered expert slots (E_max), L MoE layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _broadcast_to(mask: Array, ndim: int) -> Array:
    return mask.reshape(mask.shape + (1,) * (ndim - mask.ndim))


def weighted_sums(values: Array, weights: Array, mask: Array | None = None) -> tuple[Array, Array]:
    """Numerator `sum_c w_c m_c v_c` `[...]` and denominator `sum_c w_c m_c` (broadcastable), float32.

    Sums of disjoint sub-cohorts add up to the sums of the whole cohort (chunked rounds).
    """
    acc = jnp.promote_types(values.dtype, jnp.float32)
    w = weights.astype(acc)
    m = jnp.ones(values.shape[:1], acc) if mask is None else mask.astype(acc)
    wm = _broadcast_to(w.reshape((-1,) + (1,) * (m.ndim - 1)) * m, values.ndim)
    return jnp.sum(wm * values.astype(acc), axis=0), jnp.sum(wm, axis=0)


def finalize_mean(num: Array, den: Array, fallback: Array) -> Array:
    """`num / den` where `den > 0`, else `fallback`, in the dtype of `fallback`."""
    den_b = jnp.broadcast_to(den, num.shape)
    mean = num / jnp.where(den_b > 0, den_b, 1.0)
    return jnp.where(den_b > 0, mean, fallback.astype(num.dtype)).astype(fallback.dtype)


def masked_weighted_mean(values: Array, weights: Array, mask: Array | None = None,
                         fallback: Array | None = None) -> Array:
    """`sum_c w_c m_c v_c / sum_c w_c m_c`, or `fallback` where that denominator is 0.

    Args:
      values: `[C, ...]` one tensor per client.
      weights: `[C]` non-negative client weights (example counts; 0 for padding clients).
      mask: bool/float `[C, ...']` broadcast from the left over `values` (e.g. `[C, E]` holders of
        each expert for `values [C, E, D, F]`); None means all true.
      fallback: `[...]` value where no weighted client holds the entry (default zeros).
    Returns: `[...]` in the dtype of `values` (accumulated in float32).
    """
    num, den = weighted_sums(values, weights, mask)
    if fallback is None:
        fallback = jnp.zeros(num.shape, values.dtype)
    return finalize_mean(num, den, fallback.astype(values.dtype))


def scatter_weighted_sums(values: Array, indices: Array, valid: Array, weights: Array, num_experts: int,
                          axis: int = 0) -> tuple[Array, Array]:
    """Sums of gathered expert slots on the global expert axis: num `[E, ...]`, den `[E, 1, ...]`.

    Args as `scatter_weighted_mean`; the expert axis of `num` is moved to the front.
    """
    acc = jnp.promote_types(values.dtype, jnp.float32)
    v = jnp.moveaxis(values.astype(acc), 1 + axis, 1)  # [C, S, ...]
    c, s = indices.shape
    wm = weights.astype(acc)[:, None] * valid.astype(acc)  # [C, S]
    seg = jnp.where(valid, indices, num_experts).reshape(c * s)  # padding -> dropped segment
    flat = (v * _broadcast_to(wm, v.ndim)).reshape((c * s,) + v.shape[2:])
    num = jax.ops.segment_sum(flat, seg, num_segments=num_experts + 1)[:num_experts]
    den = jax.ops.segment_sum(wm.reshape(c * s), seg, num_segments=num_experts + 1)[:num_experts]
    return num, _broadcast_to(den, num.ndim)


def finalize_scatter_mean(num: Array, den: Array, fallback: Array, axis: int = 0) -> Array:
    """Mean from `scatter_weighted_sums` with `fallback` (expert axis `axis`) where nobody held it."""
    current = jnp.moveaxis(fallback, axis, 0)
    return jnp.moveaxis(finalize_mean(num, den, current), 0, axis)


def scatter_weighted_mean(values: Array, indices: Array, valid: Array, weights: Array,
                          fallback: Array, axis: int = 0) -> Array:
    """Weighted mean of gathered slots into the global expert axis.

    Args:
      values: `[C, ...]` whose axis `1 + axis` holds S gathered experts.
      indices: `<int>[C, S]` global expert index of each slot.
      valid: `<bool>[C, S]` whether the slot holds a real expert (padding slots count for nothing).
      weights: `[C]` client weights.
      fallback: `[...]` the current global tensor, expert axis `axis` of size E.
      axis: the expert axis within one client's tensor (0 for `wi [S, D, F]`, 1 for a router `[D, S]`).
    Returns: `[...]` like `fallback`; entry e = mean over the cohort slots holding e, or fallback.
    """
    num, den = scatter_weighted_sums(values, indices, valid, weights, fallback.shape[axis], axis)
    return finalize_scatter_mean(num, den, fallback, axis)
