"""LoRA-Mixer recipes: the two workflows and the multi-task comparison, as CLI-driven runs with
reports. The components (tasks, config and presets, training, evaluation, plots) live in
``factorlab.mixer``.

Workflows (each one Python call and one CLI command):

* joint (``train_joint`` / ``factorlab mixer train``): stage 1 trains expert e on task e with hard
  routing (every sample of a mixed batch goes to its task's expert, so all experts train at once);
  stage 2 trains the routers on a small mixed set with soft routing and the routing loss.
* plug-and-play (``train_router_on_peft`` / ``factorlab mixer plug``): experts are existing PEFT
  LoRA folders, frozen; only the routers train.

The comparison (``run_experiment`` / ``factorlab mixer run``) trains, per seed and with equal
steps: one LoRA on the mixed data, the per-task experts (evaluated with their own task's id: the
per-task LoRA oracle, since a hard-routed expert sees only its task's data over a frozen base),
the uniform average of the experts, and LoRA-Mixer; plus the base model. It reports accuracy per
task and system (mean ± std over seeds), router usage per task and router accuracy.

Presets: ``quick`` — a tiny Llama (random, frozen) on four synthetic tasks with their own symbols
(answer = first / last / max / min of six symbols), about a minute per seed on 2 CPU cores;
``smollm2`` — SmolLM2-135M-Instruct from its PyPI package on four reasoning-gym tasks with short
exact answers (arithmetic, letter counting, syllogism, base conversion; chat-template prompts; needs
``pip install reasoning-gym``), graded by each task's own scorer; hours on CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from factorlab.core.adapted import AdaptedModel, adapt
from factorlab.errors import ConfigError, GridCellsFailed
from factorlab.grid import cell_id, run_grid
from factorlab.methods.lora.config import LoraConfig
from factorlab.methods.lora_mixer.model import (
    export_expert_as_peft,
    set_routing,
)
from factorlab.mixer.config import MixerExperimentConfig, build_base
from factorlab.mixer.evaluate import accuracy, predict, routing_report  # noqa: F401
from factorlab.mixer.tasks import Example, GymTasks, SyntheticTasks, make_tasks, train_and_eval_sets  # noqa: F401
from factorlab.mixer.train import collate, train, train_joint, train_router_on_peft  # noqa: F401
from factorlab.models import resolve_model_path
from factorlab.progress import StepBars, console
from factorlab.reporting import Column, aggregate, write_table
from factorlab.runtime import atomic_write_text, write_json

# ---- the comparison -------------------------------------------------------------------------------------

SYSTEMS = (
    "base",
    "single LoRA (mixed data)",
    "per-task LoRA (oracle)",
    "uniform average of experts",
    "LoRA-Mixer (soft)",
    "LoRA-Mixer (top-k)",
)


def seed_cell(cell: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Grid cell: every system of the comparison for one seed (see factorlab.grid)."""
    cfg = MixerExperimentConfig(**cell["config"])
    seed = cell["seed"]
    tasks, pad_id = make_tasks(cfg)
    records: list[dict[str, Any]] = []
    data, evals = train_and_eval_sets(tasks, cfg.train_examples_per_task, cfg.eval_examples_per_task, seed)
    router_data = [d[: cfg.router_examples_per_task] for d in data]
    base = build_base(cfg, tasks, seed)

    def score(model, system, hard=False):
        for k, name in enumerate(cfg.tasks):
            acc = accuracy(model, tasks, evals[k], pad_id, hard, cfg.max_new_tokens)
            records.append({"seed": seed, "system": system, "task": name, "accuracy": acc})

    with StepBars(f"LoRA-Mixer, seed {seed}") as bars:
        bars.start(
            ["single LoRA", "experts (hard routing)", "router"], [cfg.steps, cfg.steps, cfg.router_steps]
        )
        score(base, "base")
        targets = _single_targets(cfg, base)
        single = adapt(
            copy.deepcopy(base), LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, target_modules=targets)
        )
        train(
            single, data, cfg.steps, cfg.lr, cfg.batch_size, seed, False, pad_id, lambda s: bars.update(0, s)
        )
        score(single, "single LoRA (mixed data)")

        def score_experts(mixer):
            score(mixer, "per-task LoRA (oracle)", hard=True)
            set_routing(mixer, "uniform")
            score(mixer, "uniform average of experts")
            set_routing(mixer, "soft")

        mixer = train_joint(
            copy.deepcopy(base),
            data,
            cfg.mixer_config(),
            cfg.steps,
            cfg.lr,
            cfg.router_steps,
            cfg.router_lr,
            router_data,
            cfg.batch_size,
            seed,
            pad_id,
            progress=lambda stage, s: bars.update(1 if stage == "experts" else 2, s),
            after_experts=score_experts,
        )
    score(mixer, "LoRA-Mixer (soft)")
    usage, router_acc, _ = routing_report(mixer, evals, pad_id)
    set_routing(mixer, "topk")
    score(mixer, "LoRA-Mixer (top-k)")
    set_routing(mixer, "soft")
    if cell.get("export"):
        _export(folder, base, mixer, cfg)
    return {"records": records, "usage": usage.tolist(), "router_accuracy": router_acc}


def run_experiment(
    cfg: MixerExperimentConfig,
    out: str | Path,
    export: bool = True,
    workers: int | None = 1,
    backend: str = "local",
    address: str | None = None,
) -> dict[str, Any]:
    """The comparison over ``cfg.seeds``: one grid cell per seed (parallel, resumable, Ray-capable).

    The first seed's base, mixer and experts (as PEFT folders) are exported to ``out``.
    """
    out = Path(out)
    started = time.perf_counter()
    cells = [
        {
            "config": dataclasses.asdict(dataclasses.replace(cfg, seeds=[seed])),
            "seed": seed,
            "export": export and i == 0,
        }
        for i, seed in enumerate(cfg.seeds)
    ]
    grid = run_grid(
        "factorlab.recipes.mixer:seed_cell", cells, out, workers, backend=backend, address=address
    )
    if grid.failed:
        raise GridCellsFailed("seed(s)", grid.failed)
    if export:  # copy the first seed's artefacts next to the report
        first = out / "cells" / cell_id(cells[0])
        for name in ("base", "mixer", "experts"):
            if (first / name).exists():
                shutil.copytree(first / name, out / name, dirs_exist_ok=True)
    records = [r for res in grid.results for r in res["records"]]
    usage_by_seed = [torch.tensor(res["usage"]) for res in grid.results]
    router_acc_by_seed = [res["router_accuracy"] for res in grid.results]
    seconds = time.perf_counter() - started
    return _write_results(out, cfg, records, usage_by_seed, router_acc_by_seed, seconds, grid.line())


def _single_targets(cfg: MixerExperimentConfig, base: nn.Module):
    """The single LoRA adapts exactly the projections the mixer adapts."""
    from factorlab.core.targeting import model_family, resolve_targets
    from factorlab.methods.lora_mixer.model import default_mixer_roles

    if cfg.target_modules is not None:
        return cfg.target_modules
    return resolve_targets(base, None, default_roles=default_mixer_roles(model_family(base)))


def _export(out: Path, base: nn.Module, mixer: AdaptedModel, cfg: MixerExperimentConfig) -> None:
    """The base (tiny preset), the trained mixer, and each expert as a standalone PEFT LoRA folder."""
    if cfg.model == "tiny":
        base.save_pretrained(out / "base")
        write_json(out / "base" / "factorlab_tasks.json", {"tasks": cfg.tasks})
    mixer.save_pretrained(out / "mixer")
    for e, name in enumerate(cfg.tasks):
        export_expert_as_peft(mixer, e, out / "experts" / name)


def _write_results(
    out: Path, cfg, records, usage_by_seed, router_acc_by_seed, seconds, grid_line: str = ""
) -> dict[str, Any]:
    from factorlab.mixer import plots as mixer_plots

    write_json(
        out / "results.json",
        {
            "config": dataclasses.asdict(cfg),
            "records": records,
            "router_accuracy": router_acc_by_seed,
            "usage": [u.tolist() for u in usage_by_seed],
            "seconds": seconds,
        },
    )
    by_task = aggregate(records, ["system", "task"], ["accuracy"])
    rows = []
    for system in SYSTEMS:
        row: dict[str, Any] = {"system": system}
        for r in by_task:
            if r["system"] == system:
                row[r["task"]] = r["accuracy"]
        per_seed = {}
        for rec in records:
            if rec["system"] == system:
                per_seed.setdefault(rec["seed"], []).append(rec["accuracy"])
        row["mean"] = aggregate([{"m": sum(v) / len(v)} for v in per_seed.values()], [], ["m"])[0]["m"]
        rows.append(row)
    columns = [
        Column("system", "system"),
        *(Column(t, t, "{:.3f}") for t in cfg.tasks),
        Column("mean", "mean", "{:.3f}"),
    ]
    table = write_table(rows, columns, out / "table")
    usage = torch.stack(usage_by_seed).mean(0)
    mixer_plots.accuracy_bars(rows, cfg.tasks, out / "accuracy.png")
    mixer_plots.usage_heatmap(usage, cfg.tasks, out / "routing.png")
    router_acc = sum(router_acc_by_seed) / len(router_acc_by_seed)
    usage_rows = [
        {"task": t, **{f"→ {e}": float(usage[k, j]) for j, e in enumerate(cfg.tasks)}}
        for k, t in enumerate(cfg.tasks)
    ]
    usage_table = write_table(
        usage_rows,
        [Column("task", "task"), *(Column(f"→ {e}", f"→ {e}", "{:.2f}") for e in cfg.tasks)],
        out / "routing",
    )
    verdict = mixer_verdict(rows, cfg.tasks)
    report = [
        f"# LoRA-Mixer multi-task comparison ({cfg.preset} preset)",
        "",
        f"{grid_line.replace('cells', 'seeds')}. " if grid_line else "",
        f"Model {cfg.model}; tasks {', '.join(cfg.tasks)}; seeds {cfg.seeds}; rank {cfg.r}; "
        f"{cfg.steps} steps for the single LoRA and for stage 1, {cfg.router_steps} router steps on "
        f"{cfg.router_examples_per_task} examples per task; {cfg.eval_examples_per_task} test examples "
        f"per task. {seconds:.0f} s.",
        "",
        "Accuracy (mean ± std over seeds):",
        "",
        table,
        f"Verdict: {verdict}",
        "",
        "![accuracy](accuracy.png)",
        "",
        f"## Routing\n\nRouter accuracy against task labels: **{router_acc:.3f}** "
        f"(chance {1 / len(cfg.tasks):.3f}). "
        "Mean routing weight of each task's samples (rows) on each expert (columns):",
        "",
        usage_table,
        "![routing](routing.png)",
        "",
    ]
    atomic_write_text(out / "report.md", "\n".join(report))
    return {
        "rows": rows,
        "router_accuracy": router_acc,
        "usage": usage,
        "records": records,
        "verdict": verdict,
    }


def mixer_verdict(rows: list[dict[str, Any]], tasks: Sequence[str]) -> str:
    single = next(r for r in rows if r["system"] == "single LoRA (mixed data)")
    mixer = next(r for r in rows if r["system"] == "LoRA-Mixer (soft)")
    better = [t for t in tasks if mixer[t].mean > single[t].mean]
    worse = [t for t in tasks if mixer[t].mean < single[t].mean]
    return (
        f"LoRA-Mixer (soft) beats the single LoRA on {better or 'no task'} and is behind it on "
        f"{worse or 'no task'}."
    )


# ---- the two workflows as recipes (CLI) ------------------------------------------------------------


def joint(cfg: MixerExperimentConfig, out: str | Path) -> dict[str, Any]:
    """`factorlab mixer train`: the joint workflow on one seed; saves the mixer, each expert as a PEFT
    folder and (tiny model) the base, and reports per-task accuracy and routing."""
    out = Path(out)
    tasks, pad_id = make_tasks(cfg)
    seed = cfg.seeds[0]
    data, evals = train_and_eval_sets(tasks, cfg.train_examples_per_task, cfg.eval_examples_per_task, seed)
    base = build_base(cfg, tasks, seed)
    mixer_config = cfg.mixer_config()
    with StepBars("joint training") as bars:
        bars.start(
            ["stage 1: experts (hard routing)", "stage 2: routers (soft routing)"],
            [cfg.steps, cfg.router_steps],
        )
        adapted = train_joint(
            copy.deepcopy(base),
            data,
            mixer_config,
            cfg.steps,
            cfg.lr,
            cfg.router_steps,
            cfg.router_lr,
            [d[: cfg.router_examples_per_task] for d in data],
            cfg.batch_size,
            seed,
            pad_id,
            progress=lambda stage, s: bars.update(0 if stage == "experts" else 1, s),
        )
    _export(out, base, adapted, cfg)
    accuracies = {
        t: accuracy(adapted, tasks, evals[k], pad_id, max_new_tokens=cfg.max_new_tokens)
        for k, t in enumerate(cfg.tasks)
    }
    usage, router_acc, router_per_task = routing_report(adapted, evals, pad_id)
    return _workflow_report(out, "joint training", cfg, accuracies, usage, router_acc, router_per_task)


def plug(
    cfg: MixerExperimentConfig, base_path: str | Path, adapters: Sequence[str | Path], out: str | Path
) -> dict[str, Any]:
    """`factorlab mixer plug`: route between existing PEFT LoRA folders; only the routers train.
    ``cfg.tasks`` names the task each adapter was trained for, in the same order."""
    out = Path(out)
    if len(adapters) != len(cfg.tasks):
        raise ConfigError(f"{len(adapters)} adapters but {len(cfg.tasks)} tasks; give one task per adapter.")
    tasks, pad_id = make_tasks(cfg)
    seed = cfg.seeds[0]
    from transformers import AutoModelForCausalLM

    from factorlab.models import OFFLINE

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(base_path), **OFFLINE).eval()
    router_data, evals = train_and_eval_sets(
        tasks, cfg.router_examples_per_task, cfg.eval_examples_per_task, seed
    )
    torch.manual_seed(seed)  # the routers' init: the same run whatever ran before in this process
    with console.status("training the routers"):
        adapted = train_router_on_peft(
            base,
            adapters,
            router_data,
            cfg.router_steps,
            cfg.router_lr,
            cfg.batch_size,
            seed,
            pad_id,
            names=list(cfg.tasks),
            routing="soft",
            top_k=min(cfg.top_k, len(cfg.tasks)),
            balance_coef=cfg.balance_coef,
            specialization_coef=cfg.specialization_coef,
            route_label_coef=cfg.route_label_coef,
        )
    adapted.save_pretrained(out / "mixer")
    accuracies = {
        t: accuracy(adapted, tasks, evals[k], pad_id, max_new_tokens=cfg.max_new_tokens)
        for k, t in enumerate(cfg.tasks)
    }
    oracle = {
        t: accuracy(adapted, tasks, evals[k], pad_id, hard=True, max_new_tokens=cfg.max_new_tokens)
        for k, t in enumerate(cfg.tasks)
    }
    usage, router_acc, router_per_task = routing_report(adapted, evals, pad_id)
    return _workflow_report(
        out,
        "plug-and-play (frozen PEFT experts)",
        cfg,
        accuracies,
        usage,
        router_acc,
        router_per_task,
        oracle,
    )


def _workflow_report(
    out: Path, title: str, cfg, accuracies, usage, router_acc, router_per_task, oracle=None
) -> dict[str, Any]:
    from factorlab.mixer import plots as mixer_plots

    rows = [
        {
            "task": t,
            "accuracy": accuracies[t],
            "routed": router_per_task[k],
            **({"oracle": oracle[t]} if oracle else {}),
        }
        for k, t in enumerate(cfg.tasks)
    ]
    columns = [
        Column("task", "task"),
        Column("accuracy", "LoRA-Mixer accuracy", "{:.3f}"),
        Column("routed", "routed to its expert", "{:.3f}"),
    ]
    if oracle:
        columns.append(Column("oracle", "expert alone (task id given)", "{:.3f}"))
    table = write_table(rows, columns, out / "table")
    mixer_plots.usage_heatmap(usage, cfg.tasks, out / "routing.png")
    result = {
        "accuracy": accuracies,
        "oracle": oracle,
        "router_accuracy": router_acc,
        "router_accuracy_per_task": dict(zip(cfg.tasks, router_per_task)),
        "usage": usage.tolist(),
        "config": dataclasses.asdict(cfg),
    }
    write_json(out / "results.json", result)
    atomic_write_text(
        out / "report.md",
        "\n".join(
            [
                f"# LoRA-Mixer: {title}",
                "",
                table,
                f"Router accuracy against task labels: **{router_acc:.3f}** "
                f"(chance {1 / len(cfg.tasks):.3f}).",
                "",
                "![routing](routing.png)",
                "",
            ]
        ),
    )
    return result
