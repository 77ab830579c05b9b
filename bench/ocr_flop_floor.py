"""The OCR rank sweep against its FLOP floor on this machine.

For each shape group of the default sweep (factorized d_h in 3..128, combined; the seeds of a group
train as one batched model), times training steps (data included, evaluations excluded) and prints
the achieved GFLOP/s beside the machine's GEMM throughput measured in the same run (a large fp32
matmul on the same number of threads), then the full sweep's floor and predicted time:

    FLOPs of one step, per run (B = batch, d = vocab, d_h, n = input tokens, those a sequence can
    hold: 88 of d = 128 at the defaults; the GEMMs of forward + backward, as computed):
        factorized  6 B d_h (n + d)   (h = bag W_V, logits = h W_O^T, and their four backward GEMMs)
                    or 6 d n (d_h + B) through W_O W_V^T, whichever is less (d_h = 128)
        combined    6 B d n           (logits = bag W_OV^T, and its two backward GEMMs)
    floor = all steps' FLOPs / (GEMM throughput x workers)

    python bench/ocr_flop_floor.py                 # ~1 minute on 2 cores
    ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \
        python bench/ocr_flop_floor.py       # the AVX2 kernels of ATen, MKL and oneDNN
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from factorlab.ocr.task import OCRWorld
from factorlab.ocr.train import OCRConfig, train_batched
from factorlab.runtime import machine_info


def gemm_gflops(size: int = 1024, seconds: float = 1.0) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        runs += 1
    return 2 * size**3 * runs / (time.perf_counter() - started) / 1e9


def step_flops(cfg: OCRConfig, runs: int) -> float:
    b, d = cfg.batch_size, cfg.task.vocab_size
    n = len(OCRWorld(cfg.task, cfg.seed).input_tokens)
    d_h = cfg.hidden_dim
    per_run = 6 * min(b * d_h * (n + d), d * n * (d_h + b)) if cfg.param == "factorized" else 6 * b * d * n
    return per_run * runs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=600, help="timed steps per group")
    parser.add_argument("--sweep-steps", type=int, default=20000, help="steps of the sweep to predict")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as each sweep worker runs
    peak = gemm_gflops()
    groups = [OCRConfig(d_h=d) for d in (3, 4, 8, 16, 32, 64, 128)] + [OCRConfig(param="combined")]
    train_batched([OCRConfig(steps=50, eval_every=50)])  # warm-up
    rows = []
    for base in groups:
        cfgs = [OCRConfig(**{**base.__dict__, "seed": 42 + s, "steps": args.steps, "eval_every": args.steps})
                for s in range(args.seeds)]  # fmt: skip
        started = time.perf_counter()
        train_batched(cfgs)
        ms = (time.perf_counter() - started) / args.steps * 1e3
        flops = step_flops(base, args.seeds)
        rows.append({"group": base.label, "ms_per_step": ms, "gflops": flops / ms / 1e6, "flops": flops})
    print(f"GEMM throughput (1024^3 fp32, 1 thread): {peak:.1f} GFLOP/s")
    print(f"{'group':<18} {'ms/step':>8} {'GFLOP/s':>8} {'of GEMM':>8}")
    for r in rows:
        print(f"{r['group']:<18} {r['ms_per_step']:8.3f} {r['gflops']:8.1f} {r['gflops'] / peak:8.1%}")
    total_flops = sum(r["flops"] for r in rows) * args.sweep_steps
    floor = total_flops / (peak * 1e9 * args.workers)
    predicted = sum(r["ms_per_step"] for r in rows) * args.sweep_steps / 1e3 / args.workers
    print(
        f"\nsweep ({len(groups)} groups x {args.seeds} seeds x {args.sweep_steps} steps, "
        f"{args.workers} workers): "
        f"{total_flops / 1e12:.2f} TFLOP; floor {floor:.0f} s; predicted {predicted:.0f} s "
        f"(training only, perfect balance) = {predicted / floor:.1f}x the floor"
    )
    if args.json:
        info = machine_info()
        with open(args.json, "w") as f:
            json.dump({"gemm_gflops": peak, "groups": rows, "floor_s": floor, "predicted_s": predicted,
                       "machine": info, "args": vars(args)}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
