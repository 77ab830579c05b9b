"""LoRA-Mixer hard routing (stage 1: every sample goes to its task's expert): the per-sample kernel
(``lora_per_row``, shared with packed grid cells) against the dense mixture with one-hot weights
(every expert computed for every token, then masked), in one run, 1 thread.

Same random Llama (hidden 512, 4 layers), experts on q, k, v, o; a training step (forward + backward)
on a batch of mixed tasks. Rounds alternate between the two paths; the median of each is kept, and the
outputs are checked equal first.

    python bench/mixer_hard_routing.py                     # ~1 minute
    python bench/mixer_hard_routing.py --experts 4 --r 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from factorlab import LoraMixerConfig, adapt
from factorlab.layers.mixer import ExpertBank
from factorlab.runtime import machine_info


def dense_per_sample(bank: ExpertBank, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """The path hard routing took before: every expert for every token, one-hot weights."""
    batch, tokens, _ = x.shape
    weights = torch.nn.functional.one_hot(experts, bank.num_experts).float().repeat_interleave(tokens, 0)
    return bank(x.reshape(batch * tokens, -1), weights).view(batch, tokens, -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=int(2.7 * args.hidden),
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=1000,
    )
    mixer = LoraMixerConfig(
        num_experts=args.experts, r=args.r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    mixer.init_lora_weights = False  # B random too, so the experts differ from the start
    model = adapt(tf.LlamaForCausalLM(config), mixer)
    ids = torch.randint(0, 1000, (args.batch, args.tokens))
    task_ids = torch.arange(args.batch) % args.experts
    kernel = ExpertBank.per_sample

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids, task_ids=task_ids)
        out.loss.backward()
        return out.logits.detach()

    ExpertBank.per_sample = dense_per_sample
    dense_logits = step()
    ExpertBank.per_sample = kernel
    torch.testing.assert_close(step(), dense_logits, atol=1e-4, rtol=1e-4)
    times = {"per-sample": [], "dense one-hot": []}
    for _ in range(args.rounds):
        for name, path in (("per-sample", kernel), ("dense one-hot", dense_per_sample)):
            ExpertBank.per_sample = path
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    ExpertBank.per_sample = kernel
    info = machine_info()
    print(
        f"{info['cpu_capability']}, torch {info['torch']}, 1 thread; E={args.experts}, r={args.r}, "
        f"batch {args.batch} x {args.tokens} tokens, hidden {args.hidden}"
    )
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, seconds in medians.items():
        print(f"  {name:14s} {1000 * seconds:8.1f} ms per training step")
    print(f"  speed-up: {medians['dense one-hot'] / medians['per-sample']:.2f}x")


if __name__ == "__main__":
    main()
