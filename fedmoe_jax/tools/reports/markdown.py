"""`report.md`: the tables, the verdicts "at a glance", every section in order, the definitions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedmoe_jax.tools.reports.cells import _fmt, _fmt_size, _tally
from fedmoe_jax.tools.reports.clients import render_client_resemblance, render_client_spread
from fedmoe_jax.tools.reports.compare import render_comparison
from fedmoe_jax.tools.reports.floor import render_clients_above_floor, render_floor
from fedmoe_jax.tools.reports.loading import Run
from fedmoe_jax.tools.reports.names import (
    COLUMNS,
    FULL_CURVE,
    METHOD,
    MISSING,
    SETTING_NAMES,
    TASKS,
    method_name,
    methods_in,
    setting_name,
)
from fedmoe_jax.tools.reports.outputs import render_outputs
from fedmoe_jax.tools.reports.paper import (
    excludes_zero,
    paired_difference,
    render_paper_claims,
    render_paper_comparison,
    render_paper_table2,
)
from fedmoe_jax.tools.reports.reference_points import (
    compared_with,
    render_global_vs_personal,
    render_reference_comparison,
    render_seeds_to_add,
)
from fedmoe_jax.tools.reports.replay import render_stage2_trials
from fedmoe_jax.tools.reports.separation import render_task_separation
from fedmoe_jax.tools.reports.tables import SMALL_DENOMINATOR

DEFINITIONS = """\
- **Scores** (percent): each run's test score per task (each client's own model on its own test split,
  mean over the task's clients; TC accuracy, RC F1, TS ROUGE-2), then mean ± sample standard deviation
  (ddof 1) over seeds; no ± with one seed.
- **Comm (GiB)**: `comm_gib_per_transfer`, one per-client model transfer (the paper's reported metrics: its
  "GB" are fp32 GiB).
- **Mem (GB)**: `peak_memory_gb.mean`, each client's peak training memory (the largest sub-MoE it
  trained with, plus FedProx's anchor and SCAFFOLD's two controls; runs whose `metrics.jsonl` rows lack
  `layer_expert_counts` counted the sub-MoE alone at its start and end maps) averaged over clients (the
  paper's FedMoE peaks of 13.4-14.0 GB match its average sub-MoE of 65-78 experts, not its largest);
  `table1.json` also has `mem_gb_max`, the largest client's peak over seeds.
- **Average improvement** (the paper's rule): for each baseline b the mean over tasks of |f − b| / b with
  FedMoE's seed-mean score f; the baseline with the smallest value is the "best baseline". A deficit
  counts as a positive difference (the paper's rule), so the signed value is shown too.
- **CVI** (the paper's metric): per task the coefficient of variation σ/μ (population σ) of the method's
  seed-mean score across the settings it ran in, averaged over tasks.
- **Time-to-target** (the paper's metric; it does not define its "relative target performance"):
  on the seed-mean validation curves (`val_score_<task>` of `metrics.jsonl`; rounds as numbered there,
  rounds without a value skipped), the target of FedMoE against a baseline is the best score both curves
  reach, min(max FedMoE, max baseline); the speedup to 99 % (90 %) is rounds(baseline) / rounds(FedMoE)
  to first reach 0.99 (0.9) × target. "All" uses `val_score`, the example-weighted cohort mean over
  tasks. FedMoE's Stage-1 LoRA rounds are not in `metrics.jsonl`, so they are not counted.
- **Against the paper**: a direction is FedMoE above or below a baseline in the seed means. Seeds are
  paired (the same seed is the same federation: clients, data, tasks, budgets); `k/n` counts the seeds
  whose own difference has the paper's sign, and a bold mark means the two-sided 95 % Student-t interval
  of the mean paired difference, mean ± t(0.975, n−1)·s/√n, excludes 0 (`table1.json`: per-seed scores
  in `TC_by_seed` etc.; `report.json`: `paired`, `seeds_agree`, `significant`)."""


def _score_cells(row: Mapping[str, Any] | None) -> list[str]:
    if row is None:
        return [MISSING] * len(TASKS)
    return [_fmt(row[COLUMNS[t]], row[f"{COLUMNS[t]}_std"]) for t in TASKS]


def _speed(e: Mapping[str, Any]) -> str:
    if e["speedup"] is None:
        never = [who for who, r in (("FedMoE", e["rounds_method"]), ("baseline", e["rounds_baseline"]))
                 if r is None]
        return f"{MISSING} ({' and '.join(never)} never)"
    return f"{e['speedup']:.2f}× ({e['rounds_method']} vs {e['rounds_baseline']})"


def at_a_glance(against_paper: Mapping, against_table2: Mapping, claims: Sequence[Mapping[str, Any]],
                separation: Mapping, trials: Mapping) -> list[str]:
    """Markdown bullet lines: the report's verdicts in one place (each names its section)."""
    out = []
    entries = [e for per in against_paper.values() for m in per.values() for e in m.values()]
    judged = [e for e in entries if e["holds"] is not None]
    if judged:
        held, n = _tally(judged)
        line = (f"- Table 1 directions (FedMoE vs each baseline, \"Against the paper\"): "
                f"**{held} of {n}** hold")
        seeded = [e for e in judged if (e.get("paired") or {}).get("ci")]
        if seeded:
            sig = [e for e in seeded if e["significant"]]
            every = sum(e["seeds_agree"] == len(e["paired"]["seeds"]) for e in seeded)
            line += (f"; of {len(seeded)} task-score directions with several seeds, {every} hold in every "
                     f"seed and {len(sig)} are significant at 95 % ({sum(e['holds'] for e in sig)} of them "
                     "hold)")
        out.append(line + ".")
    held, judged_t2 = _tally(e for per in against_table2.values() for e in per.values())
    if judged_t2:
        out.append(f"- Table 2 readings (\"Against the paper's Table 2\"): **{held} of {judged_t2}** hold.")
    held, judged_text = _tally(claims)
    if judged_text:
        out.append(f"- Claims of the paper's text (\"Against the paper's text\"): "
                   f"**{held} of {judged_text}** hold.")
    fed = [e["fedmoe"] for e in separation.values() if e.get("fedmoe", {}).get("cos_within") is not None]
    if fed:
        out.append("- Stage-1 profiles name the client's task (leave-one-out) for "
                   + ", ".join(f"{100 * e['task_from_profile']:.0f} %" for e in fed)
                   + " of FedMoE's measured clients (settings in order; chance 33 %); cosine same / "
                   "different task "
                   + ", ".join(f"{e['cos_within']:.2f} / {e['cos_between']:.2f}" for e in fed) + ".")
    pooled = trials.get("all") or (next(iter(trials.values())) if len(trials) == 1 else None)
    f = (pooled or {}).get("fedmoe", {})
    if f.get("trials") and f.get("unadjusted", {}).get("trials"):
        u = f["unadjusted"]
        out.append(f"- Stage-2 trials kept: FedMoE {f['accepted']}/{f['trials']} ({100 * f['rate']:.0f} %) "
                   f"vs {u['accepted']}/{u['trials']} ({100 * u['rate']:.0f} %) of unadjusted stale "
                   f"clients recovering (Fisher p {f['p_value']:.2g}).")
    return ["## At a glance", "", *out, ""] if out else []


def in_plain_words(t1: Mapping[str, Mapping[str, Mapping]], baselines: Sequence[str],
                   below: Mapping[str, Mapping[str, list[str]]] | None = None) -> list[str]:
    """Markdown bullet lines, one per setting: where FedMoE is ahead of / behind each baseline and each
    reference point the paper leaves out (seed means), which differences are significant (the paired
    95 % interval excludes 0, marked †; the rest undecided), and who sits at or below the floor."""
    out = []
    against = compared_with(baselines)
    for setting, rows in t1.items():
        if METHOD not in rows:
            continue
        ours, parts, seeds, marked = rows[METHOD], [], [], 0
        for b in against:
            if b not in rows or b == METHOD:
                continue
            said = {"ahead": [], "behind": []}
            for c in COLUMNS.values():
                p = paired_difference(ours.get(f"{c}_by_seed"), rows[b].get(f"{c}_by_seed"))
                if p is not None:
                    seeds.append(len(p["seeds"]))
                if ours.get(c) is None or rows[b].get(c) is None or ours[c] == rows[b][c]:
                    continue
                d = ours[c] - rows[b][c]
                sig = excludes_zero(p) is True
                marked += sig
                said["ahead" if d > 0 else "behind"].append(f"{c} {d:+.1f}{'†' if sig else ''}")
            words = [f"{word} on {', '.join(cols)}" for word, cols in said.items() if cols]
            parts.append(f"{method_name(b)}: " + ("; ".join(words) or "level"))
        if not parts:
            continue
        line = f"- {setting_name(setting)}, FedMoE against " + " | ".join(parts) + " (seed means, points). "
        n = min(seeds, default=0)
        if n < 2:
            line += ("Fewer than two paired seeds: these differences are not tested; only a grid of seeds "
                     "decides them.")
        elif marked:
            which = "the difference" if marked == 1 else f"the {marked} differences"
            line += (f"{n}+ paired seeds: † marks {which} whose paired 95 % interval excludes 0; the others "
                     "are undecided.")
        else:
            line += f"{n}+ paired seeds: no difference is significant at 95 %; all are undecided."
        if below is not None and setting in below:
            low = [f"{method_name(m)} ({', '.join(c)})" for m, c in below[setting].items() if c]
            line += (" At or below the trivial-baseline floor: " + "; ".join(low) + "." if low
                     else " Every score is above the trivial-baseline floor.")
        out.append(line)
    return ["## In plain words", "", *out, ""] if out else []


def _seeds(n: int) -> str:
    return f"{n} seed" + ("" if n == 1 else "s")


def one_view(t1: Mapping[str, Mapping[str, Mapping]], floor: Mapping | None = None) -> list[str]:
    """Markdown lines: Table 1 with the settings side by side, each cell "TC / RC / TS" (seed means, one
    decimal; a cell whose seeds differ from its column's usual count, the most common one, says how
    many), then the floor row where `floor` has the setting. Empty without two settings."""
    if len(t1) < 2:
        return []
    settings = list(t1)
    methods = methods_in(t1)
    usual = {}
    for s in settings:
        counts = [row["seeds"] for row in t1[s].values()]
        usual[s] = max(sorted(set(counts)), key=counts.count)

    def cell(s: str, m: str) -> str:
        row = t1[s].get(m)
        if row is None:
            return MISSING
        text = " / ".join(_fmt(row[COLUMNS[t]], digits=1) for t in TASKS)
        return text if row["seeds"] == usual[s] else f"{text} ({_seeds(row['seeds'])})"

    lines = ["## Table 1 in one view", "",
             "Test scores TC / RC / TS, seed means; each setting's seeds as in its table below (a cell "
             "with another number of seeds says how many).", "",
             "| Method | " + " | ".join(f"{setting_name(s)} ({_seeds(usual[s])})" for s in settings) + " |",
             "|---|" + "---:|" * len(settings)]
    lines += [f"| {method_name(m)} | " + " | ".join(cell(s, m) for s in settings) + " |" for m in methods]
    if floor:
        lines.append("| *Floor: best trivial baseline* | " + " | ".join(
            "*" + " / ".join(f"{floor[s][COLUMNS[t]]['value']:.1f}" for t in TASKS) + "*" if s in floor
            else MISSING for s in settings) + " |")
    return [*lines, ""]


def render_markdown(report: Mapping[str, Any], runs: Sequence[Run], t1: Mapping, t2: Mapping,
                    figs: Sequence[tuple[str, str]], baselines: Sequence[str]) -> str:
    """The whole `report.md` from `build_report`'s `report.json` mapping (its sections by name: "cvi",
    "time_to_target", "floor", ...; a section the mapping lacks renders as empty), the runs,
    Table 1 and 2 and the written figures (caption, relative path)."""
    root, notes = report["root"], report.get("notes", [])
    gains, cvis = report.get("average_improvement", {}), report.get("cvi", {})
    ttt = report.get("time_to_target", {})
    against_paper, outputs = report.get("paper_comparison", {}), report.get("outputs")
    separation, against_table2 = report.get("task_separation"), report.get("paper_table2_comparison")
    trials, claims = report.get("stage2_trials"), report.get("paper_claims")
    references, global_scores = report.get("reference_points", {}), report.get("global_vs_personal", {})
    resemblance, spread = report.get("client_resemblance", {}), report.get("client_spread", {})
    floor, below = report.get("floor"), report.get("below_floor")
    more_seeds, per_client = report.get("seeds_to_add", {}), report.get("clients_above_floor", {})
    compared = report.get("compared_with")
    methods_seen = methods_in(t1)
    lines = [
        "# FedMoE report",
        "",
        f"{len(runs)} run(s) under `{root}`: {len(t1)} setting(s), {len(methods_seen)} method(s). "
        f"Baselines for the comparisons: {', '.join(method_name(b) for b in baselines)}. "
        "Definitions at the end; \"—\" marks missing data (see Notes).",
        "",
        *in_plain_words(t1, baselines, below),
        *at_a_glance(against_paper, against_table2 or {}, claims or [], separation or {}, trials or {}),
        *one_view(t1, floor),
        "## Table 1 analogue: end-to-end performance",
        "",
    ]
    for setting, rows in t1.items():
        letter = f"({'abcd'[list(SETTING_NAMES).index(setting)]}) " if setting in SETTING_NAMES else ""
        lines += [f"### {letter}{setting_name(setting)}", "",
                  "| Method | TC | RC | TS | Comm (GiB) | Mem (GB) | Seeds |",
                  "|---|---|---|---|---|---|---|"]
        for method in methods_seen:
            row = rows.get(method)
            comm = _fmt_size(row["comm_gb"], row["comm_gb_std"]) if row else MISSING
            mem = _fmt_size(row["mem_gb"], row["mem_gb_std"]) if row else MISSING
            seeds = str(row["seeds"]) if row else "0"
            lines.append(f"| {method_name(method)} | " + " | ".join(_score_cells(row))
                         + f" | {comm} | {mem} | {seeds} |")
        if floor is not None and setting in floor:
            lines.append("| *Floor: best trivial baseline* | " + " | ".join(
                f"*{floor[setting][COLUMNS[t]]['value']:.2f}*" for t in TASKS)
                + f" | {MISSING} | {MISSING} | — |")
        lines.append("")
        if setting in gains:
            g = gains[setting]
            per = ", ".join(f"{method_name(b)} {v:.2f} %" for b, v in g["per_baseline_pct"].items())
            lines += [f"Average improvement of FedMoE over the best baseline ({'/'.join(g['tasks'])}): "
                      f"**{g['value_pct']:.2f} %** vs {method_name(g['best_baseline'])} (signed "
                      f"{g['signed_pct']:+.2f} %). Per baseline: {per}."
                      + (" **Not a meaningful gap:** it divides by "
                         + ", ".join(f"{k} {v:.2f}" for k, v in g["small_denominators"].items())
                         + f" (below {SMALL_DENOMINATOR:g} point)." if g.get("small_denominators") else ""),
                      ""]
    lines += ["### Robustness: composite variation index (lower is better)", "",
              "| Method | c_v TC | c_v RC | c_v TS | CVI | Settings |", "|---|---|---|---|---|---|"]
    for method, e in cvis.items():
        cells = [_fmt(e.get(f"cv_{COLUMNS[t]}"), digits=4) for t in TASKS]
        lines.append(f"| {method_name(method)} | " + " | ".join(cells) + f" | {_fmt(e['CVI'], digits=4)} | "
                     f"{len(e['settings'])} |")
    lines += ["", "### Time-to-target speedup of FedMoE", ""]
    if ttt:
        lines += ["Speedup (rounds FedMoE vs rounds baseline); \"never\": that curve does not reach "
                  "the target. Curves of every client's validation score (eval.full_every); \"(cohort)\": "
                  "only the sampled clients' scores each round, for runs without that curve.",
                  "", "| Setting | Curve | Baseline | 99 % | 90 % |", "|---|---|---|---|---|"]
        for setting, per_curve in ttt.items():
            for name, per_base in per_curve.items():
                for b, e in per_base.items():
                    which = "" if e["curve"].startswith(FULL_CURVE) else " (cohort)"
                    lines.append(f"| {setting_name(setting)} | {COLUMNS.get(name, 'All')}{which} | "
                                 f"{method_name(b)} | {_speed(e['0.99'])} | {_speed(e['0.9'])} |")
    else:
        lines.append("Not computed: no setting has usable validation curves of both FedMoE and a baseline "
                     "(see Notes).")
    lines += ["", "## Against the paper: Table 1 directions", ""]
    lines += render_paper_comparison(against_paper)
    lines += ["", "## Beyond the paper: reference points, global models, the floor", ""]
    lines += render_reference_comparison(references)
    lines += ["", "### Personalized vs global model", ""]
    lines += render_global_vs_personal(global_scores)
    lines += ["", "### Global or own: whose scores the clients follow", ""]
    lines += render_client_resemblance(resemblance)
    lines += ["", "### How evenly each method serves its clients", ""]
    lines += render_client_spread(spread)
    if floor is not None:
        lines += ["", "### The floor", ""]
        lines += render_floor(floor, below)
        if per_client:
            lines += ["", *render_clients_above_floor(per_client)]
    lines += ["", "### Seeds to add", ""]
    lines += render_seeds_to_add(more_seeds)
    if compared is not None:
        lines += ["", "## Against an earlier report", ""]
        lines += render_comparison(compared, compared["path"])
    lines += ["", "## Table 2 analogue: ablation", ""]
    if t2:
        lines.append("Experts per client summed over MoE layers: mean over clients (seed mean), min/max over "
                     "all seeds' clients. Recommendation: adjust/accept/rollback events per run (seed mean).")
        for setting, rows in t2.items():
            lines += ["", f"### {setting_name(setting)}", "",
                      "| Method | TC | RC | TS | Avg #experts (start → end) | Min/Max start | Min/Max end | "
                      "Adjust/accept/rollback | Seeds |", "|---|---|---|---|---|---|---|---|---|"]
            for method, row in rows.items():
                def mm(when: str, row: Mapping = row) -> str:
                    lo, hi = row[f"experts_{when}_min"], row[f"experts_{when}_max"]
                    return MISSING if lo is None or hi is None else f"{lo:g} / {hi:g}"

                rec = row.get("recommendation")
                rec_s = ("/".join(f"{rec[k]:.3g}" for k in ("adjust", "accept", "rollback")) if rec
                         else MISSING)
                lines.append(f"| {method_name(method)} | " + " | ".join(_score_cells(row)) +
                             f" | {_fmt(row['experts_start_mean'], digits=1)} → "
                             f"{_fmt(row['experts_end_mean'], digits=1)} | {mm('start')} | {mm('end')} | "
                             f"{rec_s} | {row['seeds']} |")
    else:
        lines.append("No FedMoE, ablation or randomMoE runs.")
    lines += ["", "### Against the paper's text", ""]
    lines += render_paper_claims(claims or [])
    lines += ["", "### Against the paper's Table 2", ""]
    lines += render_paper_table2(against_table2 or {}, t2)
    lines += ["", "## Stage 1: do the clients' experts follow their tasks?", ""]
    lines += render_task_separation(separation or {})
    lines += ["", "## Stage 2: do recommended adjustments beat leaving the client alone?", ""]
    lines += render_stage2_trials(trials or {})
    lines += ["", "## What the outputs look like", ""]
    lines += render_outputs(outputs or {})
    lines += ["", "## Figures", ""]
    for caption, rel in figs:
        lines += [f"**{caption}**", "", f"![{caption}]({rel})", ""]
    if not figs:
        lines += ["None (no metrics.jsonl or experts.npz in any run).", ""]
    lines += ["## Definitions", "", DEFINITIONS, "", "## Notes", ""]
    lines += [f"- {n}" for n in notes] or ["- None."]
    return "\n".join(lines) + "\n"
