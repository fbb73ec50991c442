"""The floor of Table 1: each task's best trivial baseline (`fedmoe_jax.tools.baselines`), read from the
`baselines.json` files that `experiments/baselines.py` writes, one per partition of the runs.

A file written with the clients' scores (`clients`: each client on its own test examples, the mean
over the task's clients and over the grid's seeds, as runs are scored) is the floor of every setting
with its partition (T or TD: the Standard and Enforced settings share one); its values include the
baselines that use a client's own training labels, and it is averaged over the seeds the setting's
runs used (each seed is its own partition). A file without them (an older one) holds the
baselines on the whole test split and is the floor of every setting. A setting that two files claim is
refused: pass one file per partition.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedmoe_jax.data.tasks import PRIMARY_METRIC
from fedmoe_jax.tools.reports.cells import _num, client_scores, task_tables
from fedmoe_jax.tools.reports.names import COLUMNS, TASKS, method_name, setting_name

BASELINES_FILE = "baselines.json"


class FloorMismatchError(ValueError):
    """`--floor`'s baselines were measured on other test data than the runs were scored on."""


def floor_paths(floor: str | Sequence[str] | None) -> list[str]:
    """`--floor` as a list of paths (one path, several, or none)."""
    return [floor] if isinstance(floor, str) else list(floor or [])


def _baselines_file(path: str) -> str:
    """`path` itself, or the `baselines.json` inside it when it is a folder."""
    return os.path.join(path, BASELINES_FILE) if os.path.isdir(path) else path


def _read(path: str) -> dict[str, Any]:
    file = _baselines_file(path)
    try:
        with open(file) as f:
            doc = json.load(f)
        if not isinstance(doc, dict):
            raise ValueError("not an object")
        _best(doc)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{file} is not a readable {BASELINES_FILE} of experiments/baselines.py "
                         f"({type(e).__name__}: {e}); write one with `python experiments/baselines.py "
                         "--config=... --out=DIR`") from None
    return doc


def _best(doc: Mapping[str, Any], seeds: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Per Table 1 column, the baseline with the best primary metric: of the clients' scores when the
    file has them (averaged over `seeds` where it scored them all, else over every seed it scored),
    else of the whole test split's."""
    clients = doc.get("clients")
    by_seed = (clients or {}).get("by_seed") or {}
    if seeds and all(str(x) in by_seed for x in seeds):
        baselines = {task: {name: {PRIMARY_METRIC[task]: float(np.mean([by_seed[str(x)][task][name]
                                                                        for x in seeds]))}
                            for name in per} for task, per in by_seed[str(seeds[0])].items()}
    else:
        baselines = clients["baselines"] if clients is not None else doc["baselines"]
    floor = {}
    for task in TASKS:
        scores = {name: _num(b.get(PRIMARY_METRIC[task])) for name, b in baselines[task].items()}
        name = max((n for n, v in scores.items() if v is not None), key=scores.get)
        floor[COLUMNS[task]] = {"baseline": name, "value": scores[name]}
    return floor


def load_floor(path: str) -> dict[str, dict[str, Any]]:
    """The floor of each task from a `baselines.json` (or the folder holding one): `{"TC": {"baseline":
    name, "value": percent}, ...}`, the trivial baseline with the best primary metric (scored as runs
    are when the file holds the clients' scores). `ValueError` (one line) when the file is missing,
    unreadable or not a baselines file."""
    return _best(_read(path))


def _partition_of(setting: str) -> str | None:
    from fedmoe_jax.experiment.config import SETTINGS

    return SETTINGS[setting][1] if setting in SETTINGS else None


def floors_by_setting(paths: Sequence[str], settings: Sequence[str],
                      seeds: Mapping[str, Sequence[Any]] | None = None) -> dict[str, dict[str, Any]]:
    """`{setting: {"TC": {"baseline", "value"}, ..., "file": path, "seeds": [...] | None}}` for each
    of `settings` that one of the `paths` is the floor of (see the module docstring); settings without
    one are left out. `seeds[setting]`: the seeds its runs used; where the file scored each of them,
    the floor is their mean (`"seeds"`), else the file's own mean over the seeds it scored (`None`;
    `"unscored_seeds"` names the runs' seeds it lacks).
    `ValueError` (one line) for an unreadable file or a setting that two files claim."""
    docs = {path: _read(path) for path in paths}
    claims: dict[str, list[str]] = {}
    for path, doc in docs.items():
        partition = None if doc.get("clients") is None else str(doc["clients"]["partition"])
        for setting in settings:
            if partition is None or partition == _partition_of(setting):
                claims.setdefault(setting, []).append(path)
    twice = {s: ps for s, ps in claims.items() if len(ps) > 1}
    if twice:
        s, ps = next(iter(twice.items()))
        raise ValueError(f"{' and '.join(ps)} are both the floor of {s}; pass one baselines.json per "
                         "partition (T, TD), each written with --seeds by experiments/baselines.py")
    out = {}
    for s, ps in claims.items():
        doc = docs[ps[0]]
        wanted = sorted({str(x) for x in (seeds or {}).get(s, ())}, key=lambda k: (len(k), k))
        scored = set((doc.get("clients") or {}).get("by_seed") or {})
        used = wanted if wanted and set(wanted) <= scored else None
        out[s] = {**_best(doc, used), "file": ps[0], "seeds": used,
                  "unscored_seeds": [x for x in wanted if x not in scored] if scored else []}
    return out


def floor_data_mismatches(path: str, summaries: Sequence[Mapping[str, Any]]) -> list[str]:
    """What sets the runs' test data apart from the data `baselines.json` (or its folder) measured the
    floor on: one phrase per differing field (`data.source`, `data.dir`, `data.eval_examples_per_task`,
    and for a file with the clients' scores `data.num_clients`, plus `data.alpha` for a TD partition)
    with the values seen, empty when every run matches. Runs whose summary carries no config (written
    by an older version) cannot be checked and are skipped; runs of a setting the file is not the
    floor of are not its business."""
    measured = _read(path)
    want = {"source": measured.get("source"), "dir": measured.get("data_dir"),
            "eval_examples_per_task": (measured.get("examples_per_task") or {}).get("eval")}
    clients = measured.get("clients")
    if clients is not None:
        want["num_clients"] = clients.get("num_clients")
        if clients.get("partition") == "TD":
            want["alpha"] = clients.get("alpha")
    seen: dict[str, set] = {k: set() for k in want}
    for summary in summaries:
        setting = summary.get("setting")
        if clients is not None and isinstance(setting, str) and _partition_of(setting) not in (
                None, clients.get("partition")):
            continue
        data = (summary.get("config") or {}).get("data")
        if isinstance(data, Mapping):
            for k in want:
                seen[k].add(json.dumps(data.get(k)))
    return [f"data.{k}: the floor's {json.dumps(v)}, the runs' {', '.join(sorted(seen[k]))}"
            for k, v in want.items() if v is not None and seen[k] - {json.dumps(v)}]


def check_floor_data(floors: str | Sequence[str], summaries: Sequence[Mapping[str, Any]]) -> None:
    """`FloorMismatchError` (one line) when a floor's `baselines.json` measured other test data than
    the runs of its settings were scored on, or two files claim one setting."""
    paths = floor_paths(floors)
    for path in paths:
        mismatches = floor_data_mismatches(path, summaries)
        if mismatches:
            raise FloorMismatchError(f"{path} was measured on other data than the runs "
                                     f"({'; '.join(mismatches)}); measure the floor with "
                                     "`python experiments/baselines.py` on the runs' config and overrides")
    settings = sorted({s for s in (x.get("setting") for x in summaries) if isinstance(s, str)})
    try:
        floors_by_setting(paths, settings)
    except ValueError as e:
        raise FloorMismatchError(str(e)) from None


def floor_check(t1: Mapping[str, Mapping[str, Mapping]], floors: Mapping[str, Mapping[str, Mapping[str, Any]]]
                ) -> dict[str, dict[str, list[str]]]:
    """`{setting: {method: [columns whose seed-mean score is at or below the setting's floor]}}` (every
    method of every setting with a floor)."""
    return {setting: {m: [c for c in COLUMNS.values()
                          if row.get(c) is not None and row[c] <= floors[setting][c]["value"]]
                      for m, row in rows.items()} for setting, rows in t1.items() if setting in floors}


def render_floor(floors: Mapping[str, Mapping[str, Any]], below: Mapping[str, Mapping[str, list[str]]]
                 ) -> list[str]:
    """Markdown lines: each setting's floor and the methods at or below it."""
    lines = ["The best trivial baseline of each task (`experiments/baselines.py`), scored as the runs are "
             "where its file holds the clients' scores (each client on its own test examples, mean over "
             "clients and seeds); a personalized one (`client_...`, `..._client_prior`) uses the client's "
             "own training labels. A score at or below it has measured nothing.", "",
             "| Setting | Floor | At or below the floor |", "|---|---|---|"]
    for setting, per in below.items():
        f = floors[setting]
        named = ", ".join(f"{c} {f[c]['value']:.2f} ({f[c]['baseline'].replace('_', ' ')})"
                          for c in COLUMNS.values())
        cells = [f"{method_name(m)} ({', '.join(cols)})" for m, cols in per.items() if cols]
        lines.append(f"| {setting_name(setting)} | {named} | {'; '.join(cells) or 'none'} |")
    return lines


Counts = dict[str, dict[str, dict[str, list[int]]]]


def clients_above_floor(groups: Mapping[str, Mapping[str, Sequence[Any]]],
                        floors: Mapping[str, Mapping[str, Any]]) -> Counts:
    """The floor client by client: `{setting: {method: {"TC" | "RC" | "TS": [above, clients]}}}`, over
    every run of the method (`Run`s grouped as `group_runs` does) whose seed its setting's floor file
    scored, and every client of the task that both scored: how many of the method's clients score
    above the best trivial baseline of their own test examples. Settings whose file has no client
    scores (an older one) are left out."""
    out: dict[str, dict[str, dict[str, list[int]]]] = {}
    for setting, methods in groups.items():
        if setting not in floors:
            continue
        by_client = (_read(floors[setting]["file"]).get("clients") or {}).get("by_client")
        if not by_client:
            continue
        per_method = {}
        for method, runs in methods.items():
            counts = {c: [0, 0] for c in COLUMNS.values()}
            for run in runs:
                own = by_client.get(str(run.summary.get("seed")))
                for client, (task, score) in client_scores(run.summary).items():
                    if own is None or task not in own:
                        continue
                    values = [v[client] for v in own[task].values() if _num(v.get(client)) is not None]
                    if values:
                        counts[COLUMNS[task]][0] += score > max(values)
                        counts[COLUMNS[task]][1] += 1
            if any(n for _, n in counts.values()):
                per_method[method] = counts
        if per_method:
            out[setting] = per_method
    return out


def render_clients_above_floor(table: Mapping[str, Mapping[str, Mapping[str, Sequence[int]]]]) -> list[str]:
    """Markdown lines: per setting, each method's clients above their own floor."""
    if not table:
        return []
    return ["Client by client: of each method's clients (all seeds the floor scored), how many score above "
            "the best trivial baseline of their own test examples (the floor files' `by_client`).", "",
            *task_tables(table, _share)]


def _share(counts: Sequence[int]) -> str:
    above, n = counts
    return f"{above}/{n} ({100 * above / n:.0f} %)" if n else "—"
