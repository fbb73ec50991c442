"""Decoded test predictions of finished runs, side by side, with a few diagnostics.

    python experiments/predictions.py RUN_DIR [RUN_DIR ...] [--task ts] [--model own] [-n 5]
        [--client K]

Every run writes a few decoded test predictions per client (`eval.predictions`, default 4) to
`predictions.jsonl` next to its summary (`fedmoe_jax.experiment.write_predictions`). This module
reads them and prints Markdown: per run and task, how degenerate the outputs are (share of empty
predictions, of distinct ones, of RC and TS outputs that are a TC class name, the most common one),
then per example (client, test id) its references and every run's prediction. Runs of one setting
and seed partition the data the same way whatever the method, so an example lines up across methods:
the way to see *what* a near-zero score is (empty outputs, one label repeated, a copied input span,
...). `print_predictions` is what `experiments/predictions.py` runs.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from fedmoe_jax.files import PREDICTIONS_FILE, SUMMARY_FILE

MODELS = ("own", "global", "unseen")


class PredictionsError(ValueError):
    """A run directory without a readable `predictions.jsonl`."""


def load(run_dir: str) -> list[dict[str, Any]]:
    """The records of `run_dir/predictions.jsonl` (`client`, `task`, `model`, `id`, `prediction`,
    `references`)."""
    path = os.path.join(run_dir, PREDICTIONS_FILE)
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        raise PredictionsError(f"{path} does not exist: the run has not finished, or finished before runs "
                               "wrote predictions (rerun it in a new --workdir)") from None
    except (OSError, ValueError) as e:
        raise PredictionsError(f"{path} is unreadable ({e}); rerun the run in a new --workdir") from None


def run_label(run_dir: str) -> str:
    """The run's method and seed from its summary (`fedmoe s0`), else the directory's name."""
    try:
        with open(os.path.join(run_dir, SUMMARY_FILE)) as f:
            s = json.load(f)
        return f"{s['method']} s{s['seed']}"
    except (OSError, ValueError, KeyError, TypeError):
        return os.path.basename(os.path.normpath(run_dir))


def select(records: Sequence[Mapping[str, Any]], task: str | None = None, model: str = "own",
           client: int | None = None) -> list[Mapping[str, Any]]:
    """The records of one `model`, optionally of one `task` and one `client`."""
    return [r for r in records if r["model"] == model and (task is None or r["task"] == task)
            and (client is None or r["client"] == client)]


def diagnostics(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per task: `kept` predictions, `empty` and `distinct` (fractions of kept), `top` (the most
    common prediction) and `top_share`, `exact` (fraction equal to one of its references after
    stripping), for RC and TS `tc_label`: the label-collapse share, the fraction of predictions
    that are a TC class name (any reference of the TC records, case and spaces aside: a federated model
    answering every task with a topic label; None for TC itself), and for every task `off_task`: the
    share of outputs in another task's form (RC and TS: `tc_label`; TC: the fraction that is no TC
    class name, e.g. a word or a sentence). Both None without TC records."""
    labels = {x.strip().lower() for r in records if r["task"] == "tc" for x in r["references"]}
    out: dict[str, dict[str, Any]] = {}
    for task in sorted({r["task"] for r in records}):
        preds = [r["prediction"].strip() for r in records if r["task"] == task]
        exact = [r["prediction"].strip() in {x.strip() for x in r["references"]}
                 for r in records if r["task"] == task]
        top, count = Counter(preds).most_common(1)[0]
        is_label = sum(p.lower() in labels for p in preds) / len(preds) if labels else None
        out[task] = {"kept": len(preds), "empty": sum(p == "" for p in preds) / len(preds),
                     "distinct": len(set(preds)) / len(preds), "top": top, "top_share": count / len(preds),
                     "exact": sum(exact) / len(preds), "tc_label": None if task == "tc" else is_label,
                     "off_task": None if is_label is None else (1 - is_label if task == "tc" else is_label)}
    return out


def side_by_side(runs: Mapping[str, Sequence[Mapping[str, Any]]], n: int = 5
                 ) -> list[dict[str, Any]]:
    """Up to `n` examples per task in the first run's order: `client`, `task`, `id`, `references`
    and `predictions` {run label: text, or None where that run did not keep the example}."""
    index = {label: {(r["client"], r["id"]): r for r in recs} for label, recs in runs.items()}
    first = next(iter(runs.values()), [])
    per_task: Counter = Counter()
    out = []
    for r in first:
        if per_task[r["task"]] >= n:
            continue
        per_task[r["task"]] += 1
        key = (r["client"], r["id"])
        out.append({"client": r["client"], "task": r["task"], "id": r["id"], "references": r["references"],
                    "predictions": {label: (idx[key]["prediction"] if key in idx else None)
                                    for label, idx in index.items()}})
    return out


def quote(text: str | None, limit: int = 160) -> str:
    """`text` as one Markdown table-safe code span: newlines flattened, `|` escaped, cut to `limit` chars."""
    if text is None:
        return "(not kept)"
    text = text.replace("\n", " ").replace("|", "\\|")
    text = text if len(text) <= limit else text[:limit - 1] + "…"
    return f"`{text}`" if text.strip() else "(empty)"


DIAGNOSTICS_HEADER = "Kept | Empty | Distinct | Exact | Off task | Most common (share)"


def diagnostics_cells(d: Mapping[str, Any], limit: int = 60) -> str:
    """The `DIAGNOSTICS_HEADER` cells of one `diagnostics` entry (off task: "-" where undefined)."""
    share = "-" if d.get("off_task") is None else f"{d['off_task']:.0%}"
    return (f"{d['kept']} | {d['empty']:.0%} | {d['distinct']:.0%} | {d['exact']:.0%} | {share} | "
            f"{quote(d['top'], limit)} ({d['top_share']:.0%})")


def render(runs: Mapping[str, Sequence[Mapping[str, Any]]], n: int = 5) -> str:
    """Markdown: a diagnostics table, then the examples side by side."""
    lines = ["## Diagnostics", "",
             f"| Run | Task | {DIAGNOSTICS_HEADER} |", "|---|---|---|---|---|---|---|---|"]
    for label, recs in runs.items():
        for task, d in diagnostics(recs).items():
            lines.append(f"| {label} | {task} | {diagnostics_cells(d)} |")
    lines += ["", "## Examples", ""]
    for ex in side_by_side(runs, n):
        refs = " / ".join(quote(r) for r in ex["references"][:3])
        lines += [f"### {ex['task']} · client {ex['client']} · test example {ex['id']}", "",
                  f"- reference: {refs}"]
        lines += [f"- {label}: {quote(p)}" for label, p in ex["predictions"].items()]
        lines.append("")
    return "\n".join(lines) + "\n"


def print_predictions(run_dirs: Sequence[str], task: str | None = None, model: str = "own", n: int = 5,
                      client: int | None = None) -> int:
    """Print `render` of the runs' `model` predictions (optionally one `task` / `client`) on stdout; the exit
    status: 0, or 2 (one line on stderr) when `n` < 1, a run has no predictions or none match."""
    if n < 1:
        print("error: -n must be >= 1", file=sys.stderr)
        return 2
    runs: dict[str, list] = {}
    try:
        for run_dir in run_dirs:
            label = run_label(run_dir)
            label = label if label not in runs else f"{label} ({run_dir})"
            runs[label] = select(load(run_dir), task, model, client)
    except PredictionsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not any(runs.values()):
        print(f"error: no {model!r} predictions match (task {task}, client {client}); "
              "try --model=own or drop --task / --client", file=sys.stderr)
        return 2
    sys.stdout.write(render(runs, n))
    return 0


__all__ = ["MODELS", "PredictionsError", "diagnostics", "diagnostics_cells", "load", "print_predictions",
           "quote", "render", "run_label", "select", "side_by_side"]
