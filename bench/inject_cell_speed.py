"""One knowledge-injection cell's time, split into load, train and evaluate, against the FLOP floor.

Prints the training step's achieved GFLOP/s beside the machine's GEMM throughput (a large fp32
matmul timed in the same run, same threads) and the floor of the steps timed: the forward + backward
FLOPs of the tokens actually trained (non-padding tokens x parameters that do matmul work, i.e. the
embedding table counted once, as the tied output head):

    full fine-tuning   6 P t      (forward 2 P t, backward 4 P t: activation and weight gradients)
    adapters (frozen)  4 P t      (forward 2 P t, backward 2 P t: activation gradients only)

    python bench/inject_cell_speed.py --model smollm2 --method lora --steps 10    # ~1 minute
"""

from __future__ import annotations

import argparse
import time

import torch

from factorlab.inject.train import FineTuneSettings, fine_tune
from factorlab.inject.world import World
from factorlab.recipes.inject import InjectConfig, cached_backend, relation_by_name


def gemm_gflops(size: int = 1024, seconds: float = 1.0) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        runs += 1
    return 2 * size**3 * runs / (time.perf_counter() - started) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--relation", default="city-language")
    parser.add_argument("--steps", type=int, default=10, help="training steps timed")
    parser.add_argument("--threads", type=int, default=1, help="as a grid worker runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peak = gemm_gflops()
    cfg = InjectConfig(model=args.model, relation=args.relation, method=args.method)

    started = time.perf_counter()
    backend = cached_backend(cfg.model, None, 0)
    load = time.perf_counter() - started
    world = World.generate(relation_by_name(cfg.relation, cfg.known_relations()), 0, cfg.num_subjects)
    settings = FineTuneSettings(cfg.method, cfg.r, cfg.lora_alpha, seed=0)
    _, _, batch_size = settings.resolved(backend)

    started = time.perf_counter()
    model, _ = fine_tune(backend, world, settings, stop_after=args.steps)
    train = time.perf_counter() - started
    texts = world.training_texts()
    tokens = sum(
        int(backend.encode(texts[i : i + batch_size])["attention_mask"].sum())
        for i in range(0, args.steps * batch_size, batch_size)
    )  # about the tokens of the timed steps (the first epoch's order differs; lengths are alike)
    params = sum(p.numel() for p in backend.model.parameters())  # tied head counted once
    flops = (6 if cfg.method == "full" else 4) * params * tokens

    started = time.perf_counter()
    backend.ranks(model, world.queries())
    evaluate = time.perf_counter() - started

    achieved = flops / train / 1e9
    print(f"GEMM throughput (1024^3 fp32, {args.threads} thread(s)): {peak:.1f} GFLOP/s")
    print(f"{cfg.model} {cfg.method} {cfg.relation}: load {load:.1f} s, train {train:.1f} s "
          f"({args.steps} steps, {train / args.steps:.3f} s/step, {tokens / args.steps:.0f} tokens/step), "
          f"evaluate {evaluate:.1f} s")  # fmt: skip
    print(f"training: {flops / 1e9:.1f} GFLOP of floor work, {achieved:.1f} GFLOP/s = "
          f"{achieved / peak:.0%} of GEMM throughput (floor time {flops / (peak * 1e9):.1f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
