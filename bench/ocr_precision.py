"""How far float32 sweeps sit from the same sweep in float64: the float tolerance of the OCR sweep.

A 20,000-step run ends in a phase where the training facts are fit and the gradients are tiny, so
float32 rounding moves the final norms by percents. This script trains the sweep's runs in float64
(2 worker processes, one per half of the shape groups) and compares each float32 sweep folder given
(``factorlab ocr sweep --out DIR``, same settings) against it, run by run:

    python bench/ocr_precision.py runs/sweep [runs/sweep-old ...] --out results/ocr-sweep/precision

Writes ``precision.json`` (the float64 summaries and the comparisons) and ``precision.md``.
About 5 minutes on 2 cores at the default sweep.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
from pathlib import Path

import torch

from factorlab.ocr.train import OCRConfig, train_batched
from factorlab.recipes.ocr import group_cells
from factorlab.runtime import machine_info

NORMS = ("nuclear_norm", "frobenius_norm", "effective_rank")


def _train_float64(cells: list[dict]) -> list[dict]:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # every weight, optimiser state and activation
    out = []
    for cell in cells:
        for result in train_batched([OCRConfig(**c) for c in cell["runs"]]):
            out.append(result.summary)
    return out


def _key(summary: dict) -> tuple:
    c = summary["config"]
    return c["param"], c["d_h"], c["seed"], c["association"]


def _load(folder: Path) -> dict[tuple, dict]:
    return {_key(run): run for run in json.loads((folder / "results.json").read_text())}


def compare(reference: dict[tuple, dict], other: dict[tuple, dict]) -> dict:
    row = {}
    for k in NORMS:
        rel = [abs(other[r][k] - reference[r][k]) / abs(reference[r][k]) for r in reference]
        row[k] = {"mean_rel": statistics.mean(rel), "max_rel": max(rel)}
    acc = [abs(other[r]["test_impl_acc"] - reference[r]["test_impl_acc"]) for r in reference]
    row["test_impl_acc"] = {
        "runs_differing": sum(a > 1e-6 for a in acc),
        "runs": len(acc),
        "max_abs": max(acc),
    }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweeps", nargs="+", type=Path, help="float32 sweep folders to compare")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    first = _load(args.sweeps[0])
    configs = [OCRConfig(**{k: v for k, v in s["config"].items() if k in OCRConfig.__dataclass_fields__})
               for s in first.values()]  # fmt: skip
    cells = group_cells(configs)
    halves = [cells[0::2], cells[1::2]]  # the costliest first, alternating: about equal work
    with mp.get_context("spawn").Pool(2) as pool:
        summaries = [s for half in pool.map(_train_float64, halves) for s in half]
    reference = {_key(s): s for s in summaries}
    comparisons = {str(folder): compare(reference, _load(folder)) for folder in args.sweeps}
    lines = [
        "# float32 sweeps against the same sweep in float64",
        "",
        "`python bench/ocr_precision.py " + " ".join(map(str, args.sweeps)) + f" --out {args.out}`",
        "",
        "| float32 sweep | nuclear norm: mean / max rel. diff | Frobenius | effective rank | "
        "test-impl acc: runs differing (max) |",
        "|---|---|---|---|---|",
    ]
    for folder, row in comparisons.items():
        cols = [f"{row[k]['mean_rel']:.2%} / {row[k]['max_rel']:.2%}" for k in NORMS]
        acc = row["test_impl_acc"]
        lines.append(
            f"| {folder} | "
            + " | ".join(cols)
            + f" | {acc['runs_differing']} of {acc['runs']} ({acc['max_abs']:.2f}) |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "precision.md").write_text("\n".join(lines) + "\n")
    record = {
        "float64": summaries,
        "comparisons": comparisons,
        "machine": machine_info(),
        "args": str(vars(args)),
    }
    (args.out / "precision.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
