"""How far LoRA-Mixer's experts move in stage 2, and what that does, by preservation coefficient beta.

Stage 1 (hard routing, every expert on its task) runs once per seed; stage 2 (routers and experts on
the small mixed set, penalty beta * sum ||theta - theta_0||^2) then runs once per beta from the same
stage-1 weights. Reported per beta: the experts' relative drift ||theta - theta_0|| / ||theta_0||, the
oracle accuracy (hard routing by task id: has an expert forgotten its task?) and the top-k accuracy
(the mixer as used), mean over tasks. Writes results/mixer-preservation/{results.json,README.md}.

    python bench/mixer_preservation.py --betas frozen,0,0.01,0.1,1 --seeds 0,1,2    # quick preset
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from factorlab.core.adapted import adapt
from factorlab.methods.lora_mixer.model import mixer_layers, set_routing, set_stage
from factorlab.mixer.config import MixerExperimentConfig, build_base
from factorlab.mixer.evaluate import accuracy
from factorlab.mixer.tasks import make_tasks, train_and_eval_sets
from factorlab.mixer.train import train


def relative_drift(adapted) -> float:
    if getattr(mixer_layers(adapted)[0].experts["default"], "A0", None) is None:
        return 0.0  # routers alone: the experts never moved
    moved = sum(float(layer.experts["default"].preservation()) for layer in mixer_layers(adapted))
    start = sum(
        float(layer.experts["default"].A0.square().sum() + layer.experts["default"].B0.square().sum())
        for layer in mixer_layers(adapted)
    )
    return (moved / start) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--betas", default="frozen,0,0.01,0.1,1", help="'frozen': routers alone")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="results/mixer-preservation")
    args = parser.parse_args()
    torch.set_num_threads(1)
    betas = [b if b == "frozen" else float(b) for b in args.betas.split(",")]
    cfg = MixerExperimentConfig()  # the quick preset
    tasks, pad_id = make_tasks(cfg)
    rows = []
    started = time.perf_counter()
    for seed in [int(s) for s in args.seeds.split(",")]:
        data, evals = train_and_eval_sets(
            tasks, cfg.train_examples_per_task, cfg.eval_examples_per_task, seed
        )
        router_data = [d[: cfg.router_examples_per_task] for d in data]
        torch.manual_seed(seed)
        stage1 = adapt(build_base(cfg, tasks, seed), cfg.mixer_config())
        set_stage(stage1, "experts")
        train(stage1, data, cfg.steps, cfg.lr, cfg.batch_size, seed, hard=True, pad_id=pad_id)
        for beta in betas:
            adapted = copy.deepcopy(stage1)
            penalty = 0.0 if beta == "frozen" else beta
            adapted.shared_adapter_weights["default"].coefs = (
                cfg.balance_coef,
                cfg.specialization_coef,
                penalty,
                0.0,
            )
            set_stage(adapted, "router" if beta == "frozen" else "all")  # theta_0 = the stage-1 weights
            train(
                adapted, router_data, cfg.router_steps, cfg.router_lr, cfg.batch_size, seed + 1, False, pad_id
            )
            oracle = statistics.mean(
                accuracy(adapted, tasks, evals[k], pad_id, True) for k in range(len(evals))
            )
            set_routing(adapted, "topk")
            topk = statistics.mean(accuracy(adapted, tasks, evals[k], pad_id) for k in range(len(evals)))
            rows.append(
                {"seed": seed, "beta": beta, "drift": relative_drift(adapted), "oracle": oracle, "topk": topk}
            )
            print(json.dumps(rows[-1]))
    summary = {
        "rows": rows,
        "config": {"preset": "quick", "betas": betas, "router_steps": cfg.router_steps,
                   "router_lr": cfg.router_lr},
        "machine": {"cpu": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__, "threads": 1,
                    "python": platform.python_version()},
        "seconds": round(time.perf_counter() - started, 1),
        "command": f"python bench/mixer_preservation.py --betas {args.betas} --seeds {args.seeds}",
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [
        "# LoRA-Mixer stage 2: expert drift by preservation coefficient",
        "",
        f"`{summary['command']}` ({summary['machine']['cpu']}, torch {torch.__version__}, 1 thread,"
        f" {summary['seconds']:.0f} s). Quick preset; mean (min-max) over seeds.",
        "",
        "| beta | relative drift of the experts | oracle accuracy (hard routing) | top-k accuracy |",
        "|---|---|---|---|",
    ]
    for beta in betas:
        sel = [r for r in rows if r["beta"] == beta]

        def cell(key: str, sel=sel) -> str:
            values = [r[key] for r in sel]
            return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"

        lines.append(f"| {beta} | {cell('drift')} | {cell('oracle')} | {cell('topk')} |")
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
