"""What FedMoE is judged against beyond the paper's Table 1: the reference points the paper leaves out
(FedAvg, FedAvg + FT, local training: seed-paired differences with 95 % intervals), each method's
personalized models against its global model, and the undecided directions that more seeds may
decide (`seeds_to_add`). Each task's floor, the best trivial baseline: `floor`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedmoe_jax.tools.reports.cells import _fmt, task_tables
from fedmoe_jax.tools.reports.names import COLUMNS, METHOD, MISSING, method_name, setting_name
from fedmoe_jax.tools.reports.paper import excludes_zero, paired_difference

REFERENCE_METHODS = ("fedavg", "fedavg_ft", "local")
MAX_SEEDS = 5  # seeds are added to an undecided direction until it is decided or this many are in


def compared_with(baselines: Sequence[str]) -> list[str]:
    """The methods FedMoE is compared with: the given baselines, then the reference points not among them."""
    return [*baselines, *(r for r in REFERENCE_METHODS if r not in baselines)]


def reference_comparison(t1: Mapping[str, Mapping[str, Mapping]],
                         references: Sequence[str] = REFERENCE_METHODS) -> dict[str, dict[str, dict]]:
    """`{setting: {reference: {"TC" | "RC" | "TS": entry}}}`: FedMoE minus the reference method, where both
    ran. An entry holds `diff` (the mean paired difference; without paired seeds, of the seed means),
    `paired` (`paper.paired_difference` of the per-seed scores) and `significant` (its 95 % interval
    excludes 0; None with fewer than two paired seeds)."""
    out: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for setting, rows in t1.items():
        if METHOD not in rows:
            continue
        ours, per = rows[METHOD], {}
        for ref in references:
            if ref not in rows:
                continue
            per[ref] = {}
            for col in COLUMNS.values():
                f, b = ours.get(col), rows[ref].get(col)
                p = paired_difference(ours.get(f"{col}_by_seed"), rows[ref].get(f"{col}_by_seed"))
                # the paired mean where seeds pair (it matches its interval), else the seed means' gap
                diff = p["mean"] if p is not None else None if f is None or b is None else f - b
                per[ref][col] = {"diff": diff, "paired": p, "significant": excludes_zero(p)}
        if per:
            out[setting] = per
    return out


def render_reference_comparison(cmp: Mapping[str, Mapping[str, Mapping[str, Mapping]]]) -> list[str]:
    """Markdown lines: per setting, FedMoE minus each reference point per task with its interval."""
    if not cmp:
        return [f"No setting has FedMoE runs next to {', '.join(map(method_name, REFERENCE_METHODS))}."]
    lines = ["FedMoE minus each reference point the paper leaves out (seed means; `[lo, hi]` the paired "
             "95 % t-interval, `k/n` the seeds where FedMoE is above; **bold** where the interval "
             "excludes 0).", ""]
    for setting, per in cmp.items():
        lines += [f"#### {setting_name(setting)}", "", "| vs | TC | RC | TS |", "|---|---|---|---|"]
        for ref, cells in per.items():
            lines.append(f"| {method_name(ref)} | " + " | ".join(_difference_cell(cells[c]) for c in
                                                                    COLUMNS.values()) + " |")
        lines.append("")
    return lines


def _difference_cell(e: Mapping[str, Any]) -> str:
    if e["diff"] is None:
        return MISSING
    text, p = f"{e['diff']:+.2f}", e["paired"]
    if p is not None and p["ci"] is not None:
        text += f" [{p['ci'][0]:+.2f}, {p['ci'][1]:+.2f}] {p['better']}/{len(p['seeds'])}"
    return f"**{text}**" if e["significant"] else text


def seeds_to_add(t1: Mapping[str, Mapping[str, Mapping]], baselines: Sequence[str],
                 max_seeds: int = MAX_SEEDS) -> dict[str, list[dict[str, Any]]]:
    """`{setting: [direction, ...]}`: the FedMoE-vs-baseline task directions that more seeds may decide.
    A direction qualifies when its paired 95 % interval includes 0, fewer than `max_seeds` seeds pair,
    and the mean paired difference is larger than half its seed spread (|mean| > s / 2, s the sample
    standard deviation of the per-seed differences): a gap that is there but not yet resolved. Each
    direction: `baseline`, `task` ("TC" ...), `seeds`, `mean`, `spread`."""
    out: dict[str, list[dict[str, Any]]] = {}
    for setting, rows in t1.items():
        if METHOD not in rows:
            continue
        wanted = []
        for b in baselines:
            for col in COLUMNS.values():
                p = paired_difference(rows[METHOD].get(f"{col}_by_seed"),
                                      (rows.get(b) or {}).get(f"{col}_by_seed"))
                if excludes_zero(p) is not False or len(p["seeds"]) >= max_seeds:
                    continue  # decided, or no interval yet
                spread = float(np.std(p["diffs"], ddof=1))
                if abs(p["mean"]) > spread / 2:
                    wanted.append({"baseline": b, "task": col, "seeds": len(p["seeds"]), "mean": p["mean"],
                                   "spread": spread})
        if wanted:
            out[setting] = wanted
    return out


def render_seeds_to_add(wanted: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    if not wanted:
        return ["None: every FedMoE-vs-baseline direction with a gap above half its seed spread is decided "
                f"at 95 % (or has {MAX_SEEDS} seeds)."]
    lines = [f"Undecided directions whose mean paired gap exceeds half its seed spread: add seeds to these "
             f"settings (FedMoE and the named baselines) until decided or {MAX_SEEDS} seeds are in.", "",
             "| Setting | Baseline | Task | Seeds | Mean gap | Spread |", "|---|---|---|---|---|---|"]
    for setting, directions in wanted.items():
        lines += [f"| {setting_name(setting)} | {method_name(d['baseline'])} | {d['task']} | {d['seeds']} | "
                  f"{d['mean']:+.2f} | {d['spread']:.2f} |" for d in directions]
    return lines


def _paired_means(row: Mapping[str, Any], col: str) -> tuple[float | None, float | None]:
    """(personal, global) means of `col` over the seeds that scored both; the row's own means when it
    carries no per-seed scores."""
    own, glob = row.get(f"{col}_by_seed"), row.get(f"global_{col}_by_seed")
    if not isinstance(own, Mapping) or not isinstance(glob, Mapping):
        return row.get(col), row.get(f"global_{col}")
    seeds = [s for s in own if s in glob]
    if not seeds:
        return None, None
    return float(np.mean([own[s] for s in seeds])), float(np.mean([glob[s] for s in seeds]))


def global_vs_personal(t1: Mapping[str, Mapping[str, Mapping]]) -> dict[str, dict[str, dict[str, Any]]]:
    """`{setting: {method: {"TC": (personal, global), ...}}}` for the methods whose runs also scored the
    full global model on every client's test split (`eval.global_model`; not local training). Both are
    means over the same seeds, those that scored both (a seed without its global score is left out of the
    personal mean too)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for setting, rows in t1.items():
        per = {m: {c: _paired_means(row, c) for c in COLUMNS.values()}
               for m, row in rows.items()
               if any(row.get(f"global_{c}") is not None for c in COLUMNS.values())}
        if per:
            out[setting] = per
    return out


def render_global_vs_personal(table: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[str]:
    if not table:
        return ["No run scored its global model (`eval.global_model`)."]
    return ["Each client's own model (the personalized score of Table 1) / the full global model on the "
            "same test split, seed means.", "",
            *task_tables(table, lambda pair: f"{_fmt(pair[0])} / {_fmt(pair[1])}")]
