"""Stage 1's search (the paper's Eq. 3) and the static prediction of activation probabilities.

- `static_prediction`: probabilities for clients that cannot measure them (the data-weighted mean
  over the measured clients of the same task).
- `search_submodel` (Eq. 3): the largest uniform coverage threshold theta whose per-layer smallest
  prefixes of experts, by probability, fit the memory budget.

Shape letters: N clients, L MoE layers, E experts per layer.
"""

from __future__ import annotations

import numpy as np

TOLERANCE = 1e-9  # float sums of probabilities may end at 0.99999...


def _check_probs(probs: np.ndarray, name: str = "probs") -> np.ndarray:
    p = np.asarray(probs, np.float64)
    if p.ndim != 2:
        raise ValueError(f"{name} must be [L, E], got shape {p.shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError(f"{name} must be finite and non-negative")
    return p


def _prefix_counts(probs: np.ndarray, theta: float, min_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Per layer: experts sorted by p descending (ties by index), and the shortest prefix reaching theta."""
    order = np.argsort(-probs, axis=-1, kind="stable")
    cumsum = np.cumsum(np.take_along_axis(probs, order, axis=-1), axis=-1)
    reached = cumsum >= theta - TOLERANCE
    first = np.where(reached.any(-1), reached.argmax(-1) + 1, probs.shape[-1])
    return order, np.maximum(first, min_experts)


def search_submodel(
    probs: np.ndarray,
    expert_bytes: float | np.ndarray,
    dense_bytes: float,
    budget_bytes: float,
    min_experts_per_layer: int = 1,
) -> tuple[np.ndarray, float]:
    """Eq. 3: the sub-MoE of the largest coverage threshold theta that fits `budget_bytes`.

    For a threshold theta, the smallest sub-MoE meeting it keeps, in every layer, the shortest prefix
    of experts by descending probability whose probabilities sum to >= theta (at least
    `min_experts_per_layer`). Its memory is `dense_bytes + sum_l count_l * expert_bytes_l`, which grows
    with theta, so feasibility is monotone; the search is a binary search over theta's breakpoints
    (the cumulative sums), hence exact rather than approximate.

    Args:
      probs: `[L, E]` activation probabilities p_{i,j} (rows typically sum to 1).
      expert_bytes: memory of one expert, a scalar or per layer `[L]`.
      dense_bytes: memory of the dense part (w_d).
      budget_bytes: alpha * M_k, the memory the initial sub-MoE may use.
    Returns: `(mask <bool>[L, E], theta)` where theta is the coverage the mask reaches in its worst
      layer. Raises ValueError when even `min_experts_per_layer` experts per layer do not fit.
      A layer whose probabilities are all zero (no token observed) carries no preference: theta is 0
      and that layer keeps the lowest-index experts up to what the budget and the other layers allow
      (documented fallback, tested).
    """
    p = _check_probs(probs)
    num_layers, num_experts = p.shape
    if not 1 <= min_experts_per_layer <= num_experts:
        raise ValueError(f"min_experts_per_layer={min_experts_per_layer} must be in [1, {num_experts}]")
    per_layer = np.broadcast_to(np.asarray(expert_bytes, np.float64), (num_layers,))

    def cost(counts):
        return float(dense_bytes + np.sum(counts * per_layer))

    smallest = cost(np.full(num_layers, min_experts_per_layer))
    if smallest > budget_bytes:
        raise ValueError(
            f"memory budget {budget_bytes:.4g} B is below the smallest sub-MoE ({smallest:.4g} B: dense part "
            f"+ {min_experts_per_layer} expert(s) per layer); raise the budget or mem_fraction"
        )
    order, _ = _prefix_counts(p, 0.0, min_experts_per_layer)
    candidates = np.unique(np.cumsum(np.take_along_axis(p, order, axis=-1), axis=-1))
    candidates = np.concatenate([[0.0], candidates])
    lo, hi = 0, len(candidates) - 1  # candidates[lo] always fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(_prefix_counts(p, candidates[mid], min_experts_per_layer)[1]) <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    order, counts = _prefix_counts(p, candidates[lo], min_experts_per_layer)
    mask = np.zeros(p.shape, bool)
    for layer in range(num_layers):
        mask[layer, order[layer, : counts[layer]]] = True
    theta = float(np.min(np.sum(np.where(mask, p, 0.0), axis=-1)))
    return mask, theta


def static_prediction(probs: np.ndarray, data_sizes: np.ndarray, tasks: np.ndarray,
                      measured: np.ndarray) -> np.ndarray:
    """Stage 1 for memory-insufficient clients (the paper's Stage 1 probability collection).

    Each unmeasured client gets the data-size-weighted mean of the measured clients of its task:
    `p^(k) = sum_a |D_a| p^(a) / sum_a |D_a|` over measured a with T_a = T_k.
    Args: probs `[N, L, E]`; data_sizes `[N]`; tasks `[N]`; measured `<bool>[N]`. Returns `[N, L, E]`.
    """
    p = np.asarray(probs, np.float64)
    sizes = np.asarray(data_sizes, np.float64)
    tasks, measured = np.asarray(tasks), np.asarray(measured, bool)
    out = p.copy()
    for k in np.flatnonzero(~measured):
        peers = measured & (tasks == tasks[k])
        weight = sizes[peers].sum()
        if not peers.any() or weight <= 0:
            raise ValueError(
                f"client {k} has no measured client of the same task ({tasks[k]}) to predict from; "
                "let at least one client of each task run Stage 1"
            )
        out[k] = np.tensordot(sizes[peers], p[peers], axes=1) / weight
    return out


__all__ = ["search_submodel", "static_prediction"]
