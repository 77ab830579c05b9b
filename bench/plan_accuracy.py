"""`factorlab plan` against measured peak memory on this CPU: random Llamas of three sizes, each method,
a few training steps of factorlab's loop in one process; peak = the process's maximum resident memory
minus its resident memory before the model is built. Prints plan / measured per case.

    python bench/plan_accuracy.py [--sizes small,medium,large] [--methods full,lora,compacter++,lora-mixer]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SIZES = {
    "small": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "vocab_size": 8000},
    "medium": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 8, "vocab_size": 16000},
    "large": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "vocab_size": 32000},
}
BATCH, SEQ, STEPS = 8, 128, 3

CHILD = r"""
import json, os, resource, sys
import torch
torch.set_num_threads(1)
import transformers as tf
from factorlab.plan import PlanConfig, adapt_for_plan
from factorlab.training import run_training

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

sizes, methods, batch, seq, steps = json.loads(sys.argv[1])
heads = sizes["hidden_size"] // 64
config = tf.LlamaConfig(num_attention_heads=heads, num_key_value_heads=heads, **sizes)
g = torch.Generator().manual_seed(0)
data = torch.randint(1, sizes["vocab_size"], (steps, batch, seq), generator=g)
batches = lambda s: ({"input_ids": data[s]}, data[s], {})
for method in methods:  # each in a fork of this process: its own peak, the imports paid once
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        before = rss()
        torch.manual_seed(0)
        plan = PlanConfig(model="x", method=method, device="cpu", precision="float32", gpus=1)
        model = adapt_for_plan(tf.LlamaForCausalLM(config), plan)
        run_training(model, lambda ps: torch.optim.Adam(ps, lr=1e-4), steps, batches)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        os.write(write, json.dumps({"method": method, "bytes": peak - before}).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        print(pipe.read(), flush=True)
    os.waitpid(pid, 0)
"""


def measure(sizes: dict, methods: list[str]) -> dict[str, int]:
    """Peak memory of a few training steps per method (bytes above the process's size before the model)."""
    # A fixed mmap threshold: glibc otherwise raises it as large buffers are freed and keeps later
    # activations in its heap, so the resident size would measure its fragmentation, not the training
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps([sizes, methods, BATCH, SEQ, STEPS])],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {row["method"]: row["bytes"] for row in rows}


def planned(sizes: dict, method: str) -> int:
    from factorlab.plan import PlanConfig, make_plan

    heads = sizes["hidden_size"] // 64
    with tempfile.TemporaryDirectory() as tmp:
        config = {"model_type": "llama", "num_attention_heads": heads, "num_key_value_heads": heads, **sizes}
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        cfg = PlanConfig(
            model=tmp, method=method, precision="float32", gpus=1, batch=BATCH, seq=SEQ, device="cpu"
        )
        return int(make_plan(cfg).per_gpu("ddp")["total"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="small,medium,large")
    parser.add_argument("--methods", default="full,lora,compacter++,lora-mixer")
    args = parser.parse_args()
    rows = []
    methods = args.methods.split(",")
    for size in args.sizes.split(","):
        peaks = measure(SIZES[size], methods)
        for method in methods:
            plan, peak = planned(SIZES[size], method), peaks[method]
            rows.append(
                {
                    "size": size,
                    "method": method,
                    "plan_mb": plan / 1e6,
                    "measured_mb": peak / 1e6,
                    "ratio": plan / peak,
                }
            )
            print(
                f"{size:6s} {method:11s} plan {plan / 1e6:8.1f} MB  measured {peak / 1e6:8.1f} MB  "
                f"plan/measured {plan / peak:.2f}",
                flush=True,
            )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
