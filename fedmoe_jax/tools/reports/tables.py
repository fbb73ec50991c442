"""The Table 1 and Table 2 analogues and what is computed from them: scores over seeds, average
improvement, CVI, seed-mean validation curves (`[R]`, R rounds) and time-to-target."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fedmoe_jax.files import json_get
from fedmoe_jax.tools.reports.analysis import (
    average_improvement,
    coefficient_of_variation,
    composite_variation_index,
    rounds_to_target,
    time_to_target_speedup,
)
from fedmoe_jax.tools.reports.cells import _num, mean_std
from fedmoe_jax.tools.reports.loading import Notes, Run
from fedmoe_jax.tools.reports.names import (
    ABLATION_METHODS,
    COLUMNS,
    CURVES,
    FULL_CURVE,
    METHOD,
    MISSING,
    SETTING_NAMES,
    TARGET_FRACTIONS,
    TASKS,
    TEST_KEYS,
    methods_in,
    split_method,
)


def _task_scores(runs: list[Run], block: str, notes: Notes | None) -> dict[str, Any]:
    """Percent mean / std / count over seeds of one evaluation block ("test", "global_test", ...)."""
    out: dict[str, Any] = {}
    for task in TASKS:
        col, values, by_seed = COLUMNS[task], [], {}
        for run in runs:
            v = _num(json_get(run.summary, block, TEST_KEYS[task]))
            if v is None:
                if notes is not None:
                    notes.add(f"{run.label()}: no {block} {col} score (shown as {MISSING})")
            else:
                values.append(v)
                by_seed[str(run.seed)] = v
        out[col], out[f"{col}_std"] = mean_std(values)
        out[f"{col}_n"] = len(values)
        out[f"{col}_by_seed"] = by_seed
    return out


def table1(groups: Mapping[str, Mapping[str, list[Run]]], notes: Notes) -> dict[str, dict[str, dict]]:
    """Table 1 analogue: per setting and method, scores (percent), comm (GiB), memory (GB), seeds."""
    table: dict[str, dict[str, dict]] = {}
    for setting, methods in groups.items():
        table[setting] = {}
        for method, runs in methods.items():
            row = _task_scores(runs, "test", notes)
            comm = [v for r in runs if (v := _num(r.summary.get("comm_gib_per_transfer"))) is not None]
            mem = [v for r in runs if (v := _num(json_get(r.summary, "peak_memory_gb", "mean"))) is not None]
            mem_max = [v for r in runs
                       if (v := _num(json_get(r.summary, "peak_memory_gb", "max"))) is not None]
            for run in runs:
                if _num(run.summary.get("comm_gib_per_transfer")) is None:
                    notes.add(f"{run.label()}: no comm_gib_per_transfer (shown as {MISSING})")
                if _num(json_get(run.summary, "peak_memory_gb", "mean")) is None:
                    notes.add(f"{run.label()}: no peak_memory_gb (shown as {MISSING})")
            row["comm_gb"], row["comm_gb_std"] = mean_std(comm)
            row["mem_gb"], row["mem_gb_std"] = mean_std(mem)
            row["mem_gb_max"] = max(mem_max) if mem_max else None
            row["seeds"] = len(runs)
            row["seed_list"] = [r.seed for r in runs]
            for block, prefix in (("global_test", "global"), ("unseen_test", "unseen")):
                if any(isinstance(r.summary.get(block), Mapping) for r in runs):
                    extra = _task_scores([r for r in runs if isinstance(r.summary.get(block), Mapping)],
                                         block, None)
                    for c in COLUMNS.values():
                        row[f"{prefix}_{c}"], row[f"{prefix}_{c}_by_seed"] = extra[c], extra[f"{c}_by_seed"]
            table[setting][method] = row
            rounds = sorted({r.summary.get("rounds") for r in runs}, key=str)
            if len(rounds) > 1:
                notes.add(f"{setting}/{method}: seeds ran different numbers of rounds {rounds}")
    return table


# Task scores (percent points) under which a baseline's score, as the average-improvement ratio's
# denominator, is flagged: the ratio then measures how close to zero that score is rather than FedMoE's gain.
SMALL_DENOMINATOR = 1.0


def improvement(table: Mapping[str, Mapping[str, Mapping]], baselines: Sequence[str], notes: Notes
                ) -> dict[str, dict[str, Any]]:
    """FedMoE's average improvement over the best baseline per setting (the paper's rule);
    `small_denominators`: the best baseline's task scores below `SMALL_DENOMINATOR` (also a note)."""
    out: dict[str, dict[str, Any]] = {}
    for setting, methods in table.items():
        if METHOD not in methods:
            notes.add(f"{setting}: no {METHOD} runs, so no average improvement")
            continue
        f = {t: methods[METHOD][COLUMNS[t]] for t in TASKS if methods[METHOD][COLUMNS[t]] is not None}
        if not f:
            continue
        if len(f) < len(TASKS):
            notes.add(f"{setting}: average improvement over {', '.join(COLUMNS[t] for t in f)} only "
                      f"({METHOD} lacks the other tasks)")
        candidates: dict[str, dict[str, float]] = {}
        for b in baselines:
            if b not in methods:
                continue
            scores = {t: methods[b][COLUMNS[t]] for t in f}
            if any(v is None or v <= 0 for v in scores.values()):
                notes.add(f"{setting}: {b} left out of the average improvement "
                          "(a task score is missing or 0)")
                continue
            candidates[b] = scores
        if not candidates:
            notes.add(f"{setting}: no baseline with all of {METHOD}'s task scores; no average improvement")
            continue
        best, value = average_improvement(f, candidates)
        small = {COLUMNS[t]: v for t, v in candidates[best].items() if v < SMALL_DENOMINATOR}
        if small:
            notes.add(f"{setting}: the average improvement divides by {best}'s "
                      + ", ".join(f"{k} {v:.2f}" for k, v in small.items())
                      + f" (below {SMALL_DENOMINATOR:g} point): its percentage mostly measures that "
                      "near-zero score, not a gap")
        out[setting] = {
            "best_baseline": best,
            "value_pct": value,
            "signed_pct": average_improvement(f, {best: candidates[best]}, signed=True)[1],
            "per_baseline_pct": {b: average_improvement(f, {b: s})[1] for b, s in candidates.items()},
            "tasks": [COLUMNS[t] for t in f],
            "small_denominators": small,
        }
        table[setting][METHOD]["avg_improvement_pct"] = value  # type: ignore[index]
        table[setting][METHOD]["avg_improvement_baseline"] = best  # type: ignore[index]
    return out


def cvi(table: Mapping[str, Mapping[str, Mapping]], notes: Notes) -> dict[str, dict[str, Any]]:
    """Per method: c_v of each task's seed-mean score across settings, and their mean (the CVI)."""
    methods = methods_in(table)
    out: dict[str, dict[str, Any]] = {}
    for method in methods:
        settings = [s for s in table if method in table[s]]
        per_task = {t: [table[s][method][COLUMNS[t]] for s in settings
                        if table[s][method][COLUMNS[t]] is not None] for t in TASKS}
        per_task = {t: v for t, v in per_task.items() if len(v) >= 2 and np.mean(v) > 0}
        entry: dict[str, Any] = {"settings": settings, "CVI": None}
        if per_task:
            entry["CVI"] = composite_variation_index(per_task)
            entry.update({f"cv_{COLUMNS[t]}": coefficient_of_variation(v) for t, v in per_task.items()})
            if len(per_task) < len(TASKS):
                notes.add(f"CVI of {method} averages {len(per_task)} task(s) only (the others are in "
                          f"fewer than two settings)")
        else:
            notes.add(f"CVI of {method}: fewer than two settings with scores; not computed")
        known = [s for s in SETTING_NAMES if s in table]
        if per_task and len(settings) < len(known):
            notes.add(f"CVI of {method} is over {len(settings)} of {len(known)} settings "
                      f"(missing: {', '.join(s for s in known if s not in settings)})")
        out[method] = entry
    return out


def _per_round(runs: Sequence[Run], key: str) -> dict[int, list[float]]:
    by_round: dict[int, list[float]] = {}
    for run in runs:
        for row in run.rows:
            r, v = row.get("round"), _num(row.get(key))
            if v is not None and isinstance(r, int) and not isinstance(r, bool) and r >= 1:
                by_round.setdefault(r, []).append(v)
    return by_round


def curve(runs: Sequence[Run], key: str, reduce: Callable[[list[float]], float] = np.mean) -> np.ndarray:
    """`reduce` over seeds of `key` per round `[R]` (index r - 1; NaN in rounds without a value)."""
    by_round = _per_round(runs, key)
    out = np.full(max(by_round, default=0), np.nan)
    for r, values in by_round.items():
        out[r - 1] = reduce(values)
    return out


def curve_key(methods: Mapping[str, list[Run]], names: Sequence[str], cohort_key: str) -> str:
    """The all-client curve `full_<cohort_key>` when every run of `names` has one, else `cohort_key`
    (the clients sampled each round: runs made before `eval.full_every` existed)."""
    full = FULL_CURVE + cohort_key
    runs = [run for name in names for run in methods.get(name, [])]
    if runs and all(np.isfinite(curve([run], full)).any() for run in runs):
        return full
    return cohort_key


def time_to_target(groups: Mapping[str, Mapping[str, list[Run]]], baselines: Sequence[str], notes: Notes
                   ) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """{setting: {curve: {baseline: {"0.99": {...}, "0.9": {...}}}}}: FedMoE's speedups (package doc)."""
    out: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for setting, methods in groups.items():
        if METHOD not in methods:
            continue
        for name, cohort_key in CURVES.items():
            for b in baselines:
                if b not in methods:
                    continue
                key = curve_key(methods, (METHOD, b), cohort_key)
                mine, theirs = curve(methods[METHOD], key), curve(methods[b], key)
                if key == cohort_key and name == "all":
                    notes.add(f"{setting}: no all-client validation curve (eval.full_every) for {METHOD} "
                              f"and {b}; time-to-target on the sampled cohorts' curve")
                if not np.isfinite(mine).any() or not np.isfinite(theirs).any():
                    if name != "all":
                        notes.add(f"{setting}: no {key} curve for {METHOD} or {b}; no time-to-target on "
                                  f"{COLUMNS.get(name, name)}")
                    continue
                reference = min(float(np.nanmax(mine)), float(np.nanmax(theirs)))
                if reference <= 0:
                    notes.add(f"{setting}: {METHOD} or {b} never scores above 0 on {key}; no time-to-target")
                    continue
                entry: dict[str, Any] = {"curve": key}
                for frac in TARGET_FRACTIONS:
                    target = frac * reference
                    entry[str(frac)] = {
                        "speedup": time_to_target_speedup(mine, theirs, frac, reference=reference),
                        "rounds_method": rounds_to_target(mine, target),
                        "rounds_baseline": rounds_to_target(theirs, target),
                        "target": target,
                    }
                out.setdefault(setting, {}).setdefault(name, {})[b] = entry
    return out


def _ablation_rows(methods: Iterable[str]) -> list[str]:
    """The rows of `methods` whose method is in `ABLATION_METHODS`, in that order, variants after."""
    rows = [m for m in methods if split_method(m)[0] in ABLATION_METHODS]
    return sorted(rows, key=lambda m: (ABLATION_METHODS.index(split_method(m)[0]), split_method(m)[1]))


def table2(groups: Mapping[str, Mapping[str, list[Run]]], notes: Notes) -> dict[str, dict[str, dict]]:
    """Table 2 analogue: ablation rows per setting with expert totals at the start and the end."""
    table: dict[str, dict[str, dict]] = {}
    for setting, methods in groups.items():
        rows = {}
        for method in _ablation_rows(methods):
            runs = methods[method]
            row = _task_scores(runs, "test", None)
            for when in ("start", "end"):
                block = [r.summary.get(f"experts_{when}") for r in runs]
                means = [v for b in block if (v := _num(json_get(b, "mean"))) is not None]
                mins = [v for b in block if (v := _num(json_get(b, "min"))) is not None]
                maxs = [v for b in block if (v := _num(json_get(b, "max"))) is not None]
                row[f"experts_{when}_mean"], row[f"experts_{when}_mean_std"] = mean_std(means)
                row[f"experts_{when}_min"] = min(mins) if mins else None
                row[f"experts_{when}_max"] = max(maxs) if maxs else None
                if len(means) < len(runs):
                    notes.add(f"{setting}/{method}: {len(runs) - len(means)} run(s) without experts_{when}")
            recs = [r.summary["recommendation"] for r in runs if isinstance(r.summary.get("recommendation"),
                                                                            Mapping)]
            if recs:
                row["recommendation"] = {k: float(np.mean([_num(r.get(k)) or 0.0 for r in recs]))
                                         for k in ("adjust", "accept", "rollback")}
            totals = {int(e) * int(m) for r in runs if (e := _num(r.summary.get("num_experts")))
                      and (m := _num(r.summary.get("num_moe_layers")))}
            row["experts_total"] = totals.pop() if len(totals) == 1 else None  # L x E of the global model
            row["seeds"] = len(runs)
            rows[method] = row
        if rows:
            table[setting] = rows
    return table
