"""Numbers in and out of the report's cells: finite numbers from run files, means and standard
deviations over seeds, verdict tallies, and the formatting of table cells and per-task tables."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fedmoe_jax.tools.reports.names import COLUMNS, MISSING, method_name, setting_name


def _num(x: Any) -> float | None:
    """A finite float, or None for anything else (missing, null, NaN, strings)."""
    if isinstance(x, bool) or not isinstance(x, int | float | np.integer | np.floating):
        return None
    return float(x) if math.isfinite(float(x)) else None


def client_scores(summary: Mapping[str, Any]) -> dict[str, tuple[str, float]]:
    """`{client: (task, score)}` of a run's personalized test scores (`summary.test_clients`): clients of
    a known task with a finite score only."""
    out = {}
    for client, r in (summary.get("test_clients") or {}).items():
        score = _num(r.get("score"))
        if r.get("task") in COLUMNS and score is not None:
            out[str(client)] = (r["task"], score)
    return out


def _tally(entries: Iterable[Mapping[str, Any]]) -> tuple[int, int]:
    """(held, judged) over verdict entries: those whose `holds` is True, and those decidable (not None)."""
    marks = [e["holds"] for e in entries]
    return sum(m is True for m in marks), sum(m is not None for m in marks)


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof 1; None with fewer than two values)."""
    if not values:
        return None, None
    v = np.asarray(values, np.float64)
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else None)


def _fmt(mean: float | None, std: float | None = None, digits: int = 2) -> str:
    if mean is None:
        return MISSING
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _size(x: float, sign: str = "") -> str:
    """Two decimals, or three significant digits below 0.1 (CPU-scale models); `sign="+"` signs it."""
    return f"{x:{sign}.2f}" if x == 0 or abs(x) >= 0.1 else f"{x:{sign}.3g}"


def _fmt_size(mean: float | None, std: float | None = None) -> str:
    """GiB / GB of a table cell: `_size` of the mean (and std)."""
    if mean is None:
        return MISSING
    return _size(mean) if std is None else f"{_size(mean)} ± {_size(std)}"


def task_tables(table: Mapping[str, Mapping[str, Mapping[str, Any]]], cell: Callable[[Any], str]
                ) -> list[str]:
    """Markdown lines: per setting of `{setting: {method: {"TC": x, "RC": x, "TS": x}}}`, a heading and a
    table of one row per method, each task's `x` written by `cell`."""
    lines = []
    for setting, per in table.items():
        lines += [f"#### {setting_name(setting)}", "", "| Method | TC | RC | TS |", "|---|---|---|---|"]
        for method, cells in per.items():
            lines.append(f"| {method_name(method)} | " + " | ".join(cell(x) for x in cells.values()) + " |")
        lines.append("")
    return lines
