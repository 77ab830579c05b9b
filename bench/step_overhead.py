"""How much of a training step is fixed per-operation cost rather than arithmetic.

Trains a randomly initialised Llama shaped like SmolLM2-135M (30 layers, 9 query and 3 key/value heads,
tied embeddings) on one packed batch of 65 tokens, as a knowledge-injection cell does, twice: at
SmolLM2's width (hidden 576, vocabulary 49,152) and at a width where the GEMMs cost next to nothing
(hidden 72, vocabulary 512). The narrow model runs the same operators, autograd nodes and Python the
same number of times, so its step time is the step's fixed cost: dispatch, autograd and the Hugging Face
modules' Python. Printed: both medians and the fixed cost's share of the full-width step.

    python bench/step_overhead.py --method lora     # ~1 minute; --method full, compacter++
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
import transformers as tf

from factorlab.inject.train import prepare
from factorlab.training import pack, run_training


def step_seconds(hidden: int, vocab: int, method: str, steps: int) -> float:
    """Median seconds of ``steps`` steps of ``run_training`` (after three warm-up steps) at this width."""
    config = tf.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=hidden // 9,
        vocab_size=vocab,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = prepare(tf.LlamaForCausalLM(config).eval(), method, 4, 8)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    lengths = [8, 9, 8, 7, 8, 9, 8, 8]  # 65 tokens, as the injection texts
    ids = torch.randint(1, vocab, (len(lengths), max(lengths)))
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    inputs, labels = pack(ids, mask)
    stamps: list[float] = []  # the training loop itself, with whatever it wraps a step in
    run_training(
        model,
        optimizer,
        steps + 4,
        lambda _: (inputs, labels, {}),
        progress=lambda _: stamps.append(time.perf_counter()),
    )
    times = [b - a for a, b in itertools.pairwise(stamps)]
    return statistics.median(times[3:])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--method", default="lora", help="lora, compacter++ or full")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1, help="as a grid worker runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    full_width = step_seconds(576, 49152, args.method, args.steps)
    narrow = step_seconds(72, 512, args.method, args.steps)
    width = f"SmolLM2 width {full_width * 1e3:.1f} ms/step"
    print(f"{args.method}, 65 tokens, {args.threads} thread(s): {width}, "
          f"narrow (hidden 72, vocabulary 512) {narrow * 1e3:.1f} ms/step = fixed cost, "
          f"{narrow / full_width:.0%} of the full-width step")  # fmt: skip


if __name__ == "__main__":
    main()
