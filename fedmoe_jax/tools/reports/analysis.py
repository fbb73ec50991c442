"""The paper's analysis metrics: average improvement over the best baseline, the composite variation
index (CVI) and time-to-target speedups. Plain functions of scores; `tables` applies them to runs."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def rounds_to_target(scores: Sequence[float], target: float) -> int | None:
    """First round (1-based) whose score reaches `target`, or None (`scores` per round, NaN = none)."""
    for r, value in enumerate(scores, start=1):
        if value is not None and not math.isnan(value) and value >= target:
            return r
    return None


def time_to_target_speedup(method: Sequence[float], baseline: Sequence[float], fraction: float,
                           reference: float | None = None) -> float | None:
    """Speedup of `method` over `baseline` to reach `fraction` of the relative target performance.

    The target is `fraction * reference`, `reference` defaulting to the best score either curve
    reaches (the paper's "relative target performance" is not defined further).
    Returns rounds(baseline) / rounds(method), or None if either never reaches it.
    """
    if reference is None:
        finite = [v for v in list(method) + list(baseline) if v is not None and not math.isnan(v)]
        if not finite:
            return None
        reference = max(finite)
    target = fraction * reference
    r_method, r_base = rounds_to_target(method, target), rounds_to_target(baseline, target)
    if r_method is None or r_base is None:
        return None
    return r_base / r_method


def coefficient_of_variation(values: Sequence[float], ddof: int = 0) -> float:
    """c_v = sigma / mu (population std by default)."""
    v = np.asarray(values, np.float64)
    return float(np.std(v, ddof=ddof) / np.mean(v))


def composite_variation_index(scores: Mapping[str, Sequence[float]], ddof: int = 0) -> float:
    """CVI: the mean over tasks of each task's c_v across settings (the paper's reported metrics; its exact
    definition is underspecified, see the paper's claims)."""
    return float(np.mean([coefficient_of_variation(v, ddof) for v in scores.values()]))


def average_improvement(method: Mapping[str, float], baselines: Mapping[str, Mapping[str, float]],
                        signed: bool = False) -> tuple[str, float]:
    """The paper's average improvement: for each baseline b the mean over tasks of |f - b| / b (percent);
    the paper reports the baseline with the smallest value, the "best-performing baseline".

    `signed=True` keeps the sign of f - b (a deficit counts as negative; the paper's rule does not),
    the minimum being then over the signed values: give one baseline to get its signed value.
    """
    diff = (lambda x: x) if signed else abs
    gaps = {
        name: 100.0 * float(np.mean([diff(method[t] - b[t]) / b[t] for t in method]))
        for name, b in baselines.items()
    }
    best = min(gaps, key=gaps.get)
    return best, gaps[best]
