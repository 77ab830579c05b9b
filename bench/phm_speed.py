"""PHMLinear forward + backward: factorlab's structured product against materialise-then-matmul.

The baseline is the method of the original Compacter code and of AdapterHub: form
H = sum_i kron(A_i, B_i) every forward (B_i = s_i t_i^T), then y = x @ H, then y += b.
factorlab never forms H (see factorlab/layers/phm.py). Both run on the same weights and inputs
(checked equal), 4,096 tokens, one thread, median of several timed repetitions, rounds alternated.

    python bench/phm_speed.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from factorlab.layers import PHMLinear

SHAPES = [  # (in, out, n, label)
    (768, 24, 4, "T5-base down"),
    (24, 768, 4, "T5-base up"),
    (4096, 128, 4, "7B down"),
    (128, 4096, 4, "7B up"),
    (4096, 128, 8, "7B down"),
    (128, 4096, 8, "7B up"),
    (4096, 128, 16, "7B down"),
    (128, 4096, 16, "7B up"),
]


def materialised(layer: PHMLinear, x: torch.Tensor) -> torch.Tensor:
    a, b = layer.rule(), layer.fast.matrices()
    h = sum(torch.kron(a[i], b[i]) for i in range(layer.phm_dim)).T  # (in, out), as AdapterHub's H
    y = torch.matmul(x, h)
    y += layer.bias
    return y


def structured(layer: PHMLinear, x: torch.Tensor) -> torch.Tensor:
    return layer(x)


def time_step(fn, layer, x, grad, reps: int) -> float:
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(layer, x).backward(grad)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rank", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.tokens} tokens, rank {args.rank}, {args.threads} thread(s); fwd+bwd, median ms")
    print(f"{'shape':<22} {'n':>3} {'materialise':>12} {'factorlab':>10} {'speed-up':>9}")
    for d_in, d_out, n, label in SHAPES:
        torch.manual_seed(0)
        layer = PHMLinear(d_in, d_out, n, phm_rank=args.rank, rule_init_range=0.1)
        torch.nn.init.normal_(layer.bias)
        x = torch.randn(args.tokens, d_in, requires_grad=True)
        grad = torch.randn(args.tokens, d_out)
        torch.testing.assert_close(structured(layer, x), materialised(layer, x), atol=1e-4, rtol=1e-4)
        best = {"materialise": float("inf"), "factorlab": float("inf")}
        for round_ in range(args.rounds):
            order = [("materialise", materialised), ("factorlab", structured)]
            for name, fn in order if round_ % 2 == 0 else order[::-1]:
                fn(layer, x).backward(grad)  # warm-up
                best[name] = min(best[name], time_step(fn, layer, x, grad, args.reps))
        ratio = best["materialise"] / best["factorlab"]
        print(
            f"{label + f' {d_in}->{d_out}':<22} {n:>3} {1000 * best['materialise']:12.2f} "
            f"{1000 * best['factorlab']:10.2f} {ratio:8.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
