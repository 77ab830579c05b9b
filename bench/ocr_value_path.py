"""The OCR model's value path: the dense bag times W_V (what `BatchedAttentionOnly` computes) against a
gather-and-sum over the sequence's tokens (issue 16's suggestion), forward and backward.

Per run (B sequences of T one-hot tokens, vocab d, inner width d_h), with scores a (B, T) and the
incoming gradient dh (B, d_h), both paths compute

    h = X^T a W_V                 (B, d_h)   dense: bag = scatter(a) (B, d), then bag @ W_V
    dW_V = bag^T dh               (d, d_h)   sparse: index_add of a_t dh_b into row x_t
    da_t = dh_b . W_V[x_t]        (B, T)     dense: (dh @ W_V^T) gathered at the tokens

The dense path does d / T = 8x the arithmetic of the sparse one at the sweep's sizes, but in three
well-shaped GEMMs; the sparse one gathers and scatters rows of d_h floats. Prints microseconds per
step for each d_h of the default sweep (R = 3 seeds batched, B = 252, T = 16, d = 128), the ratio,
and the largest difference between the two paths' results.

    python bench/ocr_value_path.py            # ~20 s, one thread as each sweep worker runs
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from factorlab.runtime import machine_info


def timed(fn, repeats: int) -> float:
    for _ in range(20):
        fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs, batch, seq, vocab = 3, 252, 16, 128
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (runs, batch, seq), generator=gen)
    scores = torch.randn(runs, batch, seq, generator=gen)
    flat = (tokens + torch.arange(runs).view(runs, 1, 1) * vocab).view(runs * batch, seq)
    print(f"machine: {machine_info()}")
    print(f"{'d_h':>4} {'dense us':>9} {'gather us':>10} {'gather/dense':>13} {'max |diff|':>11}")
    for d_h in (3, 4, 8, 16, 32, 64, 128):
        w_v = torch.randn(runs, vocab, d_h, generator=gen)
        grad_h = torch.randn(runs, batch, d_h, generator=gen)

        def dense(w_v=w_v, grad_h=grad_h):
            bag = torch.zeros(runs, batch, vocab).scatter_add_(2, tokens, scores)
            h = torch.bmm(bag, w_v)
            grad_w_v = torch.bmm(bag.transpose(1, 2), grad_h)
            grad_scores = torch.bmm(grad_h, w_v.transpose(1, 2)).gather(2, tokens)
            return h, grad_w_v, grad_scores

        def gather(w_v=w_v, grad_h=grad_h, d_h=d_h):
            rows = w_v.reshape(runs * vocab, d_h)
            weights = scores.view(runs * batch, seq)
            h = F.embedding_bag(flat, rows, per_sample_weights=weights, mode="sum").view(runs, batch, d_h)
            picked = rows[flat]  # (R B, T, d_h)
            grad_scores = (picked * grad_h.view(runs * batch, 1, d_h)).sum(-1).view(runs, batch, seq)
            contributions = (weights.unsqueeze(-1) * grad_h.view(runs * batch, 1, d_h)).view(-1, d_h)
            grad_w_v = torch.zeros(runs * vocab, d_h).index_add_(0, flat.view(-1), contributions)
            return h, grad_w_v.view(runs, vocab, d_h), grad_scores

        diff = max((a - b).abs().max().item() for a, b in zip(dense(), gather()))
        t_dense, t_gather = timed(dense, args.repeats), timed(gather, args.repeats)
        print(f"{d_h:>4} {t_dense:9.0f} {t_gather:10.0f} {t_gather / t_dense:12.2f}x {diff:11.1e}")


if __name__ == "__main__":
    main()
