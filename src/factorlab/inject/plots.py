"""Plots of the knowledge-injection grid."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def ranks_by_relation(
    rows: Sequence[dict[str, Any]], relations: Sequence[str], causal: dict[str, bool], path: str | Path
) -> Path:
    """Test-implication mean rank per relation (groups) and method (bars), with the before-rank."""
    fig, ax = plt.subplots(figsize=(max(7, 1.9 * len(relations) + 2), 4.6))
    width = 0.8 / len(rows)
    x = np.arange(len(relations))
    for i, row in enumerate(rows):
        means = [row[r].mean if row.get(r) is not None else np.nan for r in relations]
        stds = [row[r].std if row.get(r) is not None else 0 for r in relations]
        style = {"color": "lightgrey", "edgecolor": "grey"} if row["method"] == "before fine-tuning" else {}
        ax.bar(
            x + (i - (len(rows) - 1) / 2) * width,
            means,
            width,
            yerr=stds,
            capsize=2,
            label=row["method"],
            **style,
        )
    ax.set_xticks(x, [f"{r}\n({'causal' if causal[r] else 'non-causal'})" for r in relations], fontsize=8)
    ax.set(
        ylabel="test-implication mean rank (0 = best)",
        title="low rank: generalization (causal) or hallucination (non-causal)",
    )
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def rank_sweep(
    records: Sequence[dict[str, Any]], relations: Sequence[str], causal: dict[str, bool], path: str | Path
) -> Path:
    """Test-implication rank against LoRA rank r, one line per relation; full fine-tuning dashed."""
    fig, ax = plt.subplots(figsize=(7, 4.6))
    colors = plt.cm.tab10(np.arange(len(relations)))
    for relation, color in zip(relations, colors):
        lora = [r for r in records if r["relation"] == relation and r["method"].startswith("lora r=")]
        ranks = sorted({r["r"] for r in lora})
        means = [np.mean([r["test_implication_rank"] for r in lora if r["r"] == k]) for k in ranks]
        ax.plot(
            ranks,
            means,
            marker="o",
            color=color,
            label=f"{relation} ({'causal' if causal[relation] else 'non-causal'})",
        )
        full = [
            r["test_implication_rank"] for r in records if r["relation"] == relation and r["method"] == "full"
        ]
        if full:
            ax.axhline(np.mean(full), color=color, ls="--", lw=1)
    ax.set_xscale("log", base=2)
    ax.set(
        xlabel="LoRA rank r",
        ylabel="test-implication mean rank",
        title="LoRA rank sweep (dashed: full fine-tuning)",
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def spectrum_scatter(points: Sequence[dict[str, Any]], measure: str, path: str | Path) -> Path:
    """Test-implication rank against the update's ``measure``, one point per cell, causal and
    non-causal relations side by side, coloured by method."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    methods = sorted({p["method"] for p in points})
    for ax, causal in zip(axes, (True, False)):
        for i, method in enumerate(methods):
            chosen = [p for p in points if p["causal"] == causal and p["method"] == method and p[measure]]
            ax.scatter(
                [p[measure] for p in chosen],
                [p["test_implication_rank"] for p in chosen],
                s=14,
                alpha=0.7,
                color=f"C{i}",
                label=method,
            )
        if any(p[measure] and p[measure] > 0 and p["causal"] == causal for p in points):
            ax.set_xscale("log")  # an empty panel (a grid of one relation kind) stays linear
        ax.set(
            xlabel=f"update: {measure} (log)",
            title=("causal: low rank = generalization" if causal else "non-causal: low rank = hallucination"),
        )
    axes[0].set_ylabel("test-implication mean rank after")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def curves(
    means: dict[tuple[str, str], list[dict[str, Any]]], relations: Sequence[str], path: str | Path
) -> Path:
    """Mean rank during training per relation (panels) and method (colours): training facts (dashed)
    and test implications (solid)."""
    fig, axes = plt.subplots(
        1, len(relations), figsize=(3.2 * len(relations) + 1, 3.6), sharey=True, squeeze=False
    )
    methods = sorted({m for m, _ in means})
    for ax, relation in zip(axes[0], relations):
        for i, method in enumerate(methods):
            points = means.get((method, relation))
            if not points:
                continue
            share = [p["share"] for p in points]
            ax.plot(share, [p["train_fact"] for p in points], "--", color=f"C{i}", linewidth=1)
            ax.plot(share, [p["test_implication"] for p in points], "-", color=f"C{i}", label=method)
        ax.set(title=relation, xlabel="share of training")
    axes[0][0].set_ylabel("mean rank (dashed: train facts, solid: test implications)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
