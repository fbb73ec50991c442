"""The paper's published numbers (Table 1, Table 2, the claims of its text) and the comparison of
a report's tables with them: directions, seed-paired differences with t-intervals, claims."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedmoe_jax.tools.reports.cells import _num, _size, _tally
from fedmoe_jax.tools.reports.names import (
    COLUMNS,
    DEFAULT_BASELINES,
    MARKS,
    METHOD,
    MISSING,
    method_name,
    setting_name,
)

# the paper's Table 1: per setting and method, (low, high) of each cell, equal where the paper
# is readable; cells reconstructed from fragments keep their range (85.7x: 85.70-85.79; TC 70.56
# or 79.56; TS inferred from the "average improvement" claim, ~0.4 either side).
PAPER_METRICS = ("TC", "RC", "TS", "comm_gb", "mem_gb")


def _ranges(rows: Mapping[str, tuple]) -> dict[str, dict[str, tuple[float, float]]]:
    return {m: {k: v if isinstance(v, tuple) else (v, v) for k, v in zip(PAPER_METRICS, vals)}
            for m, vals in rows.items()}


_PAPER_ROWS = {  # TC, RC, TS, Comm (GB), Mem (GB); a tuple: the cell's range
    "standard_hetero_t": {"random_moe": (91.63, 84.23, 14.51, 2.30, 15.63),
                          "fedprox": (92.92, 87.99, 11.94, 2.30, 24.71),
                          "scaffold": (85.98, 69.44, 5.86, 4.61, 17.29),
                          "fedmoe": (94.76, 86.64, 16.92, 1.76, 13.44)},
    "standard_hetero_td": {"random_moe": (34.19, 82.93, 13.51, 2.30, 15.56),
                           "fedprox": (85.09, 87.57, 11.76, 2.30, 24.63),
                           "scaffold": (61.72, 67.17, 5.83, 4.61, 17.23),
                           "fedmoe": (88.44, 86.55, 16.63, 1.85, 13.89)},
    "enforced_hetero_t": {"random_moe": (88.86, 82.63, 14.37, 2.30, 15.44),
                          "fedprox": (92.51, 86.69, 11.88, 2.30, 24.55),
                          "scaffold": (36.17, 72.51, 6.78, 4.61, 17.21),
                          "fedmoe": (94.85, (85.70, 85.79), (16.77, 17.57), 1.89, 13.78)},
    "enforced_hetero_td": {"random_moe": (37.81, 82.61, 13.80, 2.30, 15.45),
                           "fedprox": (73.85, 86.59, 12.03, 2.30, 24.51),
                           "scaffold": (69.34, 70.69, 6.96, 4.61, 17.18),
                           "fedmoe": ((70.56, 79.56), 85.84, (15.19, 16.39), 1.95, 14.04)},
}
PAPER_TABLE1: dict[str, dict[str, dict[str, tuple[float, float]]]] = {
    setting: _ranges(rows) for setting, rows in _PAPER_ROWS.items()}
LOWER_IS_BETTER = ("comm_gb", "mem_gb")


def paired_difference(ours: Mapping[str, float] | None, base: Mapping[str, float] | None,
                      level: float = 0.95) -> dict[str, Any] | None:
    """FedMoE minus a baseline paired by seed (a seed fixes the clients' data, tasks and budgets, so
    the same seed of two methods sees the same federation). `ours` / `base`: {seed: score}.

    Returns None with no seed in common, else `seeds` (the common seeds, sorted), `diffs` (per seed),
    `mean`, `better` / `worse` (seeds where FedMoE is above / below), and `ci` — the two-sided `level`
    Student-t interval of the mean paired difference, mean ± t_{n-1} s / sqrt(n) (None with one seed;
    (mean, mean) when every difference is equal). scipy's t quantile: the only library call needed."""
    if not ours or not base:
        return None
    seeds = sorted(set(ours) & set(base), key=lambda k: (len(k), k))
    diffs = [float(ours[k]) - float(base[k]) for k in seeds]
    if not diffs:
        return None
    d = np.asarray(diffs, np.float64)
    mean, ci = float(d.mean()), None
    if len(d) > 1:
        from scipy import stats  # a jax dependency; imported here to keep importing the reports light
        half = float(stats.t.ppf(0.5 + level / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
        ci = (mean - half, mean + half)
    return {"seeds": seeds, "diffs": diffs, "mean": mean, "better": int((d > 0).sum()),
            "worse": int((d < 0).sum()), "ci": ci}


def excludes_zero(paired: Mapping[str, Any] | None) -> bool | None:
    """Whether a `paired_difference`'s 95 % interval excludes 0 (a significant difference); None without
    an interval (no or one paired seed)."""
    if paired is None or paired["ci"] is None:
        return None
    return paired["ci"][0] > 0 or paired["ci"][1] < 0


def _direction(low: float, high: float) -> int | None:
    """+1 / -1 when FedMoE minus the baseline has that sign over the whole range, else None."""
    if low > 0 and high > 0:
        return 1
    if low < 0 and high < 0:
        return -1
    return None


def paper_comparison(table: Mapping[str, Mapping[str, Mapping]], baselines: Sequence[str] = DEFAULT_BASELINES
                     ) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """For each setting, metric (TC / RC / TS / comm_gb / mem_gb) and baseline: FedMoE minus the
    baseline in the paper (`paper`: (low, high)) and here (`ours`), the same relative to the
    baseline's value (`paper_rel`, `ours_rel`: fractions, None without a value), whether FedMoE is better
    (`paper_better` / `ours_better`: bool, None if the paper's cell is too uncertain or ours is
    missing; lower is better for comm and memory) and `holds` (the paper's direction reproduced, on
    the means over seeds).

    For the task scores, when the rows carry `{metric}_by_seed`: `paired` (`paired_difference`: per-seed
    FedMoE minus baseline and its 95 % interval), `seeds_agree` (how many paired seeds show the paper's
    direction; None if the paper's is undecided) and `significant` (the interval excludes 0; None with
    fewer than two paired seeds)."""
    out: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for setting, paper in PAPER_TABLE1.items():
        ours = table.get(setting, {})
        if METHOD not in ours:
            continue
        out[setting] = {}
        for metric in PAPER_METRICS:
            sign = -1 if metric in LOWER_IS_BETTER else 1
            entry = {}
            for b in baselines:
                if b not in paper:
                    continue
                (f_lo, f_hi), (b_lo, b_hi) = paper[METHOD][metric], paper[b][metric]
                lo, hi = f_lo - b_hi, f_hi - b_lo
                d = _direction(lo, hi)
                paper_better = None if d is None else d * sign > 0
                f, v = ours[METHOD].get(metric), ours.get(b, {}).get(metric)
                diff = None if f is None or v is None else f - v
                ours_better = None if diff is None or diff == 0 else diff * sign > 0
                holds = None if paper_better is None or ours_better is None else paper_better == ours_better
                b_mid = (b_lo + b_hi) / 2
                entry[b] = {"paper": (lo, hi), "ours": diff, "paper_better": paper_better,
                            "ours_better": ours_better, "holds": holds,
                            "paper_rel": ((lo / b_mid, hi / b_mid) if b_mid else None),
                            "ours_rel": (diff / v if diff is not None and v else None)}
                if metric in COLUMNS.values():
                    p = paired_difference(ours[METHOD].get(f"{metric}_by_seed"),
                                          ours.get(b, {}).get(f"{metric}_by_seed"))
                    agree = None
                    if p is not None and paper_better is not None:
                        agree = p["better"] if paper_better else p["worse"]  # scores: higher is better
                    entry[b].update(paired=p, seeds_agree=agree, significant=excludes_zero(p))
            out[setting][metric] = entry
    return out


def render_paper_comparison(cmp: Mapping[str, Mapping[str, Mapping[str, Mapping[str, Any]]]]) -> list[str]:
    """Markdown lines: per setting, FedMoE minus each baseline in the paper and here, and whether the
    paper's direction holds."""
    if not cmp:
        return ["No FedMoE runs in the paper's settings: nothing to compare."]
    entries = [e for per in cmp.values() for m in per.values() for e in m.values()]
    held, judged = _tally(entries)
    lines = [f"FedMoE minus each baseline, in the paper's Table 1 and here (means over seeds); ✓ the "
             f"paper's direction holds, ✗ it is reversed, ? not decidable (a lost paper cell, or missing / "
             f"tied runs here). Comm and memory: lower is better. **{held} of {judged}** decidable "
             f"directions hold."]
    seeded = [e for e in entries if e["holds"] is not None and (e.get("paired") or {}).get("ci")]
    if seeded:
        every = sum(e["seeds_agree"] == len(e["paired"]["seeds"]) for e in seeded)
        sig = [e for e in seeded if e["significant"]]
        lines[0] += (
            f" With several seeds, each task-score cell also says in how many seeds (paired: the same "
            f"seed is the same federation) FedMoE shows the paper's direction, e.g. `2/3`, and a **bold** "
            f"mark where the paired 95 % t-interval of FedMoE minus the baseline excludes 0. Of the "
            f"{len(seeded)} decidable task-score directions, **{every}** show the paper's direction in "
            f"every seed; **{len(sig)}** differences are significant at 95 %, of which "
            f"**{sum(e['holds'] for e in sig)}** hold and {sum(not e['holds'] for e in sig)} are reversed.")
    lines.append("")
    for setting, per in cmp.items():
        bases = list(next(iter(per.values())))
        lines += [f"### {setting_name(setting)}", "",
                  "| Metric | " + " | ".join(f"vs {method_name(b)} (paper / here)" for b in bases) + " |",
                  "|---|" + "---|" * len(bases)]
        for metric, entry in per.items():
            cells = []
            size = metric in LOWER_IS_BETTER  # GB: CPU-scale sizes differ by thousandths; say how much
            for b in bases:
                e = entry[b]
                lo, hi = e["paper"]
                paper = f"{lo:+.2f}" if abs(hi - lo) < 1e-9 else f"{lo:+.2f}..{hi:+.2f}"
                here = (MISSING if e["ours"] is None
                        else _size(e["ours"], "+") if size else f"{e['ours']:+.2f}")
                if size and e.get("paper_rel") and abs(hi - lo) < 1e-9:
                    paper += f" ({100 * e['paper_rel'][0]:+.0f} %)"
                if size and e.get("ours_rel") is not None:
                    here += f" ({100 * e['ours_rel']:+.0f} %)"
                mark = MARKS[e["holds"]]
                if e.get("significant"):
                    mark = f"**{mark}**"
                p = e.get("paired")
                if e.get("seeds_agree") is not None and p is not None and len(p["seeds"]) > 1:
                    mark += f" {e['seeds_agree']}/{len(p['seeds'])}"
                cells.append(f"{paper} / {here} {mark}")
            name = {"comm_gb": "Comm", "mem_gb": "Mem"}.get(metric, metric)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


# the claims in the paper's text.
PAPER_AVG_IMPROVEMENT = {"standard_hetero_t": 7.63, "standard_hetero_td": 15.50, "enforced_hetero_t": 10.00,
                         "enforced_hetero_td": 12.74}
PAPER_SPEEDUPS = {"0.99": {"random_moe": 1.65, "fedprox": 2.13, "scaffold": 1.64},  # Enforced-Hetero-T
                  "0.9": {"random_moe": 1.35, "fedprox": 2.06, "scaffold": 2.92}}
PAPER_SAVINGS = {"comm_gb": {"random_moe": -19.11, "fedprox": -19.11, "scaffold": -59.56},  # percent, mean
                 "mem_gb": {"random_moe": -11.16, "fedprox": -43.95, "scaffold": -19.97}}  # over settings
PAPER_CVI = {"fedmoe": 0.0445, "fedprox": 0.0569, "scaffold": 0.1430, "random_moe": 0.1827}


def paper_claims(t1: Mapping[str, Mapping[str, Mapping]], gains: Mapping[str, Mapping[str, Any]],
                 cvis: Mapping[str, Mapping[str, Any]], ttt: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The claims of the paper's text checked here: a list of {"claim", "paper", "ours",
    "holds"} (`holds` None where ours is missing or tied). Average improvement: FedMoE ahead of the best
    baseline on the signed average improvement. Convergence: the Enforced-Hetero-T speedups on the "all" curve
    (the paper's Fig. 4 does not say which curve; its order of baselines is presumed). Comm and memory:
    FedMoE relative to each baseline, percent, averaged over the settings that have both. CVI: FedMoE
    lowest of the four, and the paper's full order."""
    out: list[dict[str, Any]] = []

    def add(claim: str, paper: Any, ours: Any, holds: bool | None) -> None:
        out.append({"claim": claim, "paper": paper, "ours": ours, "holds": holds})

    for setting, value in PAPER_AVG_IMPROVEMENT.items():
        signed = _num(gains.get(setting, {}).get("signed_pct"))
        small = " †" if gains.get(setting, {}).get("small_denominators") else ""
        ahead = "FedMoE ahead of the best baseline (signed average improvement, %)"
        add(f"{setting_name(setting)}: {ahead}{small}",
            value, signed, None if not signed else signed > 0)
    per = ttt.get("enforced_hetero_t", {}).get("all", {})
    for frac, bases in PAPER_SPEEDUPS.items():
        for b, value in bases.items():
            speed = _num(per.get(b, {}).get(frac, {}).get("speedup"))
            add(f"Enforced-Hetero-T: FedMoE reaches {100 * float(frac):.0f} % of the target sooner than "
                f"{method_name(b)} (speedup)", value, speed,
                None if speed is None or speed == 1 else speed > 1)
    for metric, bases in PAPER_SAVINGS.items():
        for b, value in bases.items():
            rel = [100 * (f - v) / v for rows in t1.values()
                   if (f := _num(rows.get(METHOD, {}).get(metric))) is not None
                   and (v := _num(rows.get(b, {}).get(metric)))]
            ours = float(np.mean(rel)) if rel else None
            what = "Communication" if metric == "comm_gb" else "Memory"
            add(f"{what} below {method_name(b)} (%, mean over settings)", value, ours,
                None if not ours else ours < 0)
    cvi = {m: _num(cvis.get(m, {}).get("CVI")) for m in PAPER_CVI}
    known = {m: v for m, v in cvi.items() if v is not None}
    lowest = min(known, key=known.get) if len(known) == len(PAPER_CVI) else None
    add("CVI: FedMoE the lowest of FedMoE, FedProx, SCAFFOLD, randomMoE", PAPER_CVI[METHOD], cvi[METHOD],
        None if lowest is None else lowest == METHOD)
    order = sorted(known, key=known.get) if lowest else None
    add("CVI order FedMoE < FedProx < SCAFFOLD < randomMoE", " < ".join(method_name(m) for m in PAPER_CVI),
        " < ".join(method_name(m) for m in order) if order else None,
        None if order is None else order == list(PAPER_CVI))
    return out


def render_paper_claims(claims: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown lines for `paper_claims`."""
    held, judged = _tally(claims)
    lines = [f"The claims of the paper's text checked here: **{held} of {judged}** decidable "
             "claims hold."
             + (" †: the best baseline has a task score below 1 point, so the percentage mostly measures "
                "that near-zero score (see Table 1)." if any("†" in c["claim"] for c in claims) else ""),
             "", "| Claim | Paper | Here | |", "|---|---|---|---|"]
    for c in claims:
        def fmt(v: Any) -> str:
            return MISSING if v is None else v if isinstance(v, str) else f"{v:.4g}"
        lines.append(f"| {c['claim']} | {fmt(c['paper'])} | {fmt(c['ours'])} | "
                     f"{MARKS[c['holds']]} |")
    return lines


# the paper's Table 2 (Standard-Hetero-T, switch-base-32: 12 MoE layers x 32 experts = 384): TS and
# the total experts per client at the start and the end of Stage 2, min / max at the end.
PAPER_TABLE2 = {  # keyed like `table2` rows, so `_table2_claims` reads both the same way
    "fedmoe": {"TS": 16.92, "experts_start_mean": 78.0, "experts_end_mean": 65.0,
               "experts_end_min": 52.0, "experts_end_max": 92.0},
    "fedmoe_no_stage1": {"TS": 14.50, "experts_start_mean": 96.0, "experts_end_mean": 104.0,
                         "experts_end_min": 94.0, "experts_end_max": 118.0},
    "fedmoe_no_stage2": {"TS": 16.69, "experts_start_mean": 78.0, "experts_end_mean": 78.0,
                         "experts_end_min": 50.0, "experts_end_max": 114.0},
}
PAPER_TABLE2_TOTAL = 384


def _table2_claims(rows: Mapping[str, Mapping[str, Any]], paper: bool) -> dict[str, float | None]:
    """The signed quantities behind Table 2's readings; positive = the paper's direction."""
    def get(method: str, key: str) -> float | None:
        return _num((PAPER_TABLE2 if paper else rows).get(method, {}).get(key))

    def diff(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a - b

    def spread(method: str) -> float | None:
        return diff(get(method, "experts_end_max"), get(method, "experts_end_min"))

    f, s1, s2 = "fedmoe", "fedmoe_no_stage1", "fedmoe_no_stage2"
    return {
        "ts_vs_no_stage1": diff(get(f, "TS"), get(s1, "TS")),
        "ts_vs_no_stage2": diff(get(f, "TS"), get(s2, "TS")),
        "stage2_prunes": diff(get(f, "experts_start_mean"), get(f, "experts_end_mean")),
        "stage2_narrows": diff(spread(s2), spread(f)),
        "no_stage1_starts_larger": diff(get(s1, "experts_start_mean"), get(f, "experts_start_mean")),
        "no_stage1_grows": diff(get(s1, "experts_end_mean"), get(s1, "experts_start_mean")),
    }


TABLE2_CLAIMS = {
    "ts_vs_no_stage1": "Stage 1 helps: FedMoE's TS above w/o Stage 1's",
    "ts_vs_no_stage2": "Stage 2 keeps performance: FedMoE's TS above w/o Stage 2's",
    "stage2_prunes": "Stage 2 prunes: FedMoE's average experts fall from start to end",
    "stage2_narrows": "Stage 2 narrows the spread: FedMoE's max - min at the end below w/o Stage 2's",
    "no_stage1_starts_larger": "w/o Stage 1 starts larger (randomMoE-sized) than FedMoE",
    "no_stage1_grows": "Stage 2 grows w/o Stage 1's sub-MoEs: its average experts rise",
}


def paper_table2_comparison(t2: Mapping[str, Mapping[str, Mapping[str, Any]]]
                            ) -> dict[str, dict[str, dict[str, Any]]]:
    """The paper's Table 2 readings (Standard-Hetero-T only) checked in each setting here.

    Per setting and claim (`TABLE2_CLAIMS`): `paper` and `ours`, the signed quantity (TS points or
    experts; positive = the paper's reading), and `holds` (ours > 0; None where ours is missing or 0).
    Expert counts are totals over the MoE layers (`experts_total` experts in all here, 384 in the paper)."""
    paper = _table2_claims({}, paper=True)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for setting, rows in t2.items():
        if "fedmoe" not in rows:
            continue
        ours = _table2_claims(rows, paper=False)
        out[setting] = {k: {"paper": paper[k], "ours": ours[k],
                            "holds": None if not ours[k] else ours[k] > 0} for k in TABLE2_CLAIMS}
    return out


def render_paper_table2(cmp: Mapping[str, Mapping[str, Mapping[str, Any]]],
                        t2: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[str]:
    """Markdown lines for `paper_table2_comparison`."""
    if not cmp:
        return ["No FedMoE runs: nothing to compare with the paper's Table 2."]
    held, judged = _tally(e for per in cmp.values() for e in per.values())
    lines = [f"The paper's Table 2 readings (Standard-Hetero-T only; experts are totals over "
             f"the MoE layers, {PAPER_TABLE2_TOTAL} in all there) checked in every setting here; each cell "
             f"is the signed quantity, positive in the paper's direction (TS points or experts). "
             f"**{held} of {judged}** decidable readings hold.", ""]
    settings = list(cmp)
    lines += ["| Reading | Paper | " + " | ".join(setting_name(s) for s in settings) + " |",
              "|---|---|" + "---|" * len(settings)]
    for key, text in TABLE2_CLAIMS.items():
        paper = cmp[settings[0]][key]["paper"]
        cells = []
        for s in settings:
            e = cmp[s][key]
            mark = MARKS[e["holds"]]
            cells.append(f"{MISSING if e['ours'] is None else format(e['ours'], '+.2f')} {mark}")
        lines.append(f"| {text} | {MISSING if paper is None else format(paper, '+.2f')} | "
                     + " | ".join(cells) + " |")
    totals = sorted({r.get("experts_total") for rows in t2.values() for r in rows.values()
                     if r.get("experts_total")})
    if totals:
        lines += ["", f"Experts in all here: {', '.join(str(t) for t in totals)} (the paper's FedMoE keeps "
                  f"78 → 65 of {PAPER_TABLE2_TOTAL}, {100 * 78 / PAPER_TABLE2_TOTAL:.0f} → "
                  f"{100 * 65 / PAPER_TABLE2_TOTAL:.0f} %)."]
    return lines
