"""factorlab LoRA against peft LoRA: training-step time and peak memory on the same tiny Llama.

Each measurement runs in its own subprocess (so peak RSS is that framework's alone); rounds
alternate factorlab / peft to spread machine noise over both; the best round of each is kept.
Same model, same adapter (r, alpha, targets), same data, same AdamW.

    python bench/lora_vs_peft.py                 # ~1 minute on 2 cores
    python bench/lora_vs_peft.py --targets q_proj,v_proj --rounds 3
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def worker(framework: str, args: argparse.Namespace) -> dict:
    import torch
    import transformers as tf

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=args.vocab,
    )
    model = tf.LlamaForCausalLM(config)
    targets = "all-linear" if args.targets == "all-linear" else args.targets.split(",")
    if framework == "factorlab":
        import factorlab

        model = factorlab.adapt(
            model, factorlab.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=targets)
        )
    else:
        import peft

        model = peft.get_peft_model(
            model, peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=targets)
        )
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "framework": framework,
        "median_step_s": sorted(times)[len(times) // 2],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_growth_during_training_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before)
        / 1024,
        "trainable_params": trainable,
        "final_loss": loss.item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--targets", default="all-linear")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", choices=["factorlab", "peft"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return

    best: dict[str, dict] = {}
    for round_ in range(args.rounds):
        for framework in ("factorlab", "peft") if round_ % 2 == 0 else ("peft", "factorlab"):
            out = subprocess.run(
                [sys.executable, __file__, *sys.argv[1:], "--worker", framework],
                check=True,
                capture_output=True,
                text=True,
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"round {round_ + 1} {framework:<9} step {1000 * result['median_step_s']:7.1f} ms   "
                f"peak RSS {result['peak_rss_mib']:7.1f} MiB",
                flush=True,
            )
            keep = best.setdefault(framework, result)
            keep["median_step_s"] = min(keep["median_step_s"], result["median_step_s"])
            keep["peak_rss_mib"] = min(keep["peak_rss_mib"], result["peak_rss_mib"])
    f, p = best["factorlab"], best["peft"]
    assert f["trainable_params"] == p["trainable_params"], (f["trainable_params"], p["trainable_params"])
    print(
        f"\ntiny Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; "
        f"batch {args.batch} x seq {args.seq}; LoRA r={args.r} on {args.targets}; "
        f"{f['trainable_params']:,} trainable params"
    )
    print(f"{'':<10} {'step ms':>8} {'peak RSS MiB':>13}")
    for name, r in (("factorlab", f), ("peft", p)):
        print(f"{name:<10} {1000 * r['median_step_s']:8.1f} {r['peak_rss_mib']:13.1f}")
    print(
        f"ratio factorlab/peft: time {f['median_step_s'] / p['median_step_s']:.3f}, "
        f"peak memory {f['peak_rss_mib'] / p['peak_rss_mib']:.3f}"
    )


if __name__ == "__main__":
    main()
