"""Against an earlier report: how each Table 1 cell moved from its `table1.json`, and which
FedMoE-vs-baseline directions flipped."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedmoe_jax.tools.reports.cells import _num
from fedmoe_jax.tools.reports.names import (
    COLUMNS,
    DEFAULT_BASELINES,
    METHOD,
    MISSING,
    _method_rank,
    method_name,
    setting_name,
)


def load_table1(path: str) -> dict[str, dict[str, dict]]:
    """`table1.json` of an earlier report: the file itself or the report directory holding it.
    ValueError naming the path when it is missing or not a Table-1 mapping."""
    file = os.path.join(path, "table1.json") if os.path.isdir(path) else path
    try:
        with open(file) as f:
            table = json.load(f)
    except OSError:
        raise ValueError(f"{file} does not exist or is unreadable; pass a report directory or its "
                         "table1.json") from None
    except ValueError:
        raise ValueError(f"{file} is not JSON; pass the table1.json a report wrote") from None
    if not isinstance(table, dict) or not all(
            isinstance(rows, dict) and all(isinstance(r, dict) for r in rows.values())
            for rows in table.values()):
        raise ValueError(f"{file} is not a Table 1 ({{setting: {{method: {{TC: ..}}}}}}); pass the "
                         "table1.json a report wrote")
    return table


def compare_tables(now: Mapping[str, Mapping[str, Mapping]], then: Mapping[str, Mapping[str, Mapping]],
                   baselines: Sequence[str] = DEFAULT_BASELINES) -> dict[str, Any]:
    """How Table 1 moved from an earlier report (`then`) to this one (`now`).

    Returns `cells`: {setting: {method: {metric: {"now", "then", "delta"}}}} for the TC / RC / TS
    cells both reports have (delta = now - then, None if either is missing); `max_abs_delta`: per
    metric, the largest |delta| and its (setting, method); `directions`: {setting: {metric: {baseline:
    {"now", "then", "flipped"}}}} with the sign (+1 / -1 / 0) of FedMoE minus that baseline in each
    report (None where a cell is missing; flipped: both signs nonzero and different); `flips`: the count
    of flipped directions and `comparable` of those with both signs known."""
    cells: dict[str, dict[str, dict[str, dict[str, float | None]]]] = {}
    largest: dict[str, dict[str, Any]] = {}
    for setting in (s for s in now if s in then):
        for method in (m for m in now[setting] if m in then[setting]):
            row = cells.setdefault(setting, {}).setdefault(method, {})
            for metric in COLUMNS.values():
                a, b = _num(now[setting][method].get(metric)), _num(then[setting][method].get(metric))
                delta = None if a is None or b is None else a - b
                row[metric] = {"now": a, "then": b, "delta": delta}
                if delta is None:
                    continue
                if metric not in largest or abs(delta) > abs(largest[metric]["delta"]):
                    largest[metric] = {"delta": delta, "setting": setting, "method": method}

    def sign(table: Mapping, setting: str, metric: str, baseline: str) -> int | None:
        f = _num(table.get(setting, {}).get(METHOD, {}).get(metric))
        v = _num(table.get(setting, {}).get(baseline, {}).get(metric))
        return None if f is None or v is None else int(np.sign(f - v))

    directions: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    flips = comparable = 0
    for setting in cells:
        for metric in COLUMNS.values():
            for b in baselines:
                a, c = sign(now, setting, metric, b), sign(then, setting, metric, b)
                if a is None and c is None:
                    continue
                flipped = a is not None and c is not None and a * c < 0
                directions.setdefault(setting, {}).setdefault(metric, {})[b] = {
                    "now": a, "then": c, "flipped": flipped}
                comparable += a is not None and c is not None
                flips += flipped
    return {"cells": cells, "max_abs_delta": largest, "directions": directions, "flips": flips,
            "comparable": comparable}


def render_comparison(cmp: Mapping[str, Any], label: str) -> list[str]:
    """Markdown lines for `compare_tables`: each shared cell as now (then, delta), then the flips."""
    if not cmp["cells"]:
        return [f"No setting and method in common with `{label}`: nothing to compare."]
    largest = ", ".join(f"{m} {e['delta']:+.2f} ({setting_name(e['setting'])}, {method_name(e['method'])})"
                        for m, e in cmp["max_abs_delta"].items())
    lines = [f"Each cell here (then: `{label}`, change). Largest change per task: {largest or MISSING}. "
             f"FedMoE-vs-baseline directions that flipped: **{cmp['flips']} of {cmp['comparable']}**.", ""]
    for setting, rows in cmp["cells"].items():
        lines += [f"### {setting_name(setting)}", "", "| Method | TC | RC | TS |", "|---|---|---|---|"]
        for method in sorted(rows, key=_method_rank):
            cells = []
            for metric in COLUMNS.values():
                e = rows[method][metric]
                now_s = MISSING if e["now"] is None else f"{e['now']:.2f}"
                then_s = MISSING if e["then"] is None else f"{e['then']:.2f}"
                delta = "" if e["delta"] is None else f", {e['delta']:+.2f}"
                cells.append(f"{now_s} ({then_s}{delta})")
            lines.append(f"| {method_name(method)} | " + " | ".join(cells) + " |")
        flipped = [f"{metric} vs {method_name(b)} ({'better' if e['then'] > 0 else 'worse'} then, "
                   f"{'better' if e['now'] > 0 else 'worse'} now)"
                   for metric, per in cmp["directions"].get(setting, {}).items() for b, e in per.items()
                   if e["flipped"]]
        lines += ["", "FedMoE directions flipped: " + ("; ".join(flipped) if flipped else "none") + ".", ""]
    return lines
