"""Stage 1: do the clients' expert choices follow their tasks? Pairwise similarity of the clients'
Stage-1 profiles `[N, L, E]` and initial sub-MoEs `<bool>[N, L, E]` (N clients, L MoE layers,
E experts), within and between tasks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedmoe_jax.algorithms.fedmoe import cosine_similarity
from fedmoe_jax.files import json_get
from fedmoe_jax.tools.reports.cells import _fmt, _num
from fedmoe_jax.tools.reports.loading import Notes, Run
from fedmoe_jax.tools.reports.names import MISSING, method_name, setting_name
from fedmoe_jax.tools.reports.tables import _ablation_rows


def stage1_measured(run: Run) -> np.ndarray | None:
    """`<bool>[N]`: the clients whose Stage-1 profile was measured rather than predicted from their
    task's peers (the paper's Stage 1), or None without Stage-1 data. A client is measured iff its budget
    covers the full model plus LoRA (`stage1.stage1_eligible`: one threshold per run), so with the
    summary's count m they are the m largest `budgets_bytes`; without budgets or count, every client
    with a nonzero finite profile (predicted ones then count as measured)."""
    if run.experts is None or "stage1_probs" not in run.experts:
        return None
    probs = np.asarray(run.experts["stage1_probs"], np.float64)
    nonzero = np.isfinite(probs).all((1, 2)) & (np.where(np.isfinite(probs), probs, 0).sum((1, 2)) > 0)
    count = _num(json_get(run.summary, "stage1", "measured"))
    budgets = run.experts.get("budgets_bytes")
    if count is None or budgets is None or len(budgets) != len(probs):
        return nonzero
    measured = np.zeros(len(probs), bool)
    measured[np.argsort(-np.asarray(budgets, np.float64), kind="stable")[:int(count)]] = True
    return measured & nonzero


def _jaccard(maps: np.ndarray) -> np.ndarray:
    """`[N, N]` Jaccard overlap of the clients' expert sets `<bool>[N, K]` (0 where both are empty)."""
    m = np.asarray(maps, np.float64)
    inter = m @ m.T
    union = m.sum(1)[:, None] + m.sum(1)[None] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _within_between(sim: np.ndarray, tasks: np.ndarray) -> tuple[list[float], list[float]]:
    same = tasks[:, None] == tasks[None]
    off = ~np.eye(len(tasks), dtype=bool)
    return sim[same & off].tolist(), sim[~same].tolist()


def task_separation(groups: Mapping[str, Mapping[str, list[Run]]], notes: Notes
                    ) -> dict[str, dict[str, dict[str, Any]]]:
    """Do the clients' expert choices follow their tasks (FedMoE's premise, the paper's Fig. 1)?

    Per setting and sub-MoE method (`ABLATION_METHODS`) with expert maps, pairs of clients are compared
    within each run (seed) and pooled over seeds. From `stage1_probs [N, L, E]` (measured clients
    only, `stage1_measured`):
    `cos_within` / `cos_between`, the mean cosine of flattened profiles of two clients of the same /
    different tasks (Eq. 4's similarity); `task_from_profile`, the leave-one-out nearest-centroid
    accuracy of naming a client's task from its profile (chance 1/3 with three tasks); `entropy`, the
    mean per-layer entropy of a profile over log E (1 = uniform routing). From `initial_maps <bool>[N, L, E]`
    (all clients): `jaccard_within` / `jaccard_between`, the mean Jaccard overlap of two clients'
    initial sub-MoEs, and `jaccard_within_by_layer`, the same-task overlap of each MoE layer's experts
    alone (a layer where every client of a task holds the same few experts leaves those clients nothing of
    their own there). Numbers are None where a run lacks the array."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for setting, methods in groups.items():
        for method in _ablation_rows(methods):  # the sub-MoE methods
            cw, cb, jw, jb, hits, ents, clients = [], [], [], [], [], [], 0
            jl: list[list[float]] = []  # per MoE layer: same-task Jaccard of the layer's experts
            for run in methods[method]:
                if run.experts is None:
                    continue
                tasks = np.asarray(run.experts["client_tasks"])
                maps = run.experts.get("initial_maps")
                if maps is not None and maps.shape[:1] == tasks.shape:
                    w, b = _within_between(_jaccard(maps.reshape(len(maps), -1)), tasks)
                    jw += w
                    jb += b
                    if maps.ndim == 3:
                        layers = [_within_between(_jaccard(maps[:, i]), tasks)[0]
                                  for i in range(maps.shape[1])]
                        jl = jl or [[] for _ in layers]
                        for acc, v in zip(jl, layers, strict=False):  # one model per setting: one L
                            acc += v
                measured = stage1_measured(run)
                if measured is None or measured.sum() < 2:
                    continue
                probs = np.asarray(run.experts["stage1_probs"], np.float64)[measured]
                t = tasks[measured]
                clients += len(t)
                flat = probs.reshape(len(probs), -1)
                w, b = _within_between(np.stack([cosine_similarity(p, flat) for p in flat]), t)
                cw += w
                cb += b
                layer = probs / np.maximum(probs.sum(-1, keepdims=True), 1e-12)
                ents.append(float((-(layer * np.log(np.where(layer > 0, layer, 1))).sum(-1)
                                   / np.log(probs.shape[-1])).mean()))
                for i in range(len(t)):
                    others = np.arange(len(t)) != i
                    labels = list(np.unique(t[others]))  # a task with no other client: a miss
                    cents = np.stack([flat[others & (t == k)].mean(0) for k in labels])
                    sim = cosine_similarity(flat[i], cents)
                    hits.append(labels[int(np.argmax(sim))] == t[i])
            if not (jw or jb or cw or cb):
                continue
            mean = lambda v: float(np.mean(v)) if v else None  # noqa: E731
            out.setdefault(setting, {})[method] = {
                "clients": clients, "cos_within": mean(cw), "cos_between": mean(cb),
                "task_from_profile": mean([float(h) for h in hits]), "entropy": mean(ents),
                "jaccard_within": mean(jw), "jaccard_between": mean(jb),
                "jaccard_within_by_layer": [mean(v) for v in jl] if jl else None,
                "seeds": len(methods[method])}
    if not out:
        notes.add("no FedMoE, ablation or randomMoE run has expert maps (experts.npz): no task-separation "
                  "table")
    return out


def render_task_separation(sep: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[str]:
    """Markdown lines for `task_separation`."""
    if not sep:
        return ["No FedMoE, ablation or randomMoE run has expert maps or Stage-1 profiles."]
    lines = ["Whether clients' expert use follows their task, the premise of FedMoE (paper Fig. 1): "
             "**Stage-1 profiles** (measured clients only, each client's activation probabilities "
             "`[L, E]` after the LoRA rounds) — mean cosine between two clients of the same / different "
             "tasks, the share of clients whose task the nearest task centroid names (leave-one-out; "
             "chance 33 %), and the routing entropy (1 = uniform over experts); **initial sub-MoEs** — "
             "mean Jaccard overlap of two clients' expert maps, same / different task, and the same-task "
             "overlap of each MoE layer's experts, first to last. Pairs within a run, seeds pooled.", ""]
    for setting, rows in sep.items():
        lines += [f"### {setting_name(setting)}", "",
                  "| Method | Profiles | Cosine same / diff task | Task from profile | Entropy | "
                  "Map overlap same / diff task | Same task by layer | Seeds |",
                  "|---|---|---|---|---|---|---|---|"]
        for method, e in rows.items():
            cos = (MISSING if e["cos_within"] is None
                   else f"{e['cos_within']:.3f} / {_fmt(e['cos_between'], digits=3)}")
            task = MISSING if e["task_from_profile"] is None else f"{100 * e['task_from_profile']:.0f} %"
            jac = (MISSING if e["jaccard_within"] is None
                   else f"{e['jaccard_within']:.2f} / {_fmt(e['jaccard_between'])}")
            by_layer = e.get("jaccard_within_by_layer")
            layers = (" · ".join(_fmt(v) for v in by_layer)
                      if by_layer and any(v is not None for v in by_layer) else MISSING)
            lines.append(f"| {method_name(method)} | {e['clients'] or MISSING} | {cos} | {task} | "
                         f"{_fmt(e['entropy'], digits=3)} | {jac} | {layers} | {e['seeds']} |")
        lines.append("")
    return lines
