"""The mixture-of-LoRA peers side by side (issue 34): training and generation throughput and peak memory
of each system on one random Llama, against LoRA-Mixer (soft) measured in the same run.

Every system gets E = 4 experts of rank 8 on q, k, v, o (MixLoRA: its experts in the feed-forward
blocks plus a rank-8 attention LoRA; HydraLoRA: one A, four Bs). The frozen-expert systems (MoLE,
Arrow, LoRAHub, X-LoRA) read the same four PEFT folders. Each system runs in a fresh process, so its
peak resident memory (``ru_maxrss``) is its own: model, optimizer state and the training step's
activations. Training: AdamW steps on batch x seq tokens (median of reps after one warm-up step);
generation: greedy, new tokens for a batch of prompts, with the KV cache where the system allows one
(X-LoRA refuses it). 1 thread.

    python bench/mixer_peers_speed.py                 # ~4 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from mixer_speed import TARGETS, base_model, model_and_batch_options  # the same random Llama

SYSTEMS = (
    "LoRA-Mixer (soft)",
    "single LoRA r=8",
    "HydraLoRA",
    "MixLoRA",
    "MoLE",
    "Arrow",
    "LoRAHub (merged)",
    "X-LoRA (peft)",
)
TRAINS = {"LoRA-Mixer (soft)", "single LoRA r=8", "HydraLoRA", "MixLoRA", "MoLE", "X-LoRA (peft)"}


def make_folders(args, folder: Path) -> list[Path]:
    import peft

    paths = []
    for e in range(args.experts):
        base = base_model(args)
        torch.manual_seed(100 + e)
        model = peft.get_peft_model(
            base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)
        )
        model.save_pretrained(folder / str(e))
        paths.append(folder / str(e))
    return paths


def build(name: str, args, folders: list[Path]):
    import peft

    import factorlab
    from factorlab.mixer.lorahub import lorahub_model, read_loras

    E = args.experts
    if name == "LoRA-Mixer (soft)":
        return factorlab.adapt(
            base_model(args), factorlab.LoraMixerConfig(num_experts=E, r=8, target_modules=TARGETS)
        )
    if name == "single LoRA r=8":
        return factorlab.adapt(
            base_model(args), factorlab.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)
        )
    if name == "HydraLoRA":
        return factorlab.adapt(
            base_model(args), factorlab.HydraLoraConfig(r=8, num_experts=E, target_modules=TARGETS)
        )
    if name == "MixLoRA":
        return factorlab.adapt(base_model(args), factorlab.MixLoraConfig(r=8, num_experts=E))
    if name == "MoLE":
        return factorlab.adapt(base_model(args), factorlab.LoraMixerConfig.mole(folders))
    if name == "Arrow":
        config = factorlab.LoraMixerConfig.from_peft_adapters(folders, routing="arrow", top_k=min(3, E))
        return factorlab.adapt(base_model(args), config)
    if name == "LoRAHub (merged)":
        return lorahub_model(base_model(args), read_loras(folders), [1.0 / E] * E).merge_and_unload()
    if name == "X-LoRA (peft)":
        model = base_model(args)
        model.config.use_cache = False  # X-LoRA refuses a model that would use a KV cache
        config = peft.XLoraConfig(
            task_type="CAUSAL_LM",
            hidden_size=args.hidden,
            adapters={str(e): str(p) for e, p in enumerate(folders)},
        )
        return peft.get_peft_model(model, config)
    raise ValueError(name)


def measure_one(name: str, args, folders: list[Path]) -> dict:
    torch.set_num_threads(1)
    model = build(name, args, folders)
    ids = torch.randint(1, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    out: dict = {"system": name}
    trainable = [p for p in model.parameters() if p.requires_grad]
    out["trainable"] = sum(p.numel() for p in trainable) if name in TRAINS else 0
    if name in TRAINS:
        model.train()
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        times = []
        for rep in range(args.reps + 1):
            began = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if rep:  # the first step warms up
                times.append(time.perf_counter() - began)
        out["train_tok_s"] = args.batch * args.seq / statistics.median(times)
    model.eval()
    prompt = ids[: args.gen_batch, : args.prompt]
    cache = name != "X-LoRA (peft)"
    times = []
    for _ in range(2):
        began = time.perf_counter()
        with torch.no_grad():
            model.generate(
                input_ids=prompt,
                max_new_tokens=args.new_tokens,
                do_sample=False,
                use_cache=cache,
                pad_token_id=0,
            )
        times.append(time.perf_counter() - began)
    out["generate_tok_s"] = args.gen_batch * args.new_tokens / min(times)
    out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    model_and_batch_options(parser)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--folders", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a child: one system, one line of JSON
        print(json.dumps(measure_one(args.one, args, [Path(p) for p in args.folders.split(",")])))
        return
    from factorlab.runtime import machine_info

    with tempfile.TemporaryDirectory() as tmp:
        folders = make_folders(args, Path(tmp))
        common = [a for a in sys.argv[1:]]
        rows = []
        for name in SYSTEMS:
            done = subprocess.run(
                [sys.executable, __file__, *common, "--one", name, "--folders", ",".join(map(str, folders))],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    info = machine_info()
    print(
        f"{info['cpu_capability']}, torch {info['torch']}, 1 thread; random Llama hidden {args.hidden}, "
        f"{args.layers} layers; {args.experts} experts of rank 8; train batch {args.batch} x {args.seq}; "
        f"generate {args.new_tokens} tokens for {args.gen_batch} prompts of {args.prompt}"
    )
    ref = rows[0]
    print(
        "| system | trainable | train tok/s | vs LoRA-Mixer | generate tok/s | vs LoRA-Mixer | peak MB | vs "
        "LoRA-Mixer |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        train = (
            f"{r['train_tok_s']:.0f} | {r['train_tok_s'] / ref['train_tok_s']:.2f}x"
            if "train_tok_s" in r
            else "– | –"
        )
        print(
            f"| {r['system']} | {r['trainable']:,} | {train} | {r['generate_tok_s']:.1f} | "
            f"{r['generate_tok_s'] / ref['generate_tok_s']:.2f}x | {r['peak_mb']:.0f} | "
            f"{r['peak_mb'] / ref['peak_mb']:.2f}x |"
        )


if __name__ == "__main__":
    main()
