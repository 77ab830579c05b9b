"""OCR rank sweep: one run at a time against same-shape runs batched into one model.

Trains the same sweep (factorized d_h values + combined, x seeds) four ways in one process tree
and prints wall times and speed-ups against the one-at-a-time, single-process baseline:

    one-at-a-time, 1 process   each run its own model, one after another (the baseline)
    one-at-a-time, N workers   each run its own model, spread over N processes
    batched, 1 process         same-shape runs stacked into one model
    batched, N workers         what `factorlab ocr sweep` does

It also checks that the batched runs reproduce the single runs' final metrics.

    python bench/ocr_sweep_speed.py --steps 2000          # ~3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from factorlab.grid import run_grid
from factorlab.ocr.train import OCRConfig, train_runs
from factorlab.recipes.ocr import group_cells, sweep_configs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--d-h", default="3,4,8,16,32,64,128")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    d_hs = [int(x) for x in args.d_h.split(",")]
    configs = sweep_configs(OCRConfig(steps=args.steps), d_hs, True, [42 + i for i in range(args.seeds)])

    modes = [
        ("one-at-a-time, 1 process", dict(workers=1, batch=False)),
        (f"one-at-a-time, {args.workers} workers", dict(workers=args.workers, batch=False)),
        ("batched, 1 process", dict(workers=1, batch=True)),
        (f"batched, {args.workers} workers", dict(workers=args.workers, batch=True)),
    ]

    def train(workers: int, batch: bool) -> list[dict]:
        """In this process, or as parallel grid cells exactly as `factorlab ocr sweep` runs them."""
        if workers == 1:
            return [r.summary for r in train_runs(configs, batch=batch)]
        cells = group_cells(configs, batch)
        with tempfile.TemporaryDirectory() as out:
            grid = run_grid("factorlab.recipes.ocr:train_group_cell", cells, out, workers)
        by_config = {
            OCRConfig(**c): run["summary"]
            for cell, res in zip(cells, grid.results)
            for c, run in zip(cell["runs"], res["runs"])
        }
        return [by_config[c] for c in configs]

    timings, outcomes = {}, {}
    for name, kwargs in modes:
        started = time.perf_counter()
        summaries = train(**kwargs)
        timings[name] = time.perf_counter() - started
        outcomes[name] = [(s["test_impl_acc"], s["nuclear_norm"]) for s in summaries]
        print(f"{name:<28} {timings[name]:8.1f} s", flush=True)

    baseline = timings[modes[0][0]]
    reference = outcomes[modes[0][0]]
    print(
        f"\n{len(configs)} runs x {args.steps} steps ({len(d_hs)} d_h values + combined, {args.seeds} seeds)"
    )
    print(f"{'mode':<28} {'seconds':>8} {'speed-up':>9} {'max |Δ acc|':>12} {'max rel Δ nuc':>14}")
    for name, _ in modes:
        d_acc = max(abs(a[0] - b[0]) for a, b in zip(reference, outcomes[name]))
        d_nuc = max(abs(a[1] - b[1]) / abs(a[1]) for a, b in zip(reference, outcomes[name]))
        print(f"{name:<28} {timings[name]:8.1f} {baseline / timings[name]:8.2f}x {d_acc:12.4f} {d_nuc:14.2e}")
    print(json.dumps({"steps": args.steps, "runs": len(configs), "seconds": timings}))


if __name__ == "__main__":
    main()
