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
