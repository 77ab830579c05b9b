"""Packed grid cells against cells one at a time, in one run on one machine (issue 32).

Two measurements, both of LoRA (or, ``--method compacter++``, Compacter++) injection cells on one
backend:

1. **Cells per hour** of a real ``inject grid`` (the grid's own process pool, ``--workers`` processes
   of one thread each): the same N cells with ``--pack 1`` (every cell alone: today's grid) and with
   ``--pack N`` (split into one pack per worker), each from an empty output folder. Their table must
   agree within the packed-vs-alone spread (tests/test_pack.py); the largest difference of a cell's
   test-implication rank is printed.
2. **The training step**, in this process (1 thread): seconds per cell-step alone (``fine_tune``) and
   packed (``fine_tune_packed`` with K cells), the step's FLOPs (torch's FLOP counter over one step)
   and the achieved GFLOP/s against the machine's GEMM rate (a large matmul and the model's own
   matmuls at the packed rows, timed in the same run). ``floor`` is the step's FLOPs at that rate:
   packing cannot beat it, so ``alone / floor`` bounds the speed-up packing can give here.

    python bench/grid_pack_speed.py --model tiny --cells 16 --epochs 4 --workers 2       # ~3 minutes
    python bench/grid_pack_speed.py --model smollm2 --cells 4 --epochs 1 --workers 2     # ~12 minutes
    python bench/grid_pack_speed.py --model tiny --cells 16 --epochs 40 --workers 2 --method compacter++
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
import factorlab.inject.pack as pack_module
from factorlab.inject.pack import Member, Pack, _step_loss, fine_tune_packed
from factorlab.inject.train import FineTuneSettings, batches, fine_tune
from factorlab.inject.world import BUILTIN_RELATIONS, World
from factorlab.recipes.inject import cached_backend, grid, grid_cells
from factorlab.runtime import machine_info
from factorlab.training import packs_sequences
from inject_cell_speed import gemm_gflops, model_gemm_gflops

RELATIONS = list(BUILTIN_RELATIONS)


def grid_cells_for(model: str, count: int, epochs: int, method: str) -> list[dict]:
    """``count`` cells of one backend: relations x seeds; LoRA ranks 4 and 8 alternating."""
    if method == "lora":
        seeds = list(range(-(-count // (2 * len(RELATIONS)))))
        cells = grid_cells(model, RELATIONS, ["lora"], seeds, 4, rank_sweep=[8], epochs=epochs)
    else:
        seeds = list(range(-(-count // len(RELATIONS))))
        cells = grid_cells(model, RELATIONS, [method], seeds, 4, epochs=epochs)
    return cells[:count]


def timed_grid(cells: list[dict], pack: int, workers: int) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        grid(cells, out, workers, pack=pack)
        seconds = time.perf_counter() - started
        ranks = {}
        for folder in Path(out, "cells").iterdir():
            summary = json.loads((folder / "summary.json").read_text())
            ranks[folder.name] = summary["test_implication_rank"]
    return seconds, ranks


def step_flops(backend, members: list[Member]) -> float:
    """FLOPs of one packed training step (forward and backward) of ``members``."""
    pack = Pack(backend, members)
    device = next(backend.model.parameters()).device
    packed = packs_sequences(backend.model, backend.model.get_input_embeddings().num_embeddings)
    step = [batches(backend, m.world, m.settings, packed, device)[0](0) for m in members]
    pack.train()
    with FlopCounterMode(display=False) as counter:
        loss, _ = _step_loss(pack, step, list(range(len(members))))
        loss.backward()
    return float(counter.get_total_flops())


def step_seconds(backend, members: list[Member], steps: int) -> tuple[float, float]:
    """(seconds per cell-step alone, packed): ``steps`` steps of each."""
    started = time.perf_counter()
    fine_tune(backend, members[0].world, members[0].settings, stop_after=steps)
    alone = (time.perf_counter() - started) / steps
    real = pack_module.batches
    pack_module.batches = lambda *a, **k: (real(*a, **k)[0], steps)  # the same number of steps
    try:
        started = time.perf_counter()
        fine_tune_packed(backend, members)
        packed = (time.perf_counter() - started) / steps / len(members)
    finally:
        pack_module.batches = real
    return alone, packed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--cells", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--method", default="lora", choices=["lora", "compacter++"])
    parser.add_argument("--steps", type=int, default=30, help="steps timed in part 2")
    parser.add_argument("--skip-grid", action="store_true", help="part 2 only")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result: dict = {"command": " ".join(sys.argv), "machine": machine_info()}

    cells = grid_cells_for(args.model, args.cells, args.epochs, args.method)
    if not args.skip_grid:
        alone_s, alone_ranks = timed_grid(cells, 1, args.workers)
        packed_s, packed_ranks = timed_grid(cells, args.cells, args.workers)
        diff = max(abs(alone_ranks[k] - packed_ranks[k]) for k in alone_ranks)
        result["grid"] = {
            "cells": len(cells),
            "method": args.method,
            "workers": args.workers,
            "epochs": args.epochs,
            "alone_seconds": alone_s,
            "packed_seconds": packed_s,
            "alone_cells_per_hour": 3600 * len(cells) / alone_s,
            "packed_cells_per_hour": 3600 * len(cells) / packed_s,
            "speedup": alone_s / packed_s,
            "largest_test_implication_rank_difference": diff,
        }
        print(
            f"grid of {len(cells)} {args.method} cells on {args.workers} workers: alone {alone_s:.1f} s "
            f"({3600 * len(cells) / alone_s:.0f} cells/h), packed {packed_s:.1f} s "
            f"({3600 * len(cells) / packed_s:.0f} cells/h): {alone_s / packed_s:.2f}x; "
            f"largest test-implication rank difference {diff:.4f}"
        )

    backend = cached_backend(args.model, None, 0)
    per_worker = -(-len(cells) // args.workers)
    members = [
        Member(
            World.generate(BUILTIN_RELATIONS[c["relation"]], c["seed"], 100, 0.2),
            FineTuneSettings(args.method, c["r"], 8.0, None, args.epochs, None, seed=c["seed"]),
        )
        for c in cells[:per_worker]
    ]
    flops_alone = step_flops(backend, members[:1])
    flops_packed = step_flops(backend, members) / len(members)
    alone, packed = step_seconds(backend, members, args.steps)
    _, _, batch = members[0].settings.resolved(backend)
    rows = sum(len(t) for t in backend.encode(members[0].world.training_texts()[:batch])["input_ids"])
    big = max(gemm_gflops())
    own = model_gemm_gflops(backend.model, rows * len(members), frozen=True)
    rate = max(big, own)
    result["step"] = {
        "cells_packed": len(members),
        "alone_seconds_per_cell_step": alone,
        "packed_seconds_per_cell_step": packed,
        "speedup": alone / packed,
        "flops_per_cell_step": flops_alone,
        "flops_per_cell_step_packed": flops_packed,
        "gemm_gflops_large": big,
        "gemm_gflops_model_shapes": own,
        "alone_share_of_gemm": flops_alone / alone / 1e9 / rate,
        "packed_share_of_gemm": flops_packed / packed / 1e9 / rate,
        "floor_seconds_per_cell_step": flops_packed / 1e9 / rate,
        "largest_possible_speedup": alone / (flops_packed / 1e9 / rate),
    }
    s = result["step"]
    print(
        f"training step, {len(members)} cells packed, 1 thread: alone {alone * 1e3:.1f} ms/cell-step "
        f"({s['alone_share_of_gemm']:.0%} of GEMM), packed {packed * 1e3:.1f} ms "
        f"({s['packed_share_of_gemm']:.0%}): {alone / packed:.2f}x"
    )
    print(
        f"GEMM {big:.0f} GFLOP/s (large), {own:.0f} (model shapes at {rows * len(members)} rows); "
        f"floor {s['floor_seconds_per_cell_step'] * 1e3:.1f} ms/cell-step: packing gives at most "
        f"{s['largest_possible_speedup']:.2f}x here"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
