"""What a sweep writes down: `sweep.json` (the spec and a record per run) and the results tables,
`results.csv` (full precision) and `results.md` (rounded, with means over seeds), collected from the
runs' summaries."""

from __future__ import annotations

import csv
import datetime
import io
import json
import os
import statistics
from collections.abc import Sequence
from typing import Any

from fedmoe_jax.files import SUMMARY_FILE as SUMMARY
from fedmoe_jax.files import atomic_write, json_get, write_json
from fedmoe_jax.tools.sweeps.spec import Run, SweepSpec, expand, spec_from_dict
from fedmoe_jax.tools.sweeps.values import SpecError, format_cli_value

SWEEP_JSON = "sweep.json"
RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"


def _counts(records: Sequence[dict]) -> dict[str, int]:
    out = {"total": len(records)}
    for status in ("done", "skipped", "failed", "interrupted", "pending"):
        out[status] = sum(r["status"] == status for r in records)
    return out


def write_sweep_json(spec: SweepSpec, records: Sequence[dict]) -> None:
    doc = {"spec": spec.to_dict(), "updated": datetime.datetime.now().isoformat(timespec="seconds"),
           "counts": _counts(records), "runs": list(records)}
    write_json(os.path.join(spec.root, SWEEP_JSON), doc)


def read_sweep_json(root: str) -> dict | None:
    try:
        with open(os.path.join(root, SWEEP_JSON)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


SCORE_COLUMNS = (("tc_acc", "tc_accuracy"), ("rc_f1", "rc_f1"), ("ts_rouge2", "ts_rouge2"))
NUMBER_COLUMNS = ("comm_gib", "peak_mem_gb_mean", "peak_mem_gb_max", "experts_end_mean", "wall_s")


def _number(summary: Any, *path: str) -> Any:
    """The number at `path` of a parsed summary (`json_get`), None when missing or not a number."""
    v = json_get(summary, *path)
    return v if isinstance(v, int | float) and not isinstance(v, bool) else None


def _read_summary(run: Run) -> dict | None:
    try:
        with open(os.path.join(run.workdir, SUMMARY)) as f:
            doc = json.load(f)
        return doc if isinstance(doc, dict) else None
    except (OSError, ValueError):
        return None


def collect(spec: SweepSpec, runs: Sequence[Run] | None = None,
            records: Sequence[dict] | None = None) -> list[dict]:
    """One row per run: arg, setting, the grid values, test scores in percent, cost numbers, status.

    Status is `done` when summary.json exists, else the run's record (failed / interrupted /
    pending), else `incomplete` (a directory without summary) or `pending`."""
    runs = expand(spec) if runs is None else runs
    if records is None:
        records = (read_sweep_json(spec.root) or {}).get("runs", [])
    by_name = {r["name"]: r for r in records}
    rows = []
    for run in runs:
        summary = _read_summary(run)
        rec = by_name.get(run.name, {})
        row: dict[str, Any] = {"arg": run.arg or ""}
        setting = (summary or {}).get("setting") or run.params.get("setting") or spec.set.get("setting") or ""
        row["setting"] = setting if isinstance(setting, str) else format_cli_value(setting)
        row.update({k: format_cli_value(v) for k, v in run.params.items()})
        for col, key in SCORE_COLUMNS:
            v = _number(summary, "test", key)
            row[col] = None if v is None else round(v, 6)  # summary.json scores are percent
        row["comm_gib"] = _number(summary, "comm_gib_per_transfer")
        row["peak_mem_gb_mean"] = _number(summary, "peak_memory_gb", "mean")
        row["peak_mem_gb_max"] = _number(summary, "peak_memory_gb", "max")
        row["experts_end_mean"] = _number(summary, "experts_end", "mean")
        row["wall_s"] = _number(summary, "wall_seconds")
        if summary is not None:
            status = "done"
        elif os.path.isfile(os.path.join(run.workdir, SUMMARY)):
            status = "bad summary"
        elif rec.get("status") in ("failed", "interrupted"):
            status = rec["status"]
        else:
            status = "incomplete" if os.path.isdir(run.workdir) else "pending"
        row["status"] = status
        row["error"] = rec.get("error", "") if status != "done" else ""
        row["dir"] = run.name
        rows.append(row)
    return rows


def _columns(spec: SweepSpec) -> list[str]:
    cols = ["arg"] if spec.args else []
    if "setting" not in spec.grid:
        cols.append("setting")
    cols += list(spec.grid)
    cols += [c for c, _ in SCORE_COLUMNS] + list(NUMBER_COLUMNS) + ["status"]
    return cols


def _cell(col: str, v: Any) -> str:
    if v is None:
        return ""
    if not isinstance(v, float):
        return str(v)
    fmt = {"comm_gib": ".4g", "peak_mem_gb_mean": ".3g", "peak_mem_gb_max": ".3g", "experts_end_mean": ".1f",
           "wall_s": ".0f"}.get(col, ".2f")
    return format(v, fmt)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    esc = lambda s: str(s).replace("|", "\\|")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return lines


def _mean_std(values: Sequence[float]) -> str:
    if not values:
        return ""
    mean = statistics.fmean(values)
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:.2f}"


def write_tables(spec: SweepSpec, rows: Sequence[dict]) -> tuple[str, str]:
    """ROOT/results.csv (full precision, plus each run's dir and error) and ROOT/results.md (rounded;
    with a mean ± std over seeds table when `seed` is a grid axis)."""
    cols = _columns(spec)
    csv_path, md_path = os.path.join(spec.root, RESULTS_CSV), os.path.join(spec.root, RESULTS_MD)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols + ["dir", "error"])
    for row in rows:
        writer.writerow(["" if row.get(c) is None else row[c] for c in cols + ["dir", "error"]])
    atomic_write(csv_path, buf.getvalue())

    counts = {s: sum(r["status"] == s for r in rows) for s in dict.fromkeys(r["status"] for r in rows)}
    lines = [f"# Sweep results: {spec.root}", "",
             f"`{spec.config}`; {len(rows)} run(s): " + ", ".join(f"{n} {s}" for s, n in counts.items())
             + ". Scores: test, percent (TC accuracy, RC F1, TS ROUGE-2).", ""]
    # The setting column says nothing new when the config ARG is the setting (configs/cpu.py:SETTING).
    md_cols = [c for c in cols if c != "setting" or "setting" in spec.grid
               or any(r["setting"] not in ("", r["arg"]) for r in rows)]
    lines += _md_table(md_cols, [[_cell(c, row.get(c)) for c in md_cols] for row in rows])
    if "seed" in spec.grid:
        group_cols = [c for c in md_cols[:md_cols.index("tc_acc")]
                      if c != "seed" and (c != "setting" or "setting" in spec.grid)]
        groups: dict[tuple, list[dict]] = {}
        for row in rows:
            groups.setdefault(tuple(row.get(c) for c in group_cols), []).append(row)
        agg = []
        for key, members in groups.items():
            done = [m for m in members if m["status"] == "done"]
            cells = [_mean_std([m[c] for m in done if m[c] is not None]) for c, _ in SCORE_COLUMNS]
            agg.append([*map(str, key), f"{len(done)}/{len(members)}", *cells])
        lines += ["", "## Mean ± std over seeds (finished runs)", ""]
        lines += _md_table([*group_cols, "seeds", *(c for c, _ in SCORE_COLUMNS)], agg)
    failed = [r for r in rows if r["status"] not in ("done", "pending")]
    if failed:
        lines += ["", "## Not finished", ""] + [f"- `{r['dir']}`: {r['status']}"
                                                 + (f": {r['error']}" if r["error"] else "") for r in failed]
    atomic_write(md_path, "\n".join(lines) + "\n")
    return csv_path, md_path


def spec_for_collect(root: str) -> SweepSpec:
    """The spec a previous sweep recorded in ROOT/sweep.json (for `--collect-only --root=ROOT`)."""
    doc = read_sweep_json(root)
    if not doc or "spec" not in doc:
        raise SpecError(f"{os.path.join(root, SWEEP_JSON)} not found or unreadable; give the sweep's spec")
    d = dict(doc["spec"])
    d["root"] = root
    return spec_from_dict(d, check_runner=False)
