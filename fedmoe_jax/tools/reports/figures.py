"""The report's figures (matplotlib, Agg): expert activation heatmaps per task (`[L, E]` per task,
L MoE layers x E experts), convergence curves with time-to-target markers, expert counts per round."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedmoe_jax.algorithms.registry import method_labels
from fedmoe_jax.federated.metrics import METRICS_FILE
from fedmoe_jax.tools.reports.loading import Notes, Run
from fedmoe_jax.tools.reports.names import (
    COLUMNS,
    CURVES,
    METHOD,
    TARGET_FRACTIONS,
    TASKS,
    method_name,
    setting_name,
)
from fedmoe_jax.tools.reports.tables import curve, curve_key


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

    order = list(method_labels())
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
