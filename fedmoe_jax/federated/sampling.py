"""Cohort samplers: pure functions of (seed, round), so a resumed run samples the same cohorts.

The paper's federated settings: Standard settings draw K of the N clients uniformly at random each round
(5 of 30); Enforced settings draw one client of each task type (3 clients).
Shape letters: N clients, C cohort.
"""

from __future__ import annotations

import numpy as np

_UNIFORM, _ENFORCED = 1, 2


def _rng(seed: int, round_num: int, tag: int) -> np.random.Generator:
    if seed < 0 or round_num < 0:
        raise ValueError(f"seed and round must be >= 0, got seed={seed}, round={round_num}")
    return np.random.default_rng([int(seed), int(round_num), tag])


def sample_uniform(seed: int, round_num: int, num_clients: int, cohort_size: int) -> np.ndarray:
    """`cohort_size` distinct client ids `[C]` (ascending), uniform without replacement."""
    if not 1 <= cohort_size <= num_clients:
        raise ValueError(f"cohort_size={cohort_size} must be between 1 and num_clients={num_clients}")
    chosen = _rng(seed, round_num, _UNIFORM).choice(num_clients, cohort_size, replace=False)
    return np.sort(chosen).astype(np.int32)


def sample_enforced(seed: int, round_num: int, client_tasks: np.ndarray) -> np.ndarray:
    """One client per task type, uniform within each task; `[num_tasks]` ids ordered by task."""
    client_tasks = np.asarray(client_tasks)
    rng = _rng(seed, round_num, _ENFORCED)
    cohort = []
    for task in np.unique(client_tasks):
        members = np.flatnonzero(client_tasks == task)
        cohort.append(members[rng.integers(len(members))])
    return np.asarray(cohort, np.int32)


def sample_cohort(scheme: str, seed: int, round_num: int, client_tasks: np.ndarray,
                  cohort_size: int) -> np.ndarray:
    """`scheme` "uniform" (Standard settings) or "enforced" (one per task, Enforced settings)."""
    if scheme == "uniform":
        return sample_uniform(seed, round_num, len(client_tasks), cohort_size)
    if scheme == "enforced":
        return sample_enforced(seed, round_num, client_tasks)
    raise ValueError(f"unknown sampling scheme {scheme!r}; use 'uniform' or 'enforced'")
