"""LoRA-Mixer speed: (A) a training step with E = 8 experts (r = 8, top-2) against a single LoRA of
r = 8; (B) forward and generation throughput against PEFT's X-LoRA with the same 8 adapters.

Same random Llama (hidden 512, 4 layers by default), same targets (q, k, v, o), 1 thread; rounds
alternate between the systems and the best median of each is kept. X-LoRA runs its scaling pass
plus the main pass and refuses a KV cache, so it generates with use_cache=False; factorlab's mixer
routes inside the projections in one pass and generates with the cache.

    python bench/mixer_speed.py            # ~3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def base_model(args):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=int(2.7 * args.hidden),
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=args.vocab,
        pad_token_id=0,
    )
    return tf.LlamaForCausalLM(config)


def median_time(fn, reps: int) -> float:
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def part_a(args) -> None:
    import factorlab

    ids = torch.randint(1, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    systems = {
        "single LoRA r=8": factorlab.adapt(
            base_model(args), factorlab.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)
        ),
        "LoRA-Mixer E=8 r=8 top-2": factorlab.adapt(
            base_model(args),
            factorlab.LoraMixerConfig(
                num_experts=8, r=8, lora_alpha=16, routing="topk", top_k=2, target_modules=TARGETS
            ),
        ),
    }
    steps = {}
    for name, model in systems.items():
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(model=model, optimizer=optimizer):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()
        steps[name] = step
    best = dict.fromkeys(systems, float("inf"))
    for round_ in range(args.rounds):
        for name in list(systems) if round_ % 2 == 0 else list(systems)[::-1]:
            best[name] = min(best[name], median_time(steps[name], args.reps))
    single, mixer = best.values()
    print(
        f"(A) training step, batch {args.batch} x seq {args.seq}, "
        f"median of {args.reps}, best of {args.rounds}"
    )
    for name, t in best.items():
        print(f"    {name:<26} {1000 * t:8.1f} ms")
    print(f"    overhead of the mixer: {mixer / single:.2f}x (target <= 1.3x)")


def part_b(args) -> None:
    import peft

    import factorlab

    folder = Path(tempfile.mkdtemp(prefix="factorlab-xlora-"))
    paths = []
    for e in range(8):
        torch.manual_seed(100 + e)
        pm = peft.get_peft_model(
            base_model(args),
            peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False),
        )
        pm.save_pretrained(folder / str(e))
        paths.append(folder / str(e))
    xlora_base = base_model(args)
    xlora_base.config.use_cache = False  # X-LoRA refuses to wrap a model that would use a KV cache
    xlora = peft.get_peft_model(
        xlora_base,
        peft.XLoraConfig(
            task_type="CAUSAL_LM",
            hidden_size=args.hidden,
            adapters={str(e): str(p) for e, p in enumerate(paths)},
        ),
    )
    xlora.eval()
    systems = {"X-LoRA (peft)": xlora}
    for routing in ("soft", "topk"):
        mixer = factorlab.adapt(
            base_model(args), factorlab.LoraMixerConfig.from_peft_adapters(paths, routing=routing, top_k=2)
        )
        systems[f"LoRA-Mixer ({routing})"] = mixer.eval()
    ids = torch.randint(1, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(2))
    prompt = ids[: args.gen_batch, : args.prompt]
    runs = {}
    for name, model in systems.items():
        cache = not name.startswith("X-LoRA")  # X-LoRA refuses use_cache=True

        def forward(model=model):
            with torch.no_grad():
                model(input_ids=ids)

        def generate(model=model, cache=cache):
            with torch.no_grad():
                model.generate(
                    input_ids=prompt,
                    max_new_tokens=args.new_tokens,
                    do_sample=False,
                    use_cache=cache,
                    pad_token_id=0,
                )

        forward()
        generate()
        runs[name] = (forward, generate)
    best = {name: [float("inf"), float("inf")] for name in systems}
    for round_ in range(args.rounds):
        for name in list(systems) if round_ % 2 == 0 else list(systems)[::-1]:
            for i, fn in enumerate(runs[name]):
                best[name][i] = min(best[name][i], median_time(fn, max(1, args.reps // 2)))
    fwd_tokens = args.batch * args.seq
    gen_tokens = args.gen_batch * args.new_tokens
    print(
        f"(B) throughput against X-LoRA, 8 adapters r=8 on {TARGETS}: "
        f"forward batch {args.batch} x seq {args.seq}; "
        f"generate {args.new_tokens} tokens for {args.gen_batch} prompts of {args.prompt}"
    )
    x_fwd, x_gen = best["X-LoRA (peft)"]
    for name, (f, g) in best.items():
        print(
            f"    {name:<20} forward {fwd_tokens / f:9.0f} tok/s ({x_fwd / f:4.2f}x)   "
            f"generate {gen_tokens / g:7.1f} tok/s ({x_gen / g:5.2f}x)"
        )


def model_and_batch_options(parser: argparse.ArgumentParser) -> None:
    """The random Llama's size and the training / generation batches (shared by mixer_peers_speed.py)."""
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--gen-batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=32)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    model_and_batch_options(parser)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--part", choices=["a", "b", "both"], default="both")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.part in ("a", "both"):
        part_a(args)
    if args.part in ("b", "both"):
        part_b(args)


if __name__ == "__main__":
    main()
