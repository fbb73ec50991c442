"""Stage 2: do the recommended adjustments beat leaving a stale client alone? The trials FedMoE
judged, against the base rate replayed on the w/o-Stage-2 runs' metrics rows."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedmoe_jax.federated.algorithm import improves
from fedmoe_jax.files import json_get
from fedmoe_jax.tools.reports.cells import _num
from fedmoe_jax.tools.reports.loading import Notes, Run
from fedmoe_jax.tools.reports.names import MISSING, method_name, setting_name, split_method, variant_method


def replay_stale_trials(rows: Sequence[Mapping[str, Any]], patience: int, loss_tie_break: bool
                        ) -> tuple[int, int]:
    """The base rate for Stage 2's trials, from a run whose maps never change (w/o Stage 2).

    Replays FedMoE's bookkeeping (`base.record_report`, `fedmoe.FedMoE.update_clients`) over the
    metrics rows: a client that has gone `patience` evaluations without beating its best would start a
    trial; its next evaluation judges it (improved over its best, with the same loss tie-break). Here
    nothing is changed in between, so the result is how often a stale client recovers on its own.
    Unlike FedMoE, no client is frozen after a failed "trial". Returns (trials, improved)."""
    best: dict[int, float] = {}
    best_loss: dict[int, float] = {}
    stale: dict[int, int] = {}
    pending: set[int] = set()
    trials = improved = 0
    for row in sorted(rows, key=lambda r: r.get("round", 0)):
        vals = row.get("client_val") or [{}] * len(row.get("cohort", []))
        for k, score, val in zip(row.get("cohort", []), row.get("client_val_score", []), vals):
            score = _num(score)
            if score is None:
                continue
            loss = _num(val.get("loss")) if isinstance(val, Mapping) else None
            loss = math.nan if loss is None else loss
            b, bl = best.get(k, -math.inf), best_loss.get(k, math.inf)
            better = bool(improves(np.float64(score), np.float64(loss), b, bl, loss_tie_break))
            if better:
                best[k], best_loss[k], stale[k] = score, loss, 0
            else:
                stale[k] = stale.get(k, 0) + 1
            if k in pending:
                pending.discard(k)
                trials += 1
                improved += better
                continue
            if stale[k] >= patience:
                pending.add(k)
    return trials, improved


def _judgement(runs: Sequence[Run]) -> tuple[int, bool] | None:
    """(`stage2.patience`, `stage2.loss_tie_break`) of the first of `runs` whose config has them."""
    for run in runs:
        stage2 = json_get(run.summary, "config", "stage2")
        if isinstance(stage2, Mapping) and _num(stage2.get("patience")) is not None:
            return int(stage2["patience"]), bool(stage2.get("loss_tie_break"))
    return None


def stage2_trials(groups: Mapping[str, Mapping[str, list[Run]]], notes: Notes) -> dict[str, dict[str, Any]]:
    """Do Stage 2's recommended adjustments beat leaving a stale client alone?

    Per setting (and `all`, pooled) and FedMoE / w/o Stage 1 row (variants included): the trials
    judged (accept + rollback of `summary.recommendation`, seeds summed) and the share accepted (the
    adjusted client beat its best), with the row's `patience`; `unadjusted`: the same judgement,
    with the row's `stage2.patience` and `loss_tie_break`, replayed on the w/o-Stage-2 runs' metrics
    (`replay_stale_trials`; the w/o-Stage-2 row of the same variant, else the plain one; each run's own
    settings where the row's config lacks them); `p_value`: Fisher's exact test (two-sided, scipy) of the
    row's accept share against its unadjusted one. A sweep over `stage2.patience` thus compares each
    patience with the base rate at that patience."""
    from scipy import stats  # a jax dependency

    out: dict[str, dict[str, Any]] = {}
    pooled: dict[str, dict[str, list[int]]] = {}
    for setting, methods in groups.items():
        entry: dict[str, Any] = {}
        for method, runs in methods.items():
            base_method, variant = split_method(method)
            if base_method not in ("fedmoe", "fedmoe_no_stage1"):
                continue
            recs = [r.summary["recommendation"] for r in runs
                    if isinstance(r.summary.get("recommendation"), Mapping)]
            if not recs:
                continue
            acc = int(sum(_num(r.get("accept")) or 0 for r in recs))
            rb = int(sum(_num(r.get("rollback")) or 0 for r in recs))
            judgement = _judgement(runs)
            e: dict[str, Any] = {"trials": acc + rb, "accepted": acc, "seeds": len(recs),
                                 "patience": judgement[0] if judgement else None}
            ref = (methods.get(variant_method("fedmoe_no_stage2", variant))
                   or methods.get("fedmoe_no_stage2", []))
            base = [0, 0]
            for run in ref:
                rule = judgement or _judgement([run])
                if not run.rows or rule is None:
                    notes.add(f"{run.label()}: no metrics rows or stage2.patience; left out of the "
                              "unadjusted base rate")
                    continue
                t, i = replay_stale_trials(run.rows, *rule)
                base[0] += t
                base[1] += i
            if base[0]:
                e["unadjusted"] = {"trials": base[0], "accepted": base[1], "seeds": len(ref)}
            entry[method] = e
            acc_all = pooled.setdefault(method, {"row": [0, 0, 0], "base": [0, 0, 0]})
            for k, v in zip(("trials", "accepted", "seeds"), range(3)):
                acc_all["row"][v] += e[k]
                acc_all["base"][v] += e.get("unadjusted", {}).get(k, 0)
        if entry:
            out[setting] = entry
    if len(out) > 1:
        out["all"] = {}
        for m, acc_all in pooled.items():
            e = dict(zip(("trials", "accepted", "seeds"), acc_all["row"]))
            patiences = {out[s][m]["patience"] for s in out if m in out[s]}
            e["patience"] = patiences.pop() if len(patiences) == 1 else None
            if acc_all["base"][0]:
                e["unadjusted"] = dict(zip(("trials", "accepted", "seeds"), acc_all["base"]))
            out["all"][m] = e
    for entry in out.values():
        for e in entry.values():
            base = e.get("unadjusted")
            for block in (e, base) if base else (e,):
                block["rate"] = block["accepted"] / block["trials"] if block["trials"] else None
            if base and e["trials"]:
                table = [[e["accepted"], e["trials"] - e["accepted"]],
                         [base["accepted"], base["trials"] - base["accepted"]]]
                e["p_value"] = float(stats.fisher_exact(table).pvalue)
    return out


def render_stage2_trials(trials: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Markdown lines for `stage2_trials`."""
    if not trials:
        return ["No FedMoE or w/o-Stage-1 runs with recommendation counts."]
    lines = ["A Stage-2 adjustment is a trial: kept if the client's next validation score beats its best, "
             "else rolled back (Stage 2). How often trials are kept, against how often a client that "
             "went as long without improving beats its best at its next evaluation with nothing changed "
             "(replayed on the w/o-Stage-2 runs' metrics with the row's patience and tie-break). p: "
             "Fisher's exact test against that base rate.", "",
             "| Setting | Method | Patience | Kept | Unadjusted recovered | p |", "|---|---|---|---|---|---|"]

    def cell(e: Mapping[str, Any] | None) -> str:
        if not e or not e["trials"]:
            return MISSING
        return f"{e['accepted']}/{e['trials']} ({100 * e['rate']:.0f} %)"

    for setting, entry in trials.items():
        name = "All settings" if setting == "all" else setting_name(setting)
        for method, e in entry.items():
            p = MISSING if e.get("p_value") is None else f"{e['p_value']:.2g}"
            patience = MISSING if e.get("patience") is None else str(e["patience"])
            lines.append(f"| {name} | {method_name(method)} | {patience} | {cell(e)} | "
                         f"{cell(e.get('unadjusted'))} | {p} |")
    return lines
