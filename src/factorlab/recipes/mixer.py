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
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from factorlab.cells import has_keys
from factorlab.core.adapted import AdaptedModel, adapt
from factorlab.errors import ConfigError, GridCellsFailed
from factorlab.grid import cell_id, load_summary, run_grid
from factorlab.methods.lora_mixer.config import LoraMixerConfig
from factorlab.methods.lora_mixer.model import export_expert_as_peft, set_routing, set_stage
from factorlab.mixer.config import MixerExperimentConfig, build_base
from factorlab.mixer.evaluate import accuracy, predict, routing_report  # noqa: F401
from factorlab.mixer.systems import (
    compacter_plus_plus,
    full_finetune,
    multitask_lora,
    trainable_parameters,
    xlora,
    xlora_routing_report,
)
from factorlab.mixer.tasks import Example, GymTasks, SyntheticTasks, make_tasks, train_and_eval_sets  # noqa: F401
from factorlab.mixer.train import (  # noqa: F401
    STAGE2_SEED_OFFSET,
    collate,
    tokens_trained,
    train,
    train_joint,
    train_router_on_peft,
    train_routers,
    train_stage2,
)
from factorlab.models import resolve_model_path
from factorlab.precision import store_base
from factorlab.progress import StepBars, console
from factorlab.reporting import Column, aggregate, write_table
from factorlab.runtime import atomic_write_text, machine_info, write_json

# ---- the comparison -------------------------------------------------------------------------------------

SYSTEMS = (
    "base",
    "multi-task LoRA (equal total rank)",
    "Compacter++ (multi-task)",
    "full fine-tuning (multi-task)",
    "per-task LoRA (oracle)",
    "uniform average of experts",
    "LoRA-Mixer joint (soft)",
    "LoRA-Mixer joint (top-k)",
    "LoRA-Mixer plug-and-play (top-k)",
    "X-LoRA (peft)",
)
# A grid cell is one unit of work for one seed. Phase 2 units start from the same seed's "experts" cell
# (its experts, exported as PEFT folders), so they run after phase 1. Within a phase the slowest units
# come first, so the last cells to start are short ones and no worker idles long at the end.
PHASES = (("full", "experts", "multi-task LoRA", "Compacter++", "base"), ("X-LoRA", "joint", "plug"))


def _cell(cfg: MixerExperimentConfig, seed: int, unit: str, export: bool) -> dict[str, Any]:
    # seeds / full_seeds only choose which cells exist: out of the cell, so adding a seed reuses the rest
    config = dataclasses.asdict(dataclasses.replace(cfg, seeds=[seed], full_seeds=None))
    for (
        key,
        default,
    ) in LOOP_DEFAULTS.items():  # at their defaults, out of the id: committed cells keep theirs
        if config[key] == default:
            del config[key]
    return {"config": config, "seed": seed, "unit": unit, "export": export}


LOOP_DEFAULTS = {"precision": "float32", "gradient_checkpointing": False}


def comparison_cells(cfg: MixerExperimentConfig) -> list[list[dict[str, Any]]]:
    """The cells of each phase: every unit for every seed (full fine-tuning on ``cfg.full_seeds``)."""
    full = cfg.seeds if cfg.full_seeds is None else cfg.full_seeds
    return [
        [
            _cell(cfg, seed, unit, export=seed == cfg.seeds[0])
            for unit in units
            for seed in cfg.seeds
            if unit != "full" or seed in full
        ]
        for units in PHASES
    ]


def comparison_cell(cell: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Grid cell: one unit of the comparison for one seed (see factorlab.grid). Returns its accuracy
    records, and per system the trainable parameters, training seconds and tokens, and routing."""
    cfg = MixerExperimentConfig(**cell["config"])
    seed, unit = cell["seed"], cell["unit"]
    tasks, pad_id = make_tasks(cfg)
    data, evals = train_and_eval_sets(tasks, cfg.train_examples_per_task, cfg.eval_examples_per_task, seed)
    router_data = [d[: cfg.router_examples_per_task] for d in data]
    base = build_base(cfg, tasks, seed)  # float32: full fine-tuning's master weights, the exported base
    stored = store_base(copy.deepcopy(base), cfg.precision) if cfg.precision != "float32" else base
    options = cfg.loop_options()
    experts_folder = folder.parent / cell_id(_cell(cfg, seed, "experts", cell["export"]))
    records: list[dict[str, Any]] = []
    systems: dict[str, dict[str, Any]] = {}
    routing: dict[str, dict[str, Any]] = {}
    evaluating = 0.0

    def score(model, system, hard=False):
        nonlocal evaluating
        began = time.perf_counter()
        for k, name in enumerate(cfg.tasks):
            acc = accuracy(model, tasks, evals[k], pad_id, hard, cfg.max_new_tokens)
            records.append({"seed": seed, "system": system, "task": name, "accuracy": acc})
        evaluating += time.perf_counter() - began

    def fit(model, label, steps, lr, train_data, run, names, batch_seed=seed):
        """Train with ``run`` (a bar per run), time it, and note the trained model under ``names``."""
        with StepBars(f"{unit}, seed {seed}") as bars:
            bars.start([label], [steps])
            began = time.perf_counter()
            run(model, lambda s: bars.update(0, s))
            seconds = time.perf_counter() - began
        tokens = tokens_trained(train_data, steps, cfg.batch_size, batch_seed)
        for name in names:
            systems[name] = {
                "trainable": trainable_parameters(model),
                "seconds": seconds,
                "tokens": tokens,
                "lr": lr,
                "steps": steps,
            }

    def plain(steps, lr, train_data):
        return lambda model, progress: train(
            model, train_data, steps, lr, cfg.batch_size, seed, False, pad_id, progress, options=options
        )

    if unit == "base":
        score(stored, "base")
        systems["base"] = {"trainable": 0, "seconds": 0.0, "tokens": 0}
    elif unit in ("multi-task LoRA", "Compacter++", "full"):
        name, model, lr = {
            "multi-task LoRA": (
                "multi-task LoRA (equal total rank)",
                lambda: multitask_lora(cfg, stored),
                cfg.lr,
            ),
            "Compacter++": (
                "Compacter++ (multi-task)",
                lambda: compacter_plus_plus(stored),
                cfg.compacter_lr,
            ),
            "full": ("full fine-tuning (multi-task)", lambda: full_finetune(base), cfg.full_lr),
        }[unit]
        model = model()
        fit(model, name, cfg.steps, lr, data, plain(cfg.steps, lr, data), [name])
        score(model, name)
    elif unit == "experts":
        mixer = adapt(copy.deepcopy(stored), cfg.mixer_config())

        def stage1(model, progress):
            set_stage(model, "experts")
            train(
                model, data, cfg.steps, cfg.lr, cfg.batch_size, seed, True, pad_id, progress, options=options
            )

        names = ["per-task LoRA (oracle)", "uniform average of experts"]
        fit(mixer, "experts (stage 1, hard routing)", cfg.steps, cfg.lr, data, stage1, names)
        for e, task in enumerate(cfg.tasks):
            export_expert_as_peft(mixer, e, folder / "experts" / task)
        if cell["export"] and cfg.model == "tiny":
            base.save_pretrained(folder / "base")
            write_json(folder / "base" / "factorlab_tasks.json", {"tasks": cfg.tasks})
        score(mixer, names[0], hard=True)
        set_routing(mixer, "uniform")
        score(mixer, names[1])
    else:
        stage1 = load_summary(experts_folder)
        if stage1 is None:
            raise ConfigError(f"{unit} needs the same seed's experts cell first ({experts_folder}).")
        folders = [experts_folder / "experts" / t for t in cfg.tasks]
        needed = ("adapter_config.json", "adapter_model.safetensors")
        missing = [f / n for f in folders for n in needed if not (f / n).exists()]
        if missing:  # e.g. a clean clone: results/ commits summaries, not weights
            raise ConfigError(
                f"{unit} starts from the experts cell's PEFT folders, and {missing[0]} is missing: "
                f"delete {experts_folder} and rerun to retrain them."
            )

        def mixer_from_experts(**settings):
            """The stage-1 experts exactly (from their PEFT folders) with fresh routers seeded by seed."""
            config = LoraMixerConfig.from_peft_adapters(
                folders,
                list(cfg.tasks),
                routing="soft",
                top_k=min(cfg.top_k, len(cfg.tasks)),
                balance_coef=cfg.balance_coef,
                specialization_coef=cfg.specialization_coef,
                route_label_coef=cfg.route_label_coef,
                **settings,
            )
            torch.manual_seed(seed)
            return adapt(copy.deepcopy(stored), config)

        if unit == "joint":
            # the experts train on, held near their stage-1 weights by the preservation penalty
            mixer = mixer_from_experts(preservation_coef=cfg.preservation_coef, freeze_experts=False)
            names = ["LoRA-Mixer joint (soft)", "LoRA-Mixer joint (top-k)"]

            def stage2(model, progress):
                args = (router_data, cfg.router_steps, cfg.router_lr, cfg.batch_size, seed, pad_id, progress)
                train_stage2(model, *args, options=options)

            label = "routers + experts (stage 2)"
            stage2_seed = seed + STAGE2_SEED_OFFSET
            fit(mixer, label, cfg.router_steps, cfg.router_lr, router_data, stage2, names, stage2_seed)
            first = stage1["systems"]["per-task LoRA (oracle)"]
            for name in names:  # the joint system's training is both stages
                systems[name].update(stage1_seconds=first["seconds"], stage1_tokens=first["tokens"])
            score(mixer, names[0])
            routing[names[0]] = _routing(*routing_report(mixer, evals, pad_id))
            set_routing(mixer, "topk")
            score(mixer, names[1])
            if cell["export"]:
                mixer.save_pretrained(folder / "mixer")
        elif unit == "plug":
            name = "LoRA-Mixer plug-and-play (top-k)"
            mixer = mixer_from_experts()

            def routers(model, progress):
                args = (router_data, cfg.router_steps, cfg.router_lr, cfg.batch_size, seed, pad_id, progress)
                train_routers(model, *args, options=options)

            label = "routers (frozen PEFT experts)"
            fit(mixer, label, cfg.router_steps, cfg.router_lr, router_data, routers, [name])
            routing[name] = _routing(*routing_report(mixer, evals, pad_id))
            set_routing(mixer, "topk")
            score(mixer, name)
        elif unit == "X-LoRA":
            name = "X-LoRA (peft)"
            torch.manual_seed(seed)  # the classifier's init
            model = xlora(stored, folders)
            fit(
                model,
                "X-LoRA classifier",
                cfg.router_steps,
                cfg.router_lr,
                router_data,
                plain(cfg.router_steps, cfg.router_lr, router_data),
                [name],
            )
            routing[name] = _routing(*xlora_routing_report(model, evals, pad_id))
            score(model, name)
        else:
            raise ConfigError(f"unknown comparison unit {unit!r}; units: {[u for p in PHASES for u in p]}.")
    return {
        "records": records,
        "systems": systems,
        "routing": routing,
        "eval_seconds": evaluating,
        "machine": machine_info(),
    }


comparison_cell.summary_is_complete = has_keys("records", "systems", "machine")


def _routing(usage: torch.Tensor, overall: float, per_task: list[float]) -> dict[str, Any]:
    return {"usage": usage.tolist(), "accuracy": overall, "per_task": per_task}


def run_experiment(
    cfg: MixerExperimentConfig,
    out: str | Path,
    export: bool = True,
    workers: int | None = 1,
    backend: str = "local",
    address: str | None = None,
) -> dict[str, Any]:
    """The comparison over ``cfg.seeds``: one grid cell per unit and seed (parallel, resumable,
    Ray-capable), phase 1 then phase 2 (which starts from phase 1's experts).

    The first seed's base (tiny model), joint mixer and experts (as PEFT folders) are copied to ``out``.
    """
    out = Path(out)
    started = time.perf_counter()
    phases = comparison_cells(cfg)
    if not export:
        phases = [[{**c, "export": False} for c in cells] for cells in phases]
    for cells in phases:
        grid = run_grid(
            "factorlab.recipes.mixer:comparison_cell", cells, out, workers, backend=backend, address=address
        )
        if grid.failed:
            raise GridCellsFailed("comparison cell(s)", grid.failed)
    if export:
        for cells in phases:
            for cell in cells:
                if cell["export"]:
                    for name in ("base", "mixer", "experts"):
                        if (out / "cells" / cell_id(cell) / name).exists():
                            shutil.copytree(
                                out / "cells" / cell_id(cell) / name, out / name, dirs_exist_ok=True
                            )
    return write_comparison(out, [c for cells in phases for c in cells], time.perf_counter() - started)


def report_from_cells(out: str | Path) -> dict[str, Any]:
    """`factorlab report OUT` for a comparison: rebuild its tables, plots and report from OUT/cells."""
    out = Path(out)
    summaries = [load_summary(folder) for folder in sorted((out / "cells").glob("*/"))]
    cells = [s["cell"] for s in summaries if s is not None and "unit" in s.get("cell", {})]
    if not cells:
        raise ConfigError(f"{out}/cells holds no finished comparison cells; run `factorlab mixer run` first.")
    return write_comparison(out, cells, None)


def write_comparison(out: Path, cells: list[dict[str, Any]], seconds: float | None) -> dict[str, Any]:
    """results.json, the tables, the plots and report.md from the cells' summaries (cells still missing
    are listed, never filled in)."""
    from factorlab.mixer import plots as mixer_plots

    summaries = [load_summary(out / "cells" / cell_id(c), c) for c in cells]
    done = [s for s in summaries if s is not None]
    missing = [c for c, s in zip(cells, summaries) if s is None]
    # The settings as recorded, not re-validated: a report must build where the model is not installed
    settings = {**done[0]["cell"]["config"], "seeds": sorted({s["cell"]["seed"] for s in done})}
    cfg = SimpleNamespace(**settings)
    records = [r for s in done for r in s["records"]]
    systems = [s for s in SYSTEMS if any(r["system"] == s for r in records)]
    by_task = aggregate(records, ["system", "task"], ["accuracy"])
    costs: dict[str, list[dict[str, Any]]] = {}
    routes: dict[str, list[dict[str, Any]]] = {}
    for s in done:
        for name, cost in s["systems"].items():
            train_s = cost["seconds"] + cost.get("stage1_seconds", 0.0)
            costs.setdefault(name, []).append(
                {
                    "trainable": cost["trainable"],
                    "train_s": train_s,
                    # the last stage's throughput: stage 1 has its own row (the oracle experts)
                    "tok_s": cost["tokens"] / cost["seconds"] if cost["seconds"] else None,
                }
            )
        for name, route in s.get("routing", {}).items():
            routes.setdefault(name, []).append(route)
    rows = []
    for system in systems:
        row: dict[str, Any] = {"system": system}
        for r in by_task:
            if r["system"] == system:
                row[r["task"]] = r["accuracy"]
        per_seed: dict[int, list[float]] = {}
        for rec in records:
            if rec["system"] == system:
                per_seed.setdefault(rec["seed"], []).append(rec["accuracy"])
        row["mean"] = aggregate([{"m": sum(v) / len(v)} for v in per_seed.values()], [], ["m"])[0]["m"]
        row["seeds"] = len(per_seed)
        if system in costs:
            cost = aggregate(costs[system], [], ["trainable", "train_s", "tok_s"])[0]
            row["trainable"], row["train_s"] = cost["trainable"].mean, cost["train_s"]
            row["tok_s"] = cost["tok_s"] if system != "base" else None
        if system in routes:
            row["routed"] = aggregate([{"a": r["accuracy"]} for r in routes[system]], [], ["a"])[0]["a"]
        rows.append(row)
    columns = [
        Column("system", "system"),
        *(Column(t, t, "{:.3f}") for t in cfg.tasks),
        Column("mean", "mean", "{:.3f}"),
        Column("routed", "routed to own expert", "{:.3f}"),
        Column("trainable", "trainable params", "{:,.0f}"),
        Column("train_s", "train s", "{:.0f}"),
        Column("tok_s", "train tokens/s", "{:.0f}"),
        Column("seeds", "seeds"),
    ]
    table = write_table(rows, columns, out / "table")
    machine = sorted({json.dumps(s["machine"], sort_keys=True) for s in done})
    write_json(
        out / "results.json",
        {
            "config": settings,
            "records": records,
            "systems": {s: costs[s] for s in costs},
            "routing": routes,
            "machines": [json.loads(m) for m in machine],
            "seconds": seconds,
            "missing": missing,
        },
    )
    mixer_plots.accuracy_bars(rows, cfg.tasks, out / "accuracy.png")
    usage = None
    joint = routes.get("LoRA-Mixer joint (soft)")
    if joint:
        usage = torch.tensor([r["usage"] for r in joint]).mean(0)
        mixer_plots.usage_heatmap(usage, cfg.tasks, out / "routing.png")
    router_acc = sum(r["accuracy"] for r in joint) / len(joint) if joint else float("nan")
    verdict = mixer_verdict(rows, cfg.tasks)
    cpus = ", ".join(
        f"{m['cpu_capability']} torch {m['torch']} {m['threads']} thread(s)" for m in map(json.loads, machine)
    )
    report = [
        f"# LoRA-Mixer multi-task comparison ({cfg.preset} preset)",
        "",
        f"Model {cfg.model}; tasks {', '.join(cfg.tasks)}; seeds {cfg.seeds}; expert rank {cfg.r}; "
        f"{cfg.steps} training steps for every multi-task system and for stage 1, {cfg.router_steps} router "
        f"steps on {cfg.router_examples_per_task} examples per task; {cfg.eval_examples_per_task} test "
        f"examples per task, greedy generation. Machine: {cpus}."
        + (f" {seconds:.0f} s." if seconds is not None else ""),
        "",
        "Accuracy (mean ± std over seeds); *routed*: share of test samples whose strongest expert is their "
        "task's; *train s*: training time of one seed (joint mixer: both stages); *train tokens/s*: "
        "real tokens of the last training stage per second.",
        "",
        table,
        f"Verdict: {verdict}",
        "",
        "![accuracy](accuracy.png)",
        "",
    ]
    if missing:
        report += [
            f"**Not yet run** ({len(missing)} cells): "
            + ", ".join(f"{c['unit']} seed {c['seed']}" for c in missing),
            "",
        ]
    # routed.md always exists (header only until a routed system has run): README pastes it
    routed_rows = []
    for system in (s for s in SYSTEMS if s in routes):
        per_task = [{t: r["per_task"][k] for k, t in enumerate(cfg.tasks)} for r in routes[system]]
        row = aggregate(per_task, [], list(cfg.tasks))[0]
        routed_rows.append({"system": system, **{t: row[t] for t in cfg.tasks}, "seeds": len(per_task)})
    routed_table = write_table(
        routed_rows,
        [
            Column("system", "system"),
            *(Column(t, t, "{:.3f}") for t in cfg.tasks),
            Column("seeds", "seeds"),
        ],
        out / "routed",
    )
    report += [
        "## Routing accuracy per task",
        "",
        "Share of each task's test samples whose strongest expert (mean weight over real tokens and "
        "projections) is the task's own:",
        "",
        routed_table,
    ]
    if usage is not None:
        usage_rows = [
            {"task": t, **{f"→ {e}": float(usage[k, j]) for j, e in enumerate(cfg.tasks)}}
            for k, t in enumerate(cfg.tasks)
        ]
        usage_table = write_table(
            usage_rows,
            [Column("task", "task"), *(Column(f"→ {e}", f"→ {e}", "{:.2f}") for e in cfg.tasks)],
            out / "routing",
        )
        report += [
            "## Routing (LoRA-Mixer joint, soft)",
            "",
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
        "missing": missing,
    }


def mixer_verdict(rows: list[dict[str, Any]], tasks: Sequence[str]) -> str:
    by_name = {r["system"]: r for r in rows}
    single, mixer = by_name.get("multi-task LoRA (equal total rank)"), by_name.get("LoRA-Mixer joint (top-k)")
    if single is None or mixer is None:
        return "not yet comparable (multi-task LoRA or the joint mixer still missing)."
    better = [t for t in tasks if mixer[t].mean > single[t].mean]
    worse = [t for t in tasks if mixer[t].mean < single[t].mean]
    return (
        f"LoRA-Mixer joint (top-k) beats the multi-task LoRA of equal total rank on {better or 'no task'} "
        f"and is behind it on {worse or 'no task'}."
    )


def _export(out: Path, base: nn.Module, mixer: AdaptedModel, cfg: MixerExperimentConfig) -> None:
    """The base (tiny preset), the trained mixer, and each expert as a standalone PEFT LoRA folder."""
    if cfg.model == "tiny":
        base.save_pretrained(out / "base")
        write_json(out / "base" / "factorlab_tasks.json", {"tasks": cfg.tasks})
    mixer.save_pretrained(out / "mixer")
    for e, name in enumerate(cfg.tasks):
        export_expert_as_peft(mixer, e, out / "experts" / name)


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
            store_base(copy.deepcopy(base), cfg.precision),
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
            options=cfg.loop_options(),
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

    from factorlab.models import load_pretrained

    base = load_pretrained(AutoModelForCausalLM, resolve_model_path(base_path), use_safetensors=True).eval()
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
            options=cfg.loop_options(),
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
