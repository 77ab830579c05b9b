"""Plots of the LoRA-Mixer comparison: accuracy per task and system, and routing usage."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch


def accuracy_bars(rows: Sequence[dict[str, Any]], tasks: Sequence[str], path: str | Path) -> Path:
    fig, ax = plt.subplots(figsize=(max(7, 1.8 * len(tasks) + 3), 4.5))
    width = 0.8 / len(rows)
    x = np.arange(len(tasks))
    for i, row in enumerate(rows):
        means = [row[t].mean for t in tasks]
        stds = [row[t].std for t in tasks]
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=row["system"])
    ax.set_xticks(x, tasks)
    ax.set(ylabel="accuracy", ylim=(0, 1.05), title="accuracy per task")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def usage_heatmap(usage: torch.Tensor, tasks: Sequence[str], path: str | Path) -> Path:
    """usage[k, e]: mean routing weight of task k's samples on expert e."""
    fig, ax = plt.subplots(figsize=(1.2 * len(tasks) + 2.5, 1.0 * len(tasks) + 1.5))
    image = ax.imshow(usage.numpy(), vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(tasks)), [f"expert {t}" for t in tasks], rotation=30, ha="right")
    ax.set_yticks(range(len(tasks)), [f"task {t}" for t in tasks])
    for k in range(len(tasks)):
        for e in range(len(tasks)):
            value = float(usage[k, e])
            ax.text(e, k, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
    fig.colorbar(image, ax=ax, label="mean routing weight")
    ax.set_title("router usage per task")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
