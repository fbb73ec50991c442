"""Paper-style reports from run directories: Table 1 / Table 2 analogues and figures (the paper's metrics).

A run directory is what `python -m fedmoe_jax.main ... --workdir=DIR` writes: `summary.json` (run-level
numbers), `metrics.jsonl` (one row per round) and `experts.npz` (client expert maps and activation
probabilities). `build_report(root, out)` finds every `summary.json` under `root` (any depth), groups the
runs by (setting, method) over seeds and writes to `out`. Runs of one setting and method whose configs
differ in more than the seed (a sweep's hyperparameter axis) are separate rows, named by the keys that
differ: `fedmoe[stage2.patience=1]` (`assign_variants`); the paper comparisons use the plain rows.

- `report.md`: Table 1 and Table 2 analogues, average improvement, CVI, time-to-target, the paper's
  directions, whether clients' experts follow their tasks (`task_separation`), figures, notes;
- `table1.json`: `{setting: {method: {"TC", "RC", "TS", "comm_gb", "mem_gb", "seeds", ...extras}}}`;
- `table2.json`: `{setting: {method: {"TC", "RC", "TS", "experts_start_mean", ..., "seeds"}}}`;
- `report.json`: average improvement, CVI, time-to-target speedups, the paper's Table-1 directions (with
  seed-paired differences and 95 % intervals) and the notes;
- `figures/*.png`: expert activation heatmaps per task, convergence curves, expert counts over rounds.

Definitions where the paper is silent, all written into the report:

- Scores are percent, the mean over seeds of each run's per-task test score; `±` is the sample standard
  deviation over seeds (ddof 1; none with one seed).
- Memory: `mem_gb` is `peak_memory_gb.mean`, each client's peak training memory (its largest trained
  sub-MoE plus the method's extra state, `MemoryModel`) averaged over clients (the paper's FedMoE
  peaks of 13.4-14.0 GB match its *average* sub-MoE of 65-78 experts, not its largest); `mem_gb_max`
  (the largest client's peak) sits next to it.
- Average improvement: the paper's rule via `metrics.average_improvement` (mean over tasks of |f - b| / b,
  the baseline with the smallest value); the signed value is shown next to it.
- CVI: `metrics.composite_variation_index` over the settings' seed-mean scores (population c_v per
  task across the settings the method ran in, mean over tasks).
- Time-to-target: on the seed-mean validation curve (`val_score_<task>` of `metrics.jsonl`, rounds as
  numbered there), the "relative target performance" of FedMoE against a baseline is the best score
  *both* curves reach, min(max FedMoE, max baseline); the speedup to a fraction f of it is
  rounds(baseline) / rounds(FedMoE) to first reach f x target (`metrics.time_to_target_speedup`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmoe_jax import predictions
from fedmoe_jax.algorithms.base import improves
from fedmoe_jax.algorithms.fedmoe import cosine_similarity
from fedmoe_jax.federated.metrics import (
    METRICS_FILE,
    average_improvement,
    coefficient_of_variation,
    composite_variation_index,
    read_metrics,
    rounds_to_target,
    time_to_target_speedup,
)
from fedmoe_jax.files import EXPERTS_FILE, PREDICTIONS_FILE, RUN_CONFIG_FILE, SUMMARY_FILE, atomic_write

TASKS = ("tc", "rc", "ts")  # the order of `client_tasks` in experts.npz
COLUMNS = {"tc": "TC", "rc": "RC", "ts": "TS"}
TEST_KEYS = {"tc": "tc_accuracy", "rc": "rc_f1", "ts": "ts_rouge2"}
SETTING_NAMES = {
    "standard_hetero_t": "Standard-Hetero-T",
    "standard_hetero_td": "Standard-Hetero-TD",
    "enforced_hetero_t": "Enforced-Hetero-T",
    "enforced_hetero_td": "Enforced-Hetero-TD",
}
# Table 1's row order (baselines first, FedMoE last), then the extra methods and the ablations.
METHOD_NAMES = {
    "random_moe": "randomMoE",
    "fedprox": "FedProx",
    "scaffold": "SCAFFOLD",
    "fedavg": "FedAvg",
    "local": "Local only",
    "fedmoe": "FedMoE",
    "fedmoe_no_stage1": "FedMoE w/o stage1",
    "fedmoe_no_stage2": "FedMoE w/o stage2",
}
ABLATION_METHODS = ("fedmoe", "fedmoe_no_stage1", "fedmoe_no_stage2", "random_moe")
DEFAULT_BASELINES = ("random_moe", "fedprox", "scaffold")
METHOD = "fedmoe"
TARGET_FRACTIONS = (0.99, 0.9)
CURVES = {"tc": "val_score_tc", "rc": "val_score_rc", "ts": "val_score_ts", "all": "val_score"}
FULL_CURVE = "full_"  # prefix of the all-client validation curve (eval.full_every), preferred when present
MISSING = "—"
MARKS = {True: "✓", False: "✗", None: "?"}  # a paper direction or reading: holds / reversed / undecided


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


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


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


def variant_method(method: str, variant: str) -> str:
    """`fedmoe` + `stage2.patience=1` -> `fedmoe[stage2.patience=1]`; no variant: the method itself."""
    return f"{method}[{variant}]" if variant else method


def split_method(method: str) -> tuple[str, str]:
    """Inverse of `variant_method`: `fedmoe[stage2.patience=1]` -> (`fedmoe`, `stage2.patience=1`)."""
    base, sep, rest = method.partition("[")
    return (base, rest[:-1]) if sep and rest.endswith("]") else (method, "")


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


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------


def _num(x: Any) -> float | None:
    """A finite float, or None for anything else (missing, null, NaN, strings)."""
    if isinstance(x, bool) or not isinstance(x, int | float | np.integer | np.floating):
        return None
    return float(x) if math.isfinite(float(x)) else None


def _tally(entries: Iterable[Mapping[str, Any]]) -> tuple[int, int]:
    """(held, judged) over verdict entries: those whose `holds` is True, and those decidable (not None)."""
    marks = [e["holds"] for e in entries]
    return sum(m is True for m in marks), sum(m is not None for m in marks)


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, Mapping):
            return None
        d = d.get(k)
    return d


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof 1; None with fewer than two values)."""
    if not values:
        return None, None
    v = np.asarray(values, np.float64)
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else None)


def _rank(order: Sequence[str], name: str) -> tuple[int, str]:
    return (order.index(name), "") if name in order else (len(order), name)


def _setting_rank(s: str) -> tuple[int, str]:
    return _rank(list(SETTING_NAMES), s)


def _method_rank(m: str) -> tuple[int, str, str]:
    base, variant = split_method(m)
    return (*_rank(list(METHOD_NAMES), base), variant)


def setting_name(s: str) -> str:
    return SETTING_NAMES.get(s, s)


def method_name(m: str) -> str:
    base, variant = split_method(m)
    return METHOD_NAMES.get(base, base) + (f" [{variant}]" if variant else "")


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


def _fmt(mean: float | None, std: float | None = None, digits: int = 2) -> str:
    if mean is None:
        return MISSING
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _size(x: float, sign: str = "") -> str:
    """Two decimals, or three significant digits below 0.1 (CPU-scale models); `sign="+"` signs it."""
    return f"{x:{sign}.2f}" if x == 0 or abs(x) >= 0.1 else f"{x:{sign}.3g}"


def _fmt_size(mean: float | None, std: float | None = None) -> str:
    """GiB / GB of a table cell: `_size` of the mean (and std)."""
    if mean is None:
        return MISSING
    return _size(mean) if std is None else f"{_size(mean)} ± {_size(std)}"


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _write_json(path: str, obj: Any) -> None:
    """Strict JSON (non-finite numbers as null), written atomically."""
    atomic_write(path, json.dumps(_jsonable(obj), indent=1, allow_nan=False) + "\n")


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


def _task_scores(runs: list[Run], block: str, notes: Notes | None) -> dict[str, Any]:
    """Percent mean / std / count over seeds of one evaluation block ("test", "global_test", ...)."""
    out: dict[str, Any] = {}
    for task in TASKS:
        col, values, by_seed = COLUMNS[task], [], {}
        for run in runs:
            v = _num(_get(run.summary, block, TEST_KEYS[task]))
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
            mem = [v for r in runs if (v := _num(_get(r.summary, "peak_memory_gb", "mean"))) is not None]
            mem_max = [v for r in runs if (v := _num(_get(r.summary, "peak_memory_gb", "max"))) is not None]
            for run in runs:
                if _num(run.summary.get("comm_gib_per_transfer")) is None:
                    notes.add(f"{run.label()}: no comm_gib_per_transfer (shown as {MISSING})")
                if _num(_get(run.summary, "peak_memory_gb", "mean")) is None:
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
                    row.update({f"{prefix}_{c}": extra[c] for c in COLUMNS.values()})
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
    methods = sorted({m for ms in table.values() for m in ms}, key=_method_rank)
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
    """{setting: {curve: {baseline: {"0.99": {...}, "0.9": {...}}}}}: FedMoE's speedups (see module doc)."""
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
                means = [v for b in block if (v := _num(_get(b, "mean"))) is not None]
                mins = [v for b in block if (v := _num(_get(b, "min"))) is not None]
                maxs = [v for b in block if (v := _num(_get(b, "max"))) is not None]
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
    count = _num(_get(run.summary, "stage1", "measured"))
    budgets = run.experts.get("budgets_bytes")
    if count is None or budgets is None or len(budgets) != len(probs):
        return nonzero
    measured = np.zeros(len(probs), bool)
    measured[np.argsort(-np.asarray(budgets, np.float64), kind="stable")[:int(count)]] = True
    return measured & nonzero


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
    initial sub-MoEs. Numbers are None where a run lacks the array."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for setting, methods in groups.items():
        for method in _ablation_rows(methods):  # the sub-MoE methods
            cw, cb, jw, jb, hits, ents, clients = [], [], [], [], [], [], 0
            for run in methods[method]:
                if run.experts is None:
                    continue
                tasks = np.asarray(run.experts["client_tasks"])
                maps = run.experts.get("initial_maps")
                if maps is not None and maps.shape[:1] == tasks.shape:
                    m = np.asarray(maps, np.float64).reshape(len(maps), -1)
                    inter = m @ m.T
                    union = m.sum(1)[:, None] + m.sum(1)[None] - inter
                    w, b = _within_between(np.divide(inter, union, out=np.zeros_like(inter), where=union > 0),
                                           tasks)
                    jw += w
                    jb += b
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
                "jaccard_within": mean(jw), "jaccard_between": mean(jb), "seeds": len(methods[method])}
    if not out:
        notes.add("no FedMoE, ablation or randomMoE run has expert maps (experts.npz): no task-separation "
                  "table")
    return out


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
        stage2 = _get(run.summary, "config", "stage2")
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


def render_task_separation(sep: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[str]:
    """Markdown lines for `task_separation`."""
    if not sep:
        return ["No FedMoE, ablation or randomMoE run has expert maps or Stage-1 profiles."]
    lines = ["Whether clients' expert use follows their task, the premise of FedMoE (paper Fig. 1): "
             "**Stage-1 profiles** (measured clients only, each client's activation probabilities "
             "`[L, E]` after the LoRA rounds) — mean cosine between two clients of the same / different "
             "tasks, the share of clients whose task the nearest task centroid names (leave-one-out; "
             "chance 33 %), and the routing entropy (1 = uniform over experts); **initial sub-MoEs** — "
             "mean Jaccard overlap of two clients' expert maps, same / different task. Pairs within a "
             "run, seeds pooled.", ""]
    for setting, rows in sep.items():
        lines += [f"### {setting_name(setting)}", "",
                  "| Method | Profiles | Cosine same / diff task | Task from profile | Entropy | "
                  "Map overlap same / diff task | Seeds |", "|---|---|---|---|---|---|---|"]
        for method, e in rows.items():
            cos = (MISSING if e["cos_within"] is None
                   else f"{e['cos_within']:.3f} / {_fmt(e['cos_between'], digits=3)}")
            task = MISSING if e["task_from_profile"] is None else f"{100 * e['task_from_profile']:.0f} %"
            jac = (MISSING if e["jaccard_within"] is None
                   else f"{e['jaccard_within']:.2f} / {_fmt(e['jaccard_between'])}")
            lines.append(f"| {method_name(method)} | {e['clients'] or MISSING} | {cos} | {task} | "
                         f"{_fmt(e['entropy'], digits=3)} | {jac} | {e['seeds']} |")
        lines.append("")
    return lines


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _integer_ticks() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _color(method: str) -> Any:
    import matplotlib

    order = list(METHOD_NAMES)
    index = order.index(method) if method in order else len(order) + sum(map(ord, method)) % 10
    return matplotlib.colormaps["tab10"](index % 10)


def task_activation(runs: Sequence[Run], key: str, notes: Notes) -> tuple[dict[str, np.ndarray], dict]:
    """Per task, the mean of `key` ("probs" or "stage1_probs") over the task's measured clients of all
    seeds `[L, E]`, and the number of clients averaged. Unmeasured clients (all zero / NaN) are left out."""
    stacks: dict[str, list[np.ndarray]] = {t: [] for t in TASKS}
    shape = None
    for run in runs:
        if run.experts is None or key not in run.experts:
            continue
        probs = np.asarray(run.experts[key], np.float64)
        tasks = np.asarray(run.experts["client_tasks"])
        if probs.shape != run.experts["probs"].shape:
            notes.add(f"{run.label()}: {key} has shape {probs.shape}, not that of probs; left out")
            continue
        if shape is None:
            shape = probs.shape[1:]
        elif probs.shape[1:] != shape:
            notes.add(f"{run.label()}: {key} is [L, E] = {probs.shape[1:]}, other seeds {shape}; left out")
            continue
        total = np.where(np.isfinite(probs), probs, 0.0).sum((1, 2))
        measured = np.isfinite(probs).all((1, 2)) & (total > 0)
        for i, task in enumerate(TASKS):
            chosen = measured & (tasks == i)
            if chosen.any():
                stacks[task].append(probs[chosen])
    means, counts = {}, {}
    for task, parts in stacks.items():
        if parts:
            stacked = np.concatenate(parts)
            means[task], counts[task] = stacked.mean(0), len(stacked)
    return means, counts


def plot_heatmaps(means: Mapping[str, np.ndarray], counts: Mapping[str, int], title: str, path: str) -> None:
    """Paper Fig. 1: one panel per task, MoE layers x experts, colour = mean activation probability."""
    plt = _pyplot()
    vmax = max(float(m.max()) for m in means.values()) or 1.0
    fig, axes = plt.subplots(1, len(TASKS), figsize=(4.2 * len(TASKS), 3.6), squeeze=False,
                             layout="constrained")
    image = None
    for i, (ax, task) in enumerate(zip(axes[0], TASKS)):
        if task in means:
            image = ax.imshow(means[task], aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax,
                              interpolation="nearest")
            ax.set_title(f"task-{COLUMNS[task]} ({counts[task]} clients)")
        else:
            ax.text(0.5, 0.5, "no measured client", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(f"task-{COLUMNS[task]}")
        ax.set(xlabel="expert", ylabel="MoE layer" if i == 0 else None)
        ax.xaxis.set_major_locator(_integer_ticks())
        ax.yaxis.set_major_locator(_integer_ticks())
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), label="activation probability", shrink=0.9)
    fig.suptitle(title)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_convergence(methods: Mapping[str, list[Run]], ttt: Mapping[str, Any], title: str, path: str) -> bool:
    """Validation score per round per task, one line per method (seed mean); time-to-target markers."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(TASKS), figsize=(4.6 * len(TASKS), 3.9), squeeze=False,
                             layout="constrained")
    drawn = False
    for ax, task in zip(axes[0], TASKS):
        key = curve_key(methods, list(methods), CURVES[task])
        curves = {m: curve(runs, key) for m, runs in methods.items()}
        for method, values in curves.items():
            rounds = np.flatnonzero(np.isfinite(values)) + 1
            if len(rounds):
                ax.plot(rounds, values[rounds - 1], "-", lw=1.2, color=_color(method),
                        label=method_name(method))
                drawn = True
        for baseline, entry in ttt.get(task, {}).items():
            for frac, marker, size in zip(TARGET_FRACTIONS, ("^", "o"), (10, 5)):  # 90 % drawn on top
                e = entry[str(frac)]
                for method, r in ((METHOD, e["rounds_method"]), (baseline, e["rounds_baseline"])):
                    if r is not None:
                        y = curve(methods[method], entry["curve"])[r - 1]
                        ax.plot([r], [y], marker, ms=size, mfc=_color(baseline),
                                mec="black", mew=0.8, ls="none", zorder=3)
        ax.set(title=f"task-{COLUMNS[task]}", xlabel="round", ylabel="validation score (%)")
        ax.xaxis.set_major_locator(_integer_ticks())
        ax.grid(alpha=0.3)
    if not drawn:
        plt.close(fig)
        return False
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 6), frameon=False,
               title="time-to-target: ▲ 99 %, ● 90 % of the target against the baseline of the marker's "
                     "colour (on FedMoE's curve and on that baseline's)", title_fontsize="small")
    fig.suptitle(title)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_expert_counts(methods: Mapping[str, list[Run]], title: str, path: str) -> bool:
    """Experts per client (summed over MoE layers) per round: seed mean of the mean, min/max band."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8), layout="constrained")
    drawn = False
    for method, runs in methods.items():
        mean = curve(runs, "expert_count_mean")
        low, high = curve(runs, "expert_count_min", np.min), curve(runs, "expert_count_max", np.max)
        rounds = np.flatnonzero(np.isfinite(mean)) + 1
        if not len(rounds):
            continue
        ax.plot(rounds, mean[rounds - 1], color=_color(method), label=method_name(method))
        if len(low) == len(mean) and len(high) == len(mean):
            ok = np.isfinite(low[rounds - 1]) & np.isfinite(high[rounds - 1])
            ax.fill_between(rounds[ok], low[rounds - 1][ok], high[rounds - 1][ok], color=_color(method),
                            alpha=0.15, lw=0)
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set(title=title, xlabel="round", ylabel="experts per client (all MoE layers)")
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.yaxis.set_major_locator(_integer_ticks())
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize="small", loc="best")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def figures(groups: Mapping[str, Mapping[str, list[Run]]], ttt: Mapping[str, Any], out: str, notes: Notes
            ) -> list[tuple[str, str]]:
    """Writes every figure under `out/figures/`; returns (caption, path relative to `out`)."""
    fig_dir = os.path.join(out, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    written = []
    for setting, methods in groups.items():
        name = setting_name(setting)
        rel = os.path.join("figures", f"convergence_{setting}.png")
        if plot_convergence(methods, ttt.get(setting, {}), f"{name}: validation score per round",
                            os.path.join(out, rel)):
            written.append((f"{name}: convergence per task", rel))
        else:
            notes.add(f"{setting}: no validation curves in any {METRICS_FILE}; no convergence figure")
        rel = os.path.join("figures", f"expert_counts_{setting}.png")
        if plot_expert_counts(methods, f"{name}: experts per client", os.path.join(out, rel)):
            written.append((f"{name}: expert counts over rounds (mean, min-max band)", rel))
        for method, runs in methods.items():
            for key, tag in (("probs", "experts"), ("stage1_probs", "experts_stage1")):
                means, counts = task_activation(runs, key, notes)
                if not means:
                    if key == "probs" and any(r.experts is not None for r in runs):
                        notes.add(f"{setting}/{method}: no measured activation probabilities; no heatmap")
                    continue
                rel = os.path.join("figures", f"{tag}_{setting}_{method}.png")
                what = "latest" if key == "probs" else "Stage-1"
                title = f"{name}, {method_name(method)}: {what} expert activation probabilities"
                plot_heatmaps(means, counts, title, os.path.join(out, rel))
                written.append((title, rel))
    return written


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------

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


def output_diagnostics(groups: Mapping[str, Mapping[str, Sequence[Run]]]
                       ) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """{setting: {method: {task: `predictions.diagnostics`}}} of the personalized ("own") test
    predictions each run kept in `predictions.jsonl`, seeds pooled; runs without the file are left out."""
    out: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for setting, methods in groups.items():
        for method, runs in methods.items():
            records = []
            for run in runs:
                try:
                    records += predictions.select(predictions.load(run.path))
                except predictions.PredictionsError:
                    continue
            if records:
                out.setdefault(setting, {})[method] = predictions.diagnostics(records)
    return out


def render_outputs(outputs: Mapping[str, Mapping[str, Mapping[str, Mapping[str, Any]]]]) -> list[str]:
    """Markdown lines of `output_diagnostics`: one table per setting."""
    if not outputs:
        return ["No run kept test predictions (`predictions.jsonl`, written by runs since 2026-12-03)."]
    lines = ["The personalized test predictions each run kept (`eval.predictions` per client, seeds pooled): "
             "share empty, share distinct, share equal to a reference, and the most common output. "
             "`python experiments/predictions.py RUN_DIR ...` shows them side by side.", ""]
    for setting, methods in outputs.items():
        lines += [f"### {setting_name(setting)}", "",
                  "| Method | Task | Kept | Empty | Distinct | Exact | Most common (share) |",
                  "|---|---|---|---|---|---|---|"]
        for method, per_task in methods.items():
            for task, d in per_task.items():
                lines.append(f"| {method_name(method)} | {COLUMNS.get(task, task)} | "
                             f"{predictions.diagnostics_cells(d, limit=48)} |")
        lines.append("")
    return lines


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


def render_markdown(root: str, runs: Sequence[Run], t1: Mapping, t2: Mapping, gains: Mapping, cvis: Mapping,
                    ttt: Mapping, figs: Sequence[tuple[str, str]], baselines: Sequence[str],
                    notes: Sequence[str], against_paper: Mapping, outputs: Mapping | None = None,
                    compared: tuple[str, Mapping] | None = None, separation: Mapping | None = None,
                    against_table2: Mapping | None = None, trials: Mapping | None = None,
                    claims: Sequence[Mapping[str, Any]] | None = None) -> str:
    methods_seen = sorted({m for ms in t1.values() for m in ms}, key=_method_rank)
    lines = [
        "# FedMoE report",
        "",
        f"{len(runs)} run(s) under `{root}`: {len(t1)} setting(s), {len(methods_seen)} method(s). "
        f"Baselines for the comparisons: {', '.join(method_name(b) for b in baselines)}. "
        "Definitions at the end; \"—\" marks missing data (see Notes).",
        "",
        *at_a_glance(against_paper, against_table2 or {}, claims or [], separation or {}, trials or {}),
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
    if compared is not None:
        lines += ["", "## Against an earlier report", ""]
        lines += render_comparison(compared[1], compared[0])
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


# ----------------------------------------------------------------------------------------------
# Against the paper
# ----------------------------------------------------------------------------------------------

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
        from scipy import stats  # a jax dependency; imported here to keep `import reports` light
        half = float(stats.t.ppf(0.5 + level / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
        ci = (mean - half, mean + half)
    return {"seeds": seeds, "diffs": diffs, "mean": mean, "better": int((d > 0).sum()),
            "worse": int((d < 0).sum()), "ci": ci}


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
                    agree = significant = None
                    if p is not None and paper_better is not None:
                        agree = p["better"] if paper_better else p["worse"]  # scores: higher is better
                    if p is not None and p["ci"] is not None:
                        significant = p["ci"][0] > 0 or p["ci"][1] < 0
                    entry[b].update(paired=p, seeds_agree=agree, significant=significant)
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


# ----------------------------------------------------------------------------------------------
# Against an earlier report
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------


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


def build_report(root: str, out: str | None = None, baselines: Sequence[str] = DEFAULT_BASELINES,
                 compare: str | None = None) -> dict[str, Any]:
    """Reads every run under `root`, writes the report to `out` (default `root/report`), returns its data.
    `compare`: an earlier report directory (or its table1.json) to show how each cell moved from it."""
    earlier = load_table1(compare) if compare else None
    if not os.path.isdir(root) or not find_summaries(root):
        raise NoRunsError(root)
    out = out or os.path.join(root, "report")
    notes = Notes()
    runs = load_runs(root, notes)
    if not runs:
        raise NoRunsError(root)
    groups = group_runs(runs)
    initial_models = check_initial_models(runs, notes)
    baselines = [b for b in baselines if b != METHOD]
    seen = {r.method for r in runs}
    for b in baselines:
        if b not in seen:
            notes.add(f"baseline {b}: no runs at all")
    methods_seen = sorted(seen, key=_method_rank)
    for setting, methods in groups.items():
        for m in methods_seen:
            if m not in methods:
                notes.add(f"{setting}: no runs of {m} (shown as {MISSING})")
    t1 = table1(groups, notes)
    gains = improvement(t1, baselines, notes)
    cvis = cvi(t1, notes)
    ttt = time_to_target(groups, baselines, notes)
    t2 = table2(groups, notes)
    separation = task_separation(groups, notes)
    trials = stage2_trials(groups, notes)
    against_paper = paper_comparison(t1, baselines)
    against_table2 = paper_table2_comparison(t2)
    claims = paper_claims(t1, gains, cvis, ttt)
    outputs = output_diagnostics(groups)
    moved = compare_tables(t1, earlier, baselines) if earlier is not None else None
    os.makedirs(out, exist_ok=True)
    figs = figures(groups, ttt, out, notes)
    _write_json(os.path.join(out, "table1.json"), t1)
    _write_json(os.path.join(out, "table2.json"), t2)
    result = {"root": os.path.abspath(root), "runs": [r.rel for r in runs], "average_improvement": gains,
              "cvi": cvis, "time_to_target": ttt, "paper_comparison": against_paper,
              "task_separation": separation, "paper_table2_comparison": against_table2,
              "stage2_trials": trials, "paper_claims": claims,
              "initial_models": initial_models, "outputs": outputs, "figures": [rel for _, rel in figs],
              "notes": list(notes)}
    if moved is not None:
        result["compared_with"] = {"path": compare, **moved}
    _write_json(os.path.join(out, "report.json"), result)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(render_markdown(root, runs, t1, t2, gains, cvis, ttt, figs, baselines, notes,
                                against_paper, outputs, (compare, moved) if moved is not None else None,
                                separation, against_table2, trials, claims))
    return {**result, "out": out, "table1": t1, "table2": t2}


def main(argv: Sequence[str] | None = None) -> int:
    """`python experiments/report.py RUNS_ROOT [--out DIR] [--baseline-methods a,b,c]`; 2 if no runs."""
    parser = argparse.ArgumentParser(
        prog="report.py", description="Table 1 / Table 2 analogues and figures from FedMoE run directories.")
    parser.add_argument("root", help="a directory holding run directories (each with summary.json)")
    parser.add_argument("--out", default=None, help="output directory (default: ROOT/report)")
    parser.add_argument("--baseline-methods", default=",".join(DEFAULT_BASELINES),
                        help="comma-separated baselines FedMoE is compared with (average improvement, "
                             "time-to-target)")
    parser.add_argument("--export-runs", default=None, metavar="DIR",
                        help="also copy each run's summary, metrics, expert maps and config (no "
                             "checkpoints) to DIR, e.g. to commit them; the report can be rebuilt from DIR")
    parser.add_argument("--compare", default=None, metavar="REPORT",
                        help="an earlier report directory (or its table1.json): adds how every Table 1 "
                             "cell moved from it and which FedMoE-vs-baseline directions flipped")
    args = parser.parse_args(argv)
    baselines = [b.strip() for b in args.baseline_methods.split(",") if b.strip()]
    if args.compare:
        try:  # before any work: a bad --compare must not leave a half-written report
            load_table1(args.compare)
        except ValueError as e:
            print(f"report: --compare: {e}", file=sys.stderr)
            return 2
    try:
        exported = export_runs(args.root, args.export_runs) if args.export_runs else None
    except ValueError as e:  # the export directory lies inside RUNS_ROOT
        print(f"report: {e}", file=sys.stderr)
        return 2
    try:
        result = build_report(args.root, args.out, baselines, args.compare)
    except NoRunsError:
        print(f"report: no {SUMMARY_FILE} under {args.root!r}; pass the directory that holds the run "
              f"directories written by `python -m fedmoe_jax.main ... --workdir=DIR`", file=sys.stderr)
        return 2
    if exported is not None:
        print(f"copied {len(exported)} run(s) to {args.export_runs} ({', '.join(RUN_FILES)})")
    print(f"wrote {os.path.join(result['out'], 'report.md')}: {len(result['runs'])} run(s), "
          f"{len(result['figures'])} figure(s), {len(result['notes'])} note(s)")
    return 0


__all__ = ["PAPER_TABLE1", "RUN_FILES", "Run", "assign_variants", "at_a_glance", "build_report",
           "compare_tables", "curve", "cvi",
           "export_runs", "find_summaries", "group_runs", "improvement", "load_runs", "load_table1", "main",
           "mean_std", "paired_difference", "paper_claims", "paper_comparison", "paper_table2_comparison",
           "replay_stale_trials", "split_method", "stage1_measured", "stage2_trials", "table1", "table2",
           "task_separation", "time_to_target", "variant_method"]
