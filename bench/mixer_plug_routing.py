"""Plug-and-play routing on real weights: does the router send held-out samples to their task's expert?

Stage 1 trains one LoRA expert per task (hard routing, the smollm2 preset's recipe) and exports each as a
PEFT LoRA folder; then routers are trained on the preset's small mixed set (<= 2k samples) over those
frozen folders twice: with the paper's routing losses only, and with factorlab's supervised routing term
(``route_label_coef``). Reported: the share of each task's held-out samples whose strongest expert is
their own task's (no generation: routing only). Writes results/mixer-smollm2-routing/{results.json,README.md}.

    python bench/mixer_plug_routing.py --seed 0          # SmolLM2-135M, reasoning-gym tasks
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from factorlab.core.adapted import adapt
from factorlab.methods.lora_mixer.model import export_expert_as_peft, set_stage
from factorlab.mixer.config import MixerExperimentConfig, build_base
from factorlab.mixer.evaluate import routing_report
from factorlab.mixer.tasks import make_tasks, train_and_eval_sets
from factorlab.mixer.train import train, train_router_on_peft

SETTINGS = ("tasks", "r", "lora_alpha", "lr", "steps", "router_lr", "router_steps",
            "router_examples_per_task", "eval_examples_per_task", "batch_size", "balance_coef",
            "specialization_coef", "top_k")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--route-label-coef", type=float, default=1.0, help="the supervised run's weight")
    parser.add_argument("--out", default="results/mixer-smollm2-routing")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = MixerExperimentConfig.preset_config("smollm2")
    tasks, pad_id = make_tasks(cfg)
    seed = args.seed
    data, evals = train_and_eval_sets(tasks, cfg.train_examples_per_task, cfg.eval_examples_per_task, seed)
    router_data = [d[: cfg.router_examples_per_task] for d in data]
    started = time.perf_counter()
    torch.manual_seed(seed)
    experts = adapt(build_base(cfg, tasks, seed), cfg.mixer_config())
    set_stage(experts, "experts")
    train(experts, data, cfg.steps, cfg.lr, cfg.batch_size, seed, hard=True, pad_id=pad_id)
    stage1 = time.perf_counter() - started
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        folders = [Path(tmp) / name for name in cfg.tasks]
        for e, folder in enumerate(folders):
            export_expert_as_peft(experts, e, folder)
        for label, coef in (
            ("paper losses", 0.0),
            (f"+ supervised term ({args.route_label_coef:g})", args.route_label_coef),
        ):
            torch.manual_seed(seed)
            began = time.perf_counter()
            mixer = train_router_on_peft(
                build_base(cfg, tasks, seed), folders, router_data, cfg.router_steps, cfg.router_lr,
                cfg.batch_size, seed, pad_id, names=list(cfg.tasks), routing="soft", top_k=cfg.top_k,
                balance_coef=cfg.balance_coef, specialization_coef=cfg.specialization_coef,
                route_label_coef=coef,
            )  # fmt: skip
            _, overall, per_task = routing_report(mixer, evals, pad_id)
            runs[label] = {"overall": overall, "per_task": dict(zip(cfg.tasks, per_task)),
                           "seconds": round(time.perf_counter() - began, 1)}  # fmt: skip
            print(label, json.dumps(runs[label]))
    summary = {
        "runs": runs,
        "seed": seed,
        "config": {k: getattr(cfg, k) for k in SETTINGS},
        "stage1_seconds": round(stage1, 1),
        "machine": {"cpu": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__, "threads": 1,
                    "python": platform.python_version()},
        "command": f"python bench/mixer_plug_routing.py --seed {seed} "
                   f"--route-label-coef {args.route_label_coef:g}",
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"seed{seed}.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [
        "# Plug-and-play routing on SmolLM2-135M (held-out samples routed to their task's expert)",
        "",
        f"`{summary['command']}` ({summary['machine']['cpu']}, torch {torch.__version__}, 1 thread; stage 1"
        f" {stage1:.0f} s). Routers trained on {cfg.router_examples_per_task * len(cfg.tasks)} mixed samples,"
        f" {cfg.router_steps} steps, lr {cfg.router_lr}; {cfg.eval_examples_per_task} held-out samples"
        " per task.",
        "",
        "| routing losses | " + " | ".join(cfg.tasks) + " | all |",
        "|---|" + "---|" * (len(cfg.tasks) + 1),
    ]
    for label, run in runs.items():
        lines.append(
            f"| {label} | "
            + " | ".join(f"{run['per_task'][t]:.3f}" for t in cfg.tasks)
            + f" | {run['overall']:.3f} |"
        )
    (out / f"seed{seed}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
