"""What the outputs look like: diagnostics of the test predictions the runs kept
(`predictions.jsonl`), per setting, method and task, seeds pooled."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedmoe_jax.tools import predictions
from fedmoe_jax.tools.reports.loading import Run
from fedmoe_jax.tools.reports.names import COLUMNS, method_name, setting_name


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
             "share empty, share distinct, share equal to a reference, share *off task* (in another task's "
             "form: RC / TS outputs that are a TC class name, TC outputs that are none; the collapse "
             "measure: one task's answers given to another), and the most common output. "
             "`python experiments/predictions.py RUN_DIR ...` shows them side by side.", ""]
    for setting, methods in outputs.items():
        lines += [f"### {setting_name(setting)}", "",
                  f"| Method | Task | {predictions.DIAGNOSTICS_HEADER} |", "|" + "---|" * 8]
        for method, per_task in methods.items():
            for task, d in per_task.items():
                lines.append(f"| {method_name(method)} | {COLUMNS.get(task, task)} | "
                             f"{predictions.diagnostics_cells(d, limit=48)} |")
        lines.append("")
    return lines
