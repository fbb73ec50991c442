"""Index arithmetic of the dropless expert paths: token-choices sorted by expert, and the block layout.

Every real token-choice is computed (nothing dropped). `sort_choices` orders the B*T*K choices by
expert (padding tokens last, never computed). Two ways to run the experts on the sorted rows:

- ragged: `jax.lax.ragged_dot` over the groups (fast where the backend has a grouped matmul kernel;
  XLA:CPU lowers it to a dense masked computation whose cost grows with E);
- blocks: each expert's group padded to a multiple of G rows, so that the rows form NB blocks of G
  rows that each belong to one expert; the experts then run as batched matmuls over blocks (each
  block with its expert's weights). The padding is at most E*(G-1) rows, whatever the routing:
  `NB = ceil((N + E*(G-1)) / G)` static blocks for N choices.

Shape letters: N = B*T*K token-choices, E experts, G rows per block, NB blocks, R = NB*G rows, D d_model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

DROPLESS_IMPLS = ("auto", "blocks", "ragged")
# Rows per block by measurement (experiments/benchmark_experts.py, 2-core CPU, 2026-12-06): about the
# average choices per expert, as a power of two, at most 64. At 1024-2048 choices over 8-16 experts, 64
# beat 32 and 32 beat 8-16 (fewer, larger matmuls, fewer gathered weight copies); at 32 choices per
# expert 32 was best; when experts average a few choices or fewer (greedy decoding: one token per
# sequence) small blocks keep the padding E*(G-1) from dwarfing the work.
MAX_BLOCK_ROWS = 64


def sort_choices(expert_of_choice: Array, real: Array, num_experts: int) -> tuple[Array, Array, Array]:
    """`(order [N], sort_key [N], group_sizes [E])`: the choices sorted by expert (stable, so token
    order within an expert), the expert of each choice with E for padding choices, and the real
    choices per expert. `expert_of_choice <int>[N]`, `real <bool>[N]`."""
    sort_key = jnp.where(real, expert_of_choice, num_experts).astype(jnp.int32)
    order = jnp.argsort(sort_key, stable=True)
    group_sizes = jnp.bincount(sort_key, length=num_experts + 1)[:num_experts]
    return order, sort_key, group_sizes


def num_blocks(num_choices: int, num_experts: int, block_rows: int) -> int:
    """NB: blocks of `block_rows` rows that hold any routing of N choices over E experts."""
    return -(-(num_choices + num_experts * (block_rows - 1)) // block_rows)


def auto_block_rows(num_choices: int, num_experts: int) -> int:
    """G for N choices over E experts: the largest power of two <= N / E, within [1, `MAX_BLOCK_ROWS`]."""
    per_expert = max(num_choices // num_experts, 1)
    return min(1 << (per_expert.bit_length() - 1), MAX_BLOCK_ROWS)


def block_layout(sorted_key: Array, group_sizes: Array, block_rows: int) -> tuple[Array, Array]:
    """Where each sorted choice goes among the blocks, and each block's expert.

    Args:
      sorted_key: `<int>[N]` the expert of each choice in sorted order (E: padding, at the end).
      group_sizes: `<int>[E]` real choices per expert.
      block_rows: G.
    Returns: row `<int32>[N]` of each sorted choice in `[R]` (R = NB*G; padding choices get R, out of
      range, so a scatter with mode="drop" skips them), and `block_expert <int32>[NB]` (blocks past
      the last expert's hold no choice and name expert E-1; their rows are zero).
    """
    n, e = sorted_key.shape[0], group_sizes.shape[0]
    nb = num_blocks(n, e, block_rows)
    sizes = group_sizes.astype(jnp.int32)
    padded = -(-sizes // block_rows) * block_rows
    starts = jnp.cumsum(sizes) - sizes  # first sorted position of each expert
    padded_ends = jnp.cumsum(padded)
    padded_starts = padded_ends - padded
    expert = jnp.minimum(sorted_key, e - 1)
    rank = jnp.arange(n, dtype=jnp.int32) - starts[expert]
    row = jnp.where(sorted_key < e, padded_starts[expert] + rank, nb * block_rows)
    block_start = jnp.arange(nb, dtype=jnp.int32) * block_rows
    block_expert = jnp.minimum(jnp.searchsorted(padded_ends, block_start, side="right"), e - 1)
    return row.astype(jnp.int32), block_expert.astype(jnp.int32)


def resolve_impl(impl: str) -> str:
    """"auto": blocks on the CPU backend (measured faster there), ragged on accelerators."""
    if impl not in DROPLESS_IMPLS:
        raise ValueError(f"dropless_impl={impl!r}; use one of {DROPLESS_IMPLS}")
    if impl != "auto":
        return impl
    return "blocks" if jax.default_backend() == "cpu" else "ragged"


__all__ = ["DROPLESS_IMPLS", "MAX_BLOCK_ROWS", "auto_block_rows", "block_layout", "num_blocks",
           "resolve_impl", "sort_choices"]
