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

from factorlab.cells import has_keys
from factorlab.core.adapted import AdaptedModel, adapt
from factorlab.errors import ConfigError, GridCellsFailed
from factorlab.grid import cell_id, load_summary, run_grid
from factorlab.methods.lora_mixer.config import LoraMixerConfig
from factorlab.methods.lora_mixer.model import export_expert_as_peft, set_routing, set_stage
from factorlab.mixer import lorahub
from factorlab.mixer.config import PEERS, MixerExperimentConfig, build_base
from factorlab.mixer.evaluate import accuracy, answer_loss, routing_report
from factorlab.mixer.report import workflow_report, write_comparison
from factorlab.mixer.systems import (
    compacter_plus_plus,
    full_finetune,
    hydralora,
    mixlora,
    multitask_lora,
    trainable_parameters,
    xlora,
    xlora_routing_report,
)
from factorlab.mixer.tasks import make_tasks, train_and_eval_sets
from factorlab.mixer.train import (
    STAGE2_SEED_OFFSET,
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
from factorlab.runtime import PeakMemory, machine_info, write_json

# ---- the comparison -------------------------------------------------------------------------------------

# A grid cell is one unit of work for one seed. Phase 2 units start from the same seed's "experts" cell
# (its experts, exported as PEFT folders), so they run after phase 1. Within a phase the slowest units
# come first, so the last cells to start are short ones and no worker idles long at the end.
PHASES = (("full", "experts", "multi-task LoRA", "Compacter++", "base"), ("X-LoRA", "joint", "plug"))


def _cell(cfg: MixerExperimentConfig, seed: int, unit: str, export: bool) -> dict[str, Any]:
    # seeds / full_seeds only choose which cells exist: out of the cell, so adding a seed reuses the rest
    config = dataclasses.asdict(dataclasses.replace(cfg, seeds=[seed], full_seeds=None))
    del config["peers"], config["skip"]
    for key in UNIT_SETTINGS:  # a unit's own settings are part of its id only
        if UNIT_SETTINGS[key] != unit:
            del config[key]
    for (
        key,
        default,
    ) in LOOP_DEFAULTS.items():  # at their defaults, out of the id: committed cells keep theirs
        if config[key] == default:
            del config[key]
    return {"config": config, "seed": seed, "unit": unit, "export": export}


LOOP_DEFAULTS = {"precision": "float32", "gradient_checkpointing": False}
UNIT_SETTINGS = {"lorahub_budget": "LoRAHub", "lorahub_examples_per_task": "LoRAHub"}


def comparison_cells(cfg: MixerExperimentConfig) -> list[list[dict[str, Any]]]:
    """The cells of each phase: every unit for every seed (full fine-tuning on ``cfg.full_seeds``)."""
    full = cfg.seeds if cfg.full_seeds is None else cfg.full_seeds
    peers = [[p for p in cfg.peers if PEERS[p] == phase] for phase in (0, 1)]
    # slowest first, as in PHASES: the peers trained from scratch lead phase 1, the others follow phase 2's
    phases = [
        [u for u in units if u not in cfg.skip]
        for units in ((*peers[0], *PHASES[0]), (*PHASES[1], *peers[1]))
    ]
    return [
        [
            _cell(cfg, seed, unit, export=seed == cfg.seeds[0])
            for unit in units
            for seed in cfg.seeds
            if unit != "full" or seed in full
        ]
        for units in phases
    ]


@dataclasses.dataclass
class _Cell:
    """What one comparison cell's systems share: its data, base model and the records it writes."""

    cfg: MixerExperimentConfig
    seed: int
    unit: str
    export: bool
    folder: Path
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    systems: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    routing: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    evaluation: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    evaluating: float = 0.0

    def __post_init__(self) -> None:
        cfg, seed = self.cfg, self.seed
        self.tasks, self.pad_id = make_tasks(cfg)
        self.data, self.evals = train_and_eval_sets(
            self.tasks, cfg.train_examples_per_task, cfg.eval_examples_per_task, seed
        )
        self.router_data = [d[: cfg.router_examples_per_task] for d in self.data]
        self.base = build_base(cfg, self.tasks, seed)  # float32: full fine-tuning's master weights
        self.stored = (
            store_base(copy.deepcopy(self.base), cfg.precision) if cfg.precision != "float32" else self.base
        )
        self.options = cfg.loop_options()
        self.experts_folder = self.folder.parent / cell_id(_cell(cfg, seed, "experts", self.export))

    def score(self, model, system: str, hard: bool = False) -> None:
        """Accuracy per task on the test sets; the system's evaluation time and tokens (prompt read,
        answers generated) go to ``evaluation``."""
        began = time.perf_counter()
        tokens: dict[str, int] = {}
        for k, name in enumerate(self.cfg.tasks):
            acc = accuracy(
                model, self.tasks, self.evals[k], self.pad_id, hard, self.cfg.max_new_tokens, tokens
            )
            self.records.append({"seed": self.seed, "system": system, "task": name, "accuracy": acc})
        seconds = time.perf_counter() - began
        self.evaluation[system] = {"seconds": seconds, **tokens}
        self.evaluating += seconds

    def fit(self, model, label, steps, lr, train_data, run, names, batch_seed=None) -> None:
        """Train with ``run`` (a bar per run), time it, and note the trained model under ``names``."""
        with StepBars(f"{self.unit}, seed {self.seed}") as bars:
            bars.start([label], [steps])
            began = time.perf_counter()
            with PeakMemory(next(model.parameters()).device) as peak:
                run(model, lambda s: bars.update(0, s))
            seconds = time.perf_counter() - began
        seed = self.seed if batch_seed is None else batch_seed
        tokens = tokens_trained(train_data, steps, self.cfg.batch_size, seed)
        for name in names:
            self.systems[name] = {
                "trainable": trainable_parameters(model),
                "seconds": seconds,
                "tokens": tokens,
                "lr": lr,
                "steps": steps,
                "peak_memory_bytes": peak.bytes,
            }

    def plain(self, steps: int, lr: float, train_data, hard: bool = False):
        cfg = self.cfg
        return lambda model, progress: train(
            model,
            train_data,
            steps,
            lr,
            cfg.batch_size,
            self.seed,
            hard,
            self.pad_id,
            progress,
            options=self.options,
        )

    def expert_folders(self) -> list[Path]:
        """The same seed's experts cell's PEFT folders, which phase 2 units start from."""
        if load_summary(self.experts_folder) is None:
            raise ConfigError(
                f"{self.unit} needs the same seed's experts cell first ({self.experts_folder})."
            )
        folders = [self.experts_folder / "experts" / t for t in self.cfg.tasks]
        needed = ("adapter_config.json", "adapter_model.safetensors")
        missing = [f / n for f in folders for n in needed if not (f / n).exists()]
        if missing:  # e.g. a clean clone: results/ commits summaries, not weights
            raise ConfigError(
                f"{self.unit} starts from the experts cell's PEFT folders, and {missing[0]} is missing: "
                f"delete {self.experts_folder} and rerun to retrain them."
            )
        return folders

    def mixer_from_experts(self, **settings) -> AdaptedModel:
        """The stage-1 experts exactly (from their PEFT folders) with fresh routers seeded by the seed."""
        cfg = self.cfg
        config = LoraMixerConfig.from_peft_adapters(
            self.expert_folders(),
            list(cfg.tasks),
            routing="soft",
            top_k=min(cfg.top_k, len(cfg.tasks)),
            balance_coef=cfg.balance_coef,
            specialization_coef=cfg.specialization_coef,
            route_label_coef=cfg.route_label_coef,
            **settings,
        )
        torch.manual_seed(self.seed)
        return adapt(copy.deepcopy(self.stored), config)


def _base(c: _Cell) -> None:
    c.score(c.stored, "base")
    c.systems["base"] = {"trainable": 0, "seconds": 0.0, "tokens": 0}


def _multitask_lora(c: _Cell) -> None:
    _single(c, "multi-task LoRA (equal total rank)", multitask_lora(c.cfg, c.stored), c.cfg.lr)


def _hydralora(c: _Cell) -> None:
    _single(c, "HydraLoRA (shared A, routed Bs)", hydralora(c.cfg, c.stored), c.cfg.lr)


def _mixlora(c: _Cell) -> None:
    _single(c, "MixLoRA (top-2 FFN experts)", mixlora(c.cfg, c.stored), c.cfg.lr)


def _compacter(c: _Cell) -> None:
    _single(c, "Compacter++ (multi-task)", compacter_plus_plus(c.stored), c.cfg.compacter_lr)


def _full(c: _Cell) -> None:
    _single(c, "full fine-tuning (multi-task)", full_finetune(c.base), c.cfg.full_lr)


def _single(c: _Cell, name: str, model, lr: float) -> None:
    """One model on the mixed data, scored per task."""
    c.fit(model, name, c.cfg.steps, lr, c.data, c.plain(c.cfg.steps, lr, c.data), [name])
    c.score(model, name)


def _experts(c: _Cell) -> None:
    """Stage 1: an expert per task (hard routing), scored with its task's id (the oracle) and averaged."""
    cfg = c.cfg
    mixer = adapt(copy.deepcopy(c.stored), cfg.mixer_config())
    hard = c.plain(cfg.steps, cfg.lr, c.data, hard=True)

    def stage1(model, progress):
        set_stage(model, "experts")
        hard(model, progress)

    names = ["per-task LoRA (oracle)", "uniform average of experts"]
    c.fit(mixer, "experts (stage 1, hard routing)", cfg.steps, cfg.lr, c.data, stage1, names)
    for e, task in enumerate(cfg.tasks):
        export_expert_as_peft(mixer, e, c.folder / "experts" / task)
    if c.export and cfg.model == "tiny":
        c.base.save_pretrained(c.folder / "base")
        write_json(c.folder / "base" / "factorlab_tasks.json", {"tasks": cfg.tasks})
    c.score(mixer, names[0], hard=True)
    set_routing(mixer, "uniform")
    c.score(mixer, names[1])


def _joint(c: _Cell) -> None:
    """Stage 2 from the stage-1 experts: routers plus experts held near their stage-1 weights."""
    cfg = c.cfg
    stage1 = load_summary(c.experts_folder)
    mixer = c.mixer_from_experts(preservation_coef=cfg.preservation_coef, freeze_experts=False)
    names = ["LoRA-Mixer joint (soft)", "LoRA-Mixer joint (top-k)"]

    def stage2(model, progress):
        args = (c.router_data, cfg.router_steps, cfg.router_lr, cfg.batch_size, c.seed, c.pad_id, progress)
        train_stage2(model, *args, options=c.options)

    stage2_seed = c.seed + STAGE2_SEED_OFFSET
    label = "routers + experts (stage 2)"
    c.fit(mixer, label, cfg.router_steps, cfg.router_lr, c.router_data, stage2, names, stage2_seed)
    first = stage1["systems"]["per-task LoRA (oracle)"]
    for name in names:  # the joint system's training is both stages
        c.systems[name].update(stage1_seconds=first["seconds"], stage1_tokens=first["tokens"])
    c.score(mixer, names[0])
    c.routing[names[0]] = _routing(*routing_report(mixer, c.evals, c.pad_id))
    set_routing(mixer, "topk")
    c.score(mixer, names[1])
    if c.export:
        mixer.save_pretrained(c.folder / "mixer")


def _fit_routers(c: _Cell, model, name: str, label: str) -> None:
    """Train whatever ``model`` leaves trainable over the frozen experts (routers, gates) on the router
    set, timed, then record its routing accuracy."""
    cfg = c.cfg

    def routers(model, progress):
        args = (c.router_data, cfg.router_steps, cfg.router_lr, cfg.batch_size, c.seed, c.pad_id, progress)
        train_routers(model, *args, options=c.options)

    c.fit(model, label, cfg.router_steps, cfg.router_lr, c.router_data, routers, [name])
    c.routing[name] = _routing(*routing_report(model, c.evals, c.pad_id))


def _plug(c: _Cell) -> None:
    """Routers only, over the experts as frozen PEFT folders."""
    name = "LoRA-Mixer plug-and-play (top-k)"
    mixer = c.mixer_from_experts()
    _fit_routers(c, mixer, name, "routers (frozen PEFT experts)")
    set_routing(mixer, "topk")
    c.score(mixer, name)


def _mole(c: _Cell) -> None:
    """MoLE: a gate per layer over the same frozen PEFT experts, trained on the same mixed set (no task
    labels: MoLE's gate balancing loss only)."""
    name = "MoLE (layer gates)"
    torch.manual_seed(c.seed)  # the gates' init
    mole = adapt(copy.deepcopy(c.stored), LoraMixerConfig.mole(c.expert_folders(), list(c.cfg.tasks)))
    _fit_routers(c, mole, name, "MoLE gates (frozen PEFT experts)")
    c.score(mole, name)


def _arrow(c: _Cell) -> None:
    """Arrow: training-free routing over the same frozen PEFT experts (factorlab's, equal to peft's)."""
    name = "Arrow (training-free)"
    arrow = adapt(
        copy.deepcopy(c.stored),
        LoraMixerConfig.from_peft_adapters(
            c.expert_folders(), list(c.cfg.tasks), routing="arrow", top_k=min(c.cfg.top_k, len(c.cfg.tasks))
        ),
    )
    c.systems[name] = {"trainable": 0, "seconds": 0.0, "tokens": 0}
    c.routing[name] = _routing(*routing_report(arrow, c.evals, c.pad_id))
    c.score(arrow, name)


def _xlora(c: _Cell) -> None:
    """peft's X-LoRA over the same PEFT folders, its classifier trained on the same mixed set."""
    cfg = c.cfg
    name = "X-LoRA (peft)"
    folders = c.expert_folders()
    torch.manual_seed(c.seed)  # the classifier's init
    model = xlora(c.stored, folders)
    run = c.plain(cfg.router_steps, cfg.router_lr, c.router_data)
    c.fit(model, "X-LoRA classifier", cfg.router_steps, cfg.router_lr, c.router_data, run, [name])
    c.routing[name] = _routing(*xlora_routing_report(model, c.evals, c.pad_id))
    c.score(model, name)


def _lorahub(c: _Cell) -> None:
    """LoRAHub: one weight per frozen expert, searched without gradients on a few mixed examples, merged
    into one static LoRA (factorlab.mixer.lorahub)."""
    name = "LoRAHub (gradient-free merge)"
    examples = [e for task in c.router_data for e in task[: c.cfg.lorahub_examples_per_task]]
    folders = c.expert_folders()
    with StepBars(f"{c.unit}, seed {c.seed}") as bars:
        bars.start(["LoRAHub search (loss evaluations)"], [c.cfg.lorahub_budget])
        began = time.perf_counter()
        result = lorahub.lorahub_search(
            c.stored,
            folders,
            lambda model: answer_loss(model, examples, c.pad_id),
            budget=c.cfg.lorahub_budget,
            seed=c.seed,
            progress=lambda s: bars.update(0, s),
        )
        seconds = time.perf_counter() - began
    c.systems[name] = {
        "trainable": len(folders),  # one scalar per expert
        "seconds": seconds,
        "tokens": c.cfg.lorahub_budget * sum(len(e.prompt) + len(e.answer) for e in examples),
        "steps": c.cfg.lorahub_budget,
        "weights": result.weights,
        "search_loss": result.loss,
    }
    c.score(result.model, name)


UNITS = {
    "base": _base,
    "multi-task LoRA": _multitask_lora,
    "Compacter++": _compacter,
    "full": _full,
    "experts": _experts,
    "joint": _joint,
    "plug": _plug,
    "X-LoRA": _xlora,
    "LoRAHub": _lorahub,
    "HydraLoRA": _hydralora,
    "MoLE": _mole,
    "Arrow": _arrow,
    "MixLoRA": _mixlora,
}


def comparison_cell(cell: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Grid cell: one unit of the comparison for one seed (see factorlab.grid): one small function per
    system above. Returns its accuracy records, and per system the trainable parameters, training
    seconds, tokens and peak memory, evaluation seconds and tokens, and routing."""
    if cell["unit"] not in UNITS:
        raise ConfigError(f"unknown comparison unit {cell['unit']!r}; units: {list(UNITS)}.")
    c = _Cell(MixerExperimentConfig(**cell["config"]), cell["seed"], cell["unit"], cell["export"], folder)
    UNITS[c.unit](c)
    return {
        "records": c.records,
        "systems": c.systems,
        "routing": c.routing,
        "evaluation": c.evaluation,
        "eval_seconds": c.evaluating,
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
    return workflow_report(out, "joint training", cfg, accuracies, usage, router_acc, router_per_task)


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
    return workflow_report(
        out,
        "plug-and-play (frozen PEFT experts)",
        cfg,
        accuracies,
        usage,
        router_acc,
        router_per_task,
        oracle,
    )
