"""Finding and reading run directories: `Run` (a run's summary, metrics rows and expert arrays),
the report's `Notes`, grouping runs by setting and method, and exporting the files a report reads.

Expert arrays (`experts.npz`): `client_tasks [N]`, `probs [N, L, E]` (N clients, L MoE layers, E experts)
and, when the run has them, `stage1_probs [N, L, E]`, `initial_maps <bool>[N, L, E]`, `budgets_bytes [N]`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmoe_jax.federated.metrics import METRICS_FILE, read_metrics
from fedmoe_jax.files import EXPERTS_FILE, PREDICTIONS_FILE, RUN_CONFIG_FILE, SUMMARY_FILE
from fedmoe_jax.tools.reports.names import _method_rank, _setting_rank, variant_method


@dataclass
class Run:
    """One run directory: its summary and, when present, its metrics rows and expert arrays."""

    path: str
    rel: str
    summary: dict[str, Any]
    mtime: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    experts: dict[str, np.ndarray] | None = None
    variant: str = ""  # `assign_variants`: the config keys that set this run apart, "k=v,k2=v2"

    @property
    def method(self) -> str:
        """The row this run belongs to: the method, with `[variant]` when it has one."""
        return variant_method(self.summary["method"], self.variant)

    @property
    def base_method(self) -> str:
        return self.summary["method"]

    @property
    def setting(self) -> str:
        return self.summary["setting"]

    @property
    def seed(self) -> int:
        return self.summary["seed"]

    def label(self) -> str:
        return f"{self.setting}/{self.method}/seed {self.seed}"


class Notes(list):
    """The report's "Notes" list: each message once, in order of first appearance."""

    def add(self, message: str) -> None:
        if message not in self:
            self.append(message)


def find_summaries(root: str) -> list[str]:
    """Every `summary.json` under `root`, at any depth, in a stable order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if SUMMARY_FILE in filenames:
            found.append(os.path.join(dirpath, SUMMARY_FILE))
    return found


def load_runs(root: str, notes: Notes) -> list[Run]:
    """The runs under `root`, one per (setting, method with variant, seed): the newest `summary.json` wins."""
    kept: dict[tuple[str, str, int], Run] = {}
    loaded: list[Run] = []
    for path in find_summaries(root):
        run_dir = os.path.dirname(path)
        rel = os.path.relpath(run_dir, root)
        try:
            with open(path) as f:
                summary = json.load(f)
        except (OSError, ValueError) as e:
            notes.add(f"`{rel}`: unreadable {SUMMARY_FILE} ({e}); skipped")
            continue
        if not isinstance(summary, dict) or not all(
                isinstance(summary.get(k), str) for k in ("method", "setting")):
            notes.add(f"`{rel}`: {SUMMARY_FILE} has no 'method'/'setting' strings; skipped")
            continue
        if not isinstance(summary.get("seed"), int) or isinstance(summary.get("seed"), bool):
            notes.add(f"`{rel}`: {SUMMARY_FILE} has no integer 'seed'; counted as seed -1")
            summary["seed"] = -1
        loaded.append(Run(run_dir, rel, summary, os.path.getmtime(path)))
    assign_variants(loaded, notes)
    for run in loaded:
        key = (run.setting, run.method, run.seed)
        if key in kept:
            old = kept[key]
            newer, older = (run, old) if (run.mtime, run.rel) > (old.mtime, old.rel) else (old, run)
            notes.add(f"{run.label()}: two runs, `{newer.rel}` and `{older.rel}`; using the newer "
                      f"`{newer.rel}`")
            kept[key] = newer
        else:
            kept[key] = run
    runs = sorted(kept.values(), key=lambda r: (_setting_rank(r.setting), _method_rank(r.method), r.seed))
    for run in runs:
        run.rows = _load_rows(run, notes)
        run.experts = _load_experts(run, notes)
    return runs


def _flat_config(config: Any, prefix: str = "") -> dict[str, str]:
    """{dotted key: JSON of the value} of a nested config dict (lists and scalars are leaves)."""
    if not isinstance(config, Mapping):
        return {}
    out: dict[str, str] = {}
    for k, v in config.items():
        if isinstance(v, Mapping):
            out.update(_flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True)
    return out


def assign_variants(runs: Sequence[Run], notes: Notes) -> None:
    """Sets `run.variant` where runs of one (setting, method) differ in more than the seed.

    A sweep with a hyperparameter axis (`configs/sweeps/cpu_ablation.json`: `stage2.patience` 1 and 2)
    writes runs of the same setting, method and seed that are different experiments; pooling them as
    seeds, or keeping one, would misreport both. Per (setting, method), the keys of `summary["config"]`
    that every run has, other than `seed`, and whose values differ between runs name the variant:
    `stage2.patience=1`. Keys only some runs have (a config written by an older version of the code)
    are not compared, so a grid resumed across library versions stays one row."""
    by_group: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        by_group.setdefault((run.setting, run.base_method), []).append(run)
    for (setting, method), group in by_group.items():
        flats = [_flat_config(r.summary.get("config")) for r in group]
        if len(group) < 2 or not all(flats):
            continue
        common = set.intersection(*(set(f) for f in flats)) - {"seed"}
        differ = sorted(k for k in common if len({f[k] for f in flats}) > 1)
        if not differ:
            continue
        for run, flat in zip(group, flats):
            run.variant = ",".join(f"{k}={_compact(flat[k])}" for k in differ)
        notes.add(f"{setting}/{method}: runs differ in {', '.join(differ)}; each value is its own row "
                  f"({', '.join(sorted({variant_method(method, r.variant) for r in group}))}); the "
                  "paper comparisons use only rows without a variant")


def _compact(value_json: str) -> str:
    """A JSON value for a row name: strings unquoted."""
    value = json.loads(value_json)
    return value if isinstance(value, str) else json.dumps(value)


def _load_rows(run: Run, notes: Notes) -> list[dict[str, Any]]:
    path = os.path.join(run.path, METRICS_FILE)
    if not os.path.exists(path):
        notes.add(f"{run.label()} (`{run.rel}`): no {METRICS_FILE}; no convergence curve or time-to-target")
        return []
    try:
        rows = read_metrics(run.path)
    except ValueError:  # e.g. a half-written last line: keep the readable rows
        rows, bad = [], 0
        with open(path) as f:
            for line in filter(str.strip, f):
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    bad += 1
        notes.add(f"{run.label()} (`{run.rel}`): {bad} unreadable line(s) in {METRICS_FILE} ignored")
    return [r for r in rows if isinstance(r, dict)]


def _load_experts(run: Run, notes: Notes) -> dict[str, np.ndarray] | None:
    path = os.path.join(run.path, EXPERTS_FILE)
    if not os.path.exists(path):
        notes.add(f"{run.label()} (`{run.rel}`): no {EXPERTS_FILE}; no activation heatmap")
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError) as e:
        notes.add(f"{run.label()} (`{run.rel}`): unreadable {EXPERTS_FILE} ({e})")
        return None
    tasks, probs = arrays.get("client_tasks"), arrays.get("probs")
    if tasks is None or probs is None or probs.ndim != 3 or tasks.shape != probs.shape[:1]:
        notes.add(f"{run.label()} (`{run.rel}`): {EXPERTS_FILE} lacks client_tasks [N] / probs [N, L, E]")
        return None
    return arrays


def check_initial_models(runs: Sequence[Run], notes: Notes) -> dict[str, list[str]]:
    """{model (experts): sorted `init_fingerprint`s} of the runs that record one; a model with more than
    one (a pretrained model rebuilt between runs, say) gets a note naming its runs per fingerprint."""
    seen: dict[str, dict[str, list[str]]] = {}
    for run in runs:
        fp = run.summary.get("init_fingerprint")
        if fp:
            model = f"{run.summary.get('model', '?')} ({run.summary.get('num_experts', '?')} experts)"
            seen.setdefault(model, {}).setdefault(fp, []).append(run.rel)
    for model, fps in seen.items():
        if len(fps) > 1:
            notes.add(f"runs of {model} started from {len(fps)} different initial models: "
                      + "; ".join(f"{fp}: {', '.join(f'`{r}`' for r in sorted(rels)[:3])}"
                                  + (f" and {len(rels) - 3} more" if len(rels) > 3 else "")
                                  for fp, rels in sorted(fps.items()))
                      + " (comparisons across them mix models)")
    return {model: sorted(fps) for model, fps in seen.items()}


def group_runs(runs: Iterable[Run]) -> dict[str, dict[str, list[Run]]]:
    """{setting: {method: [runs by seed]}}, settings and methods in the paper's order."""
    groups: dict[str, dict[str, list[Run]]] = {}
    for run in runs:
        groups.setdefault(run.setting, {}).setdefault(run.method, []).append(run)
    return {s: {m: sorted(groups[s][m], key=lambda r: r.seed) for m in sorted(groups[s], key=_method_rank)}
            for s in sorted(groups, key=_setting_rank)}


class NoRunsError(ValueError):
    """No `summary.json` under the given root."""


# What a report reads from a run directory, plus the resolved config (checkpoints stay behind).
RUN_FILES = (SUMMARY_FILE, METRICS_FILE, EXPERTS_FILE, RUN_CONFIG_FILE, PREDICTIONS_FILE)


def export_runs(root: str, dest: str) -> list[str]:
    """Copy `RUN_FILES` of every run under `root` to `dest` at the same relative paths, file times
    kept (the newest summary still wins), so a report can be rebuilt from `dest` and committed
    without checkpoints. Returns the runs' relative paths; `dest` must lie outside `root`."""
    root_abs, dest_abs = os.path.realpath(root), os.path.realpath(dest)
    if os.path.commonpath([root_abs, dest_abs]) == root_abs:
        raise ValueError(f"the export directory {dest!r} is inside {root!r}; pick one outside it")
    runs = []
    for path in find_summaries(root):
        rel = os.path.relpath(os.path.dirname(path), root)
        os.makedirs(os.path.join(dest, rel), exist_ok=True)
        for name in RUN_FILES:
            src = os.path.join(root, rel, name)
            if os.path.exists(src):
                shutil.copy2(src, os.path.join(dest, rel, name))
        runs.append(rel)
    return runs
