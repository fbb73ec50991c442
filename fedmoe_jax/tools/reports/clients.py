"""The runs client by client (`summary.test_clients`: each client's personalized test score).

- `client_resemblance`: how far each method's clients lie from FedAvg's (the one global model) and from
  local training's (a model of the client's own data alone) on the same client of the same seed's
  partition. A method whose clients sit near local training's scores adapts to each client; near
  FedAvg's, it answers every client as the federation does.
- `client_spread`: how evenly a method serves its clients: per task the coefficient of variation of
  its clients' scores within a run and its worst client's score, and their mean over tasks (a client
  CVI, next to the paper's CVI over settings).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedmoe_jax.tools.reports.analysis import coefficient_of_variation
from fedmoe_jax.tools.reports.cells import _fmt, client_scores, task_tables
from fedmoe_jax.tools.reports.names import COLUMNS, MISSING, method_name, setting_name

GLOBAL_REFERENCE = "fedavg"
OWN_REFERENCE = "local"

Resemblance = dict[str, dict[str, dict[str, dict[str, Any]]]]


def client_resemblance(groups: Mapping[str, Mapping[str, Sequence[Any]]]) -> Resemblance:
    """`{setting: {method: {"TC" | "RC" | "TS": {"to_global", "to_local", "clients"}}}}`: per setting with
    runs of both FedAvg and local training, for every other method (`Run`s grouped as `group_runs`
    does), the mean over its clients of |score - FedAvg's score| (`to_global`) and |score - local
    training's score| (`to_local`) on the same client of the same seed, in the task's points; `clients`
    counts the (seed, client) pairs that all three scored with the same task. Pairs by seed, so only
    seeds that both references ran count."""
    out: Resemblance = {}
    for setting, methods in groups.items():
        refs = {}
        for name in (GLOBAL_REFERENCE, OWN_REFERENCE):
            refs[name] = {run.seed: client_scores(run.summary) for run in methods.get(name, ())}
        if not refs[GLOBAL_REFERENCE] or not refs[OWN_REFERENCE]:
            continue
        per_method = {}
        for method, runs in methods.items():
            if method in refs:
                continue
            gaps: dict[str, tuple[list[float], list[float]]] = {c: ([], []) for c in COLUMNS.values()}
            for run in runs:
                g, o = refs[GLOBAL_REFERENCE].get(run.seed), refs[OWN_REFERENCE].get(run.seed)
                if g is None or o is None:
                    continue
                for client, (task, score) in client_scores(run.summary).items():
                    if g.get(client, ("",))[0] != task or o.get(client, ("",))[0] != task:
                        continue
                    gaps[COLUMNS[task]][0].append(abs(score - g[client][1]))
                    gaps[COLUMNS[task]][1].append(abs(score - o[client][1]))
            if any(to_g for to_g, _ in gaps.values()):
                per_method[method] = {
                    c: {"to_global": float(np.mean(to_g)) if to_g else None,
                        "to_local": float(np.mean(to_o)) if to_o else None, "clients": len(to_g)}
                    for c, (to_g, to_o) in gaps.items()}
        if per_method:
            out[setting] = per_method
    return out


def _cell(e: Mapping[str, Any]) -> str:
    if e["to_global"] is None:
        return MISSING
    nearer = " (global)" if e["to_global"] < e["to_local"] / 2 else (
        " (own)" if e["to_local"] < e["to_global"] / 2 else "")
    return f"{_fmt(e['to_global'], digits=1)} / {_fmt(e['to_local'], digits=1)}{nearer}"


def render_client_resemblance(table: Resemblance) -> list[str]:
    """Markdown lines for `client_resemblance`."""
    if not table:
        return ["Not computed: no setting has runs of both FedAvg and local training."]
    return ["Client by client, how far each method's personalized score lies from FedAvg's (one global "
            "model for every client) / from local training's (the client's own data alone) on the same "
            "client and seed: mean absolute difference in points over all seeds' clients. *(global)* / "
            "*(own)*: less than half as far from FedAvg's / from local training's as from the other.", "",
            *task_tables(table, _cell)]


Spread = dict[str, dict[str, dict[str, Any]]]


def client_spread(groups: Mapping[str, Mapping[str, Sequence[Any]]]) -> Spread:
    """`{setting: {method: {"TC" | "RC" | "TS": {"cv", "worst", "clients"}, "client_cvi"}}}`: per run and
    task, the population coefficient of variation σ/μ of the task's client scores (`cv`; none where the
    mean is 0 or fewer than two clients scored) and the lowest client score (`worst`), each averaged over
    the method's runs (seeds); `clients` is the number of client scores over all runs; `client_cvi` is
    the mean of the tasks' `cv` (None unless every task with clients has one)."""
    out: Spread = {}
    for setting, methods in groups.items():
        per_method = {}
        for method, runs in methods.items():
            cvs: dict[str, list[float]] = {c: [] for c in COLUMNS.values()}
            worst: dict[str, list[float]] = {c: [] for c in COLUMNS.values()}
            counts = dict.fromkeys(COLUMNS.values(), 0)
            for run in runs:
                by_task: dict[str, list[float]] = {}
                for task, score in client_scores(run.summary).values():
                    by_task.setdefault(COLUMNS[task], []).append(score)
                for column, scores in by_task.items():
                    counts[column] += len(scores)
                    worst[column].append(min(scores))
                    if len(scores) > 1 and np.mean(scores) > 0:
                        cvs[column].append(coefficient_of_variation(scores))
            if not any(counts.values()):
                continue
            row: dict[str, Any] = {
                c: {"cv": float(np.mean(cvs[c])) if cvs[c] else None,
                    "worst": float(np.mean(worst[c])) if worst[c] else None, "clients": counts[c]}
                for c in COLUMNS.values()}
            task_cvs = [row[c]["cv"] for c in COLUMNS.values() if counts[c]]
            row["client_cvi"] = (float(np.mean(task_cvs)) if task_cvs and None not in task_cvs else None)
            per_method[method] = row
        if per_method:
            out[setting] = per_method
    return out


def render_client_spread(table: Spread) -> list[str]:
    """Markdown lines for `client_spread`."""
    if not table:
        return ["Not computed: no run kept its clients' test scores (`test_clients`)."]
    lines = ["How evenly each method serves its clients: per task, the coefficient of variation σ/μ of its "
             "clients' test scores within a run (lower: more even) and, in brackets, its worst client's "
             "score, both averaged over seeds; client CVI, their mean over tasks (the paper's CVI, in "
             "*Robustness*, is the variation across settings instead).", ""]
    for setting, per in table.items():
        lines += [f"#### {setting_name(setting)}", "", "| Method | TC | RC | TS | Client CVI |",
                  "|---|---|---|---|---|"]
        for method, row in per.items():
            cells = [MISSING if row[c]["cv"] is None and row[c]["worst"] is None
                     else f"{_fmt(row[c]['cv'], digits=3)} ({_fmt(row[c]['worst'], digits=1)})"
                     for c in COLUMNS.values()]
            lines.append(f"| {method_name(method)} | " + " | ".join(cells)
                         + f" | {_fmt(row['client_cvi'], digits=3)} |")
        lines.append("")
    return lines
