"""A whole Compacter++ training step: factorlab against AdapterHub `adapters` 1.3.0.

Same T5-shaped model config, same data, same Compacter++ defaults (reduction 32, n = 4, rank 1,
shared rule, gelu), same AdamW; only adapter weights train. AdapterHub needs transformers 4.57,
so it runs in its own venv (`bench/setup_adapterhub_venv.sh` creates bench/.venv-adapterhub).
factorlab runs twice: in the project venv (transformers 5) and, from source, in AdapterHub's venv
(transformers 4.57), so one comparison holds the transformers version fixed. Each run is its own
subprocess; rounds alternate; the best median of each is kept.

    bench/setup_adapterhub_venv.sh          # once, ~2 minutes
    python bench/compacter_vs_adapterhub.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ADAPTERHUB_PYTHON = HERE / ".venv-adapterhub" / "bin" / "python"


def worker(framework: str, args: argparse.Namespace) -> dict:
    import torch
    import transformers as tf

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = tf.T5Config(
        d_model=args.hidden,
        d_ff=4 * args.hidden,
        num_layers=args.layers,
        num_heads=8,
        d_kv=args.hidden // 8,
        vocab_size=args.vocab,
        decoder_start_token_id=0,
    )
    model = tf.T5ForConditionalGeneration(config)
    if framework.startswith("factorlab"):
        import factorlab

        model = factorlab.adapt(model, factorlab.CompacterPlusPlusConfig(non_linearity="gelu"))
    else:
        import adapters

        adapters.init(model)
        model.add_adapter("c", config=adapters.CompacterPlusPlusConfig(non_linearity="gelu"))
        model.train_adapter("c")
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    src = torch.randint(1, args.vocab, (args.batch, args.src_len), generator=gen)
    tgt = torch.randint(1, args.vocab, (args.batch, args.tgt_len), generator=gen)
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = model(input_ids=src, labels=tgt).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return {
        "framework": framework,
        "median_step_s": statistics.median(times),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "transformers": tf.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--src-len", type=int, default=128)
    parser.add_argument("--tgt-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--worker", choices=["factorlab", "factorlab@4.57", "adapterhub"], help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    if not ADAPTERHUB_PYTHON.exists():
        sys.exit(f"{ADAPTERHUB_PYTHON} is missing: run bench/setup_adapterhub_venv.sh first.")
    runs = {  # name -> (python, extra environment)
        "factorlab": (sys.executable, {}),
        "factorlab@4.57": (str(ADAPTERHUB_PYTHON), {"PYTHONPATH": str(HERE.parent / "src")}),
        "adapterhub": (str(ADAPTERHUB_PYTHON), {}),
    }
    best: dict[str, dict] = {}
    for round_ in range(args.rounds):
        for name in list(runs) if round_ % 2 == 0 else list(runs)[::-1]:
            python, env = runs[name]
            out = subprocess.run(
                [python, __file__, *sys.argv[1:], "--worker", name],
                check=True,
                capture_output=True,
                text=True,
                env={**os.environ, **env},
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"round {round_ + 1} {name:<15} step {1000 * result['median_step_s']:8.1f} ms  "
                f"trainable {result['trainable_params']:,}  loss {result['first_loss']:.3f} -> "
                f"{result['last_loss']:.3f}  (transformers {result['transformers']})",
                flush=True,
            )
            keep = best.setdefault(name, result)
            keep["median_step_s"] = min(keep["median_step_s"], result["median_step_s"])
    print(
        f"\nT5 d_model {args.hidden}, {args.layers}+{args.layers} layers, vocab {args.vocab}; "
        f"batch {args.batch}, source {args.src_len}, target {args.tgt_len} tokens; Compacter++ defaults"
    )
    for name, r in best.items():
        print(
            f"{name:<15} transformers {r['transformers']:<7} trainable {r['trainable_params']:>7,}  "
            f"step {1000 * r['median_step_s']:7.1f} ms"
        )
    ah = best["adapterhub"]["median_step_s"]
    print(
        "speed-up over AdapterHub, same transformers 4.57: "
        f"{ah / best['factorlab@4.57']['median_step_s']:.2f}x; "
        f"factorlab on transformers 5: {ah / best['factorlab']['median_step_s']:.2f}x"
    )


if __name__ == "__main__":
    main()
