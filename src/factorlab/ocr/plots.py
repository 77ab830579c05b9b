"""Plots of OCR runs, sweeps and the max-margin analysis (PNG, via matplotlib's Agg backend)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _series(history: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    steps = np.array([row["step"] for row in history], dtype=float)
    values = np.array([np.nan if row.get(key) is None else row[key] for row in history], dtype=float)
    return steps, values


def run_curves(history: Sequence[dict[str, Any]], path: str | Path, title: str, groups: int) -> Path:
    """Losses, accuracies and W_OV norms against step for one run."""
    fig, (ax_loss, ax_acc, ax_norm) = plt.subplots(1, 3, figsize=(15, 4.2))
    for key, label in (("train_loss", "train loss"), ("test_impl_loss", "test implication loss")):
        ax_loss.plot(*_series(history, key), label=label)
    ax_loss.axhline(math.log(groups), color="grey", ls=":", label=f"chance (log {groups})")
    ax_loss.set(xlabel="step", ylabel="cross-entropy", yscale="log", title="loss")
    for key, label in (
        ("train_fact_acc", "train facts"),
        ("train_impl_acc", "train implications"),
        ("test_fact_acc", "test facts"),
        ("test_impl_acc", "test implications (generalization)"),
        ("hallucination_rate", "hallucination rate"),
    ):
        steps, values = _series(history, key)
        if not np.all(np.isnan(values)):
            ax_acc.plot(steps, values, label=label, ls="--" if key == "hallucination_rate" else "-")
    ax_acc.axhline(1 / groups, color="grey", ls=":", label=f"chance (1/{groups})")
    ax_acc.set(
        xlabel="step", ylabel="accuracy (argmax over vocabulary)", ylim=(-0.02, 1.02), title="accuracy"
    )
    for key, label in (("nuclear_norm", "nuclear norm"), ("frobenius_norm", "Frobenius norm")):
        ax_norm.plot(*_series(history, key), label=label)
    ax_norm.set(xlabel="step", ylabel="norm of effective W_OV", title="W_OV norms")
    for ax in (ax_loss, ax_acc, ax_norm):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def sweep_curves(
    histories: dict[str, list[Sequence[dict[str, Any]]]], path: str | Path, groups: int, title: str
) -> Path:
    """Test-implication loss and accuracy against step: one line per configuration, mean over
    seeds with a min-max band."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(13, 4.5))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(histories)))
    for (label, runs), color in zip(histories.items(), colors):
        ls = "--" if label.startswith("combined") else "-"
        for ax, key in ((ax_loss, "test_impl_loss"), (ax_acc, "test_impl_acc")):
            steps = _series(runs[0], key)[0]
            values = np.stack([_series(h, key)[1] for h in runs])
            ax.plot(steps, values.mean(0), color=color, ls=ls, label=label)
            if len(runs) > 1:
                ax.fill_between(steps, values.min(0), values.max(0), color=color, alpha=0.15)
    ax_loss.axhline(math.log(groups), color="grey", ls=":", label=f"chance (log {groups})")
    ax_acc.axhline(1 / groups, color="grey", ls=":", label=f"chance (1/{groups})")
    ax_loss.set(xlabel="step", ylabel="test implication loss", yscale="log", title="test implication loss")
    ax_acc.set(xlabel="step", ylabel="test implication accuracy", ylim=(-0.02, 1.02), title="generalization")
    for ax in (ax_loss, ax_acc):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def accuracy_vs_dh(rows: Sequence[dict[str, Any]], path: str | Path, groups: int, title: str) -> Path:
    """Final test-implication accuracy (mean and std over seeds) against d_h; combined as a line."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    factorized = sorted((r for r in rows if r["param"] == "factorized"), key=lambda r: r["d_h"])
    if factorized:
        x = [r["d_h"] for r in factorized]
        y = [r["test_impl_acc"].mean for r in factorized]
        err = [r["test_impl_acc"].std for r in factorized]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label="factorized W_O W_V^T")
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
    for r in rows:
        if r["param"] == "combined":
            acc = r["test_impl_acc"]
            ax.axhline(acc.mean, color="C3", ls="--", label=f"combined W_OV ({acc.mean:.2f})")
    ax.axhline(1 / groups, color="grey", ls=":", label=f"chance (1/{groups})")
    ax.set(
        xlabel="d_h (inner dimension of W_O W_V^T)",
        ylabel="final test implication accuracy",
        ylim=(-0.02, 1.02),
        title=title,
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def theory_figure(result: dict[str, Any], path: str | Path) -> Path:
    """Cosine of each trained W_OV with each max-margin solution over training, at the end, and the
    singular values."""
    fig, (ax_traj, ax_cos, ax_sv) = plt.subplots(1, 3, figsize=(17, 4.5))
    for (name, trained), color in zip(result["trained"].items(), ("tab:blue", "tab:orange")):
        steps = [t["step"] for t in trained.get("trajectory", [])]
        for sol, style in (("nuclear", "-"), ("frobenius", "--")):
            ax_traj.plot(
                steps,
                [t[sol] for t in trained.get("trajectory", [])],
                style,
                color=color,
                label=f"{name} vs min-{sol}",
            )
    ax_traj.set(xlabel="training step", ylabel="cosine", title="direction of W_OV during training")
    ax_traj.legend(fontsize=8)
    ax_traj.grid(alpha=0.3)
    models = list(result["trained"])
    solutions = ["nuclear", "frobenius"]
    width = 0.38
    for j, sol in enumerate(solutions):
        values = [result["trained"][m]["cosine"][sol] for m in models]
        bars = ax_cos.bar(
            np.arange(len(models)) + (j - 0.5) * width, values, width, label=f"vs min-{sol} solution"
        )
        ax_cos.bar_label(bars, fmt="%.3f", fontsize=8)
    ax_cos.set_xticks(np.arange(len(models)), models)
    lo = min(result["trained"][m]["cosine"][s] for m in models for s in solutions)
    ax_cos.set(
        ylabel="cosine similarity of W_OV directions",
        ylim=(max(0.0, lo - 0.1), 1.01),
        title="which max-margin solution does training find?",
    )
    ax_cos.legend(fontsize=8)
    for name, sol in result["solutions"].items():
        s = np.array(sol["singular_values"])
        ax_sv.plot(np.arange(1, len(s) + 1), s / s[0], marker="o", label=f"min-{name} solution")
    for name, trained in result["trained"].items():
        s = np.array(trained["singular_values"])
        ax_sv.plot(np.arange(1, len(s) + 1), s / s[0], marker="x", ls="--", label=f"trained {name}")
    ax_sv.set(
        xlabel="index",
        ylabel="singular value / largest",
        title="spectra of the answer block (trained: centred)",
    )
    ax_sv.legend(fontsize=8)
    ax_sv.grid(alpha=0.3)
    return _save(fig, path)
