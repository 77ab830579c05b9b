"""LoRA-Mixer recipes: the two workflows and the multi-task comparison.

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
``smollm2`` — SmolLM2-135M-Instruct from its PyPI package on four reasoning-gym tasks (needs
``pip install reasoning-gym``), graded by each task's own scorer; an hour or more on CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from factorlab.core.adapted import AdaptedModel, adapt
from factorlab.distributed import rank, world_size
from factorlab.errors import ConfigError, GridCellsFailed
from factorlab.grid import cell_id, run_grid
from factorlab.methods.lora.config import LoraConfig
from factorlab.methods.lora_mixer.config import LoraMixerConfig
from factorlab.methods.lora_mixer.model import (
    export_expert_as_peft,
    routing_weights_per_sample,
    set_routing,
    set_stage,
)
from factorlab.models import resolve_model_path
from factorlab.progress import StepBars, console
from factorlab.reporting import Column, aggregate, write_table
from factorlab.runtime import atomic_write_text, write_json
from factorlab.training import run_training
from factorlab.validation import check_fields, check_ranges

# ---- tasks ------------------------------------------------------------------------------------------


@dataclass
class Example:
    prompt: list[int]
    answer: list[int]
    task: int
    meta: Any = None


class SyntheticTasks:
    """Tiny tasks with single-token answers; task k uses its own symbols and its own separator,
    so the router can tell tasks apart token by token."""

    RULES: ClassVar[dict] = {
        "first": lambda x: x[:, 0],
        "last": lambda x: x[:, -1],
        "max": lambda x: x.max(1).values,
        "min": lambda x: x.min(1).values,
        "second": lambda x: x[:, 1],
        "sum_mod": lambda x: x.sum(1),
    }

    def __init__(self, names: Sequence[str], symbols: int = 10, length: int = 6):
        unknown = [n for n in names if n not in self.RULES]
        if unknown:
            raise ConfigError(f"unknown synthetic task(s) {unknown}; choose from {sorted(self.RULES)}.")
        self.names, self.symbols, self.length = list(names), symbols, length
        self.vocab_size = len(names) * symbols + len(names)  # symbols, then one separator per task

    def examples(self, task: int, n: int, seed: int) -> list[Example]:
        g = torch.Generator().manual_seed(seed * 1009 + task)
        x = torch.randint(0, self.symbols, (n, self.length), generator=g)
        y = self.RULES[self.names[task]](x) % self.symbols
        offset, sep = task * self.symbols, len(self.names) * self.symbols + task
        return [Example([*(row + offset).tolist(), sep], [int(a) + offset], task) for row, a in zip(x, y)]

    def score(self, example: Example, predicted: list[int]) -> float:
        return float(predicted[:1] == example.answer[:1])


class GymTasks:
    """reasoning-gym tasks as prompt -> answer text, graded by each dataset's own scorer."""

    def __init__(self, names: Sequence[str], tokenizer, max_answer_tokens: int = 24):
        try:
            import reasoning_gym  # noqa: F401
        except ImportError:
            raise ConfigError("the smollm2 preset needs reasoning-gym: pip install reasoning-gym") from None
        self.names, self.tokenizer, self.max_answer_tokens = list(names), tokenizer, max_answer_tokens
        self._datasets: dict[tuple[int, int, int], Any] = {}

    def examples(self, task: int, n: int, seed: int) -> list[Example]:
        import reasoning_gym

        dataset = reasoning_gym.create_dataset(self.names[task], size=n, seed=seed * 1009 + task)
        self._datasets[(task, seed, n)] = dataset
        out = []
        for entry in dataset:
            prompt = self.tokenizer(f"Question: {entry['question']}\nAnswer:")["input_ids"]
            answer = self.tokenizer(f" {entry['answer']}")["input_ids"][: self.max_answer_tokens]
            out.append(Example(prompt, [*answer, self.tokenizer.eos_token_id], task, (dataset, entry)))
        return out

    def score(self, example: Example, predicted: list[int]) -> float:
        dataset, entry = example.meta
        text = self.tokenizer.decode(predicted, skip_special_tokens=True).strip()
        return float(dataset.score_answer(text, entry) >= 1.0)


# ---- batches, training, evaluation ------------------------------------------------------------------


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels (loss on answer tokens only) and task_ids."""
    width = max(len(e.prompt) + len(e.answer) for e in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        seq = e.prompt + e.answer
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(e.prompt) : len(seq)] = torch.tensor(e.answer)
    task_ids = torch.tensor([e.task for e in examples])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "task_ids": task_ids}


def train(
    model: nn.Module,
    data: Sequence[Sequence[Example]],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    hard: bool,
    pad_id: int,
    progress=None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 100,
) -> list[float]:
    """AdamW on batches mixed uniformly over tasks. ``hard`` passes the task ids (stage 1).

    Runs unchanged under torchrun / accelerate launch (each global batch is sharded over the
    ranks, see factorlab.training.lm_loss); with ``checkpoint_dir`` it checkpoints on rank 0 and
    resumes. Batches are a pure function of (seed, step), so resuming reproduces the same run.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("nothing to train: no parameter requires grad.")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    pool = [e for task in data for e in task]

    def batch_for_step(step: int):
        examples = random.Random(seed * 100_003 + step).sample(pool, min(batch_size, len(pool)))
        batch = collate(examples[rank() :: world_size()], pad_id)
        task_ids, labels = batch.pop("task_ids"), batch.pop("labels")
        return batch, labels, {"task_ids": task_ids} if hard else {}

    return run_training(
        model,
        optimizer,
        steps,
        batch_for_step,
        checkpoint_dir,
        checkpoint_every,
        progress,
        context=f"lr={lr}",
    )


@torch.no_grad()
def predict(
    model: nn.Module,
    examples: Sequence[Example],
    pad_id: int,
    task_ids: torch.Tensor | None = None,
    max_new_tokens: int = 1,
    batch_size: int = 128,
) -> list[list[int]]:
    """Greedy answers. Single-token answers come from one forward; longer ones from generate()."""
    model.eval()
    out: list[list[int]] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        kwargs = {} if task_ids is None else {"task_ids": task_ids[start : start + batch_size]}
        if max_new_tokens == 1:
            batch = collate([dataclasses.replace(e, answer=[]) for e in chunk], pad_id)
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs
            ).logits
            last = batch["attention_mask"].sum(1) - 1
            out += [[int(t)] for t in logits[torch.arange(len(chunk)), last].argmax(-1)]
        else:  # left-pad prompts for generation
            width = max(len(e.prompt) for e in chunk)
            ids = torch.full((len(chunk), width), pad_id)
            mask = torch.zeros_like(ids)
            for i, e in enumerate(chunk):
                ids[i, width - len(e.prompt) :] = torch.tensor(e.prompt)
                mask[i, width - len(e.prompt) :] = 1
            generated = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                **kwargs,
            )
            out += [row[width:].tolist() for row in generated]
    return out


def accuracy(
    model, tasks, examples: Sequence[Example], pad_id: int, hard: bool = False, max_new_tokens: int = 1
) -> float:
    task_ids = torch.tensor([e.task for e in examples]) if hard else None
    predictions = predict(model, examples, pad_id, task_ids, max_new_tokens)
    return sum(tasks.score(e, p) for e, p in zip(examples, predictions)) / len(examples)


# ---- configuration ----------------------------------------------------------------------------------


@dataclass
class MixerExperimentConfig:
    """One multi-task comparison. Defaults are the quick preset."""

    preset: str = "quick"
    tasks: list[str] = field(default_factory=lambda: ["first", "last", "max", "min"])
    model: str = "tiny"
    """"tiny" (quick preset's random tiny Llama), "smollm2", or a local causal-LM folder."""
    seeds: list[int] = field(default_factory=lambda: [0])
    r: int = 2
    lora_alpha: float = 4
    target_modules: list[str] | None = None
    """None: LoRA-Mixer's default, the attention input and output projections (same for the single LoRA)."""
    lr: float = 3e-3
    steps: int = 1500
    """Training steps of the single LoRA and of stage 1 (all experts at once, hard routing)."""
    router_lr: float = 1e-2
    router_steps: int = 600
    router_examples_per_task: int = 500
    """Size of stage 2's small mixed set, per task."""
    train_examples_per_task: int = 4000
    eval_examples_per_task: int = 512
    batch_size: int = 64
    top_k: int = 2
    balance_coef: float = 0.01
    specialization_coef: float = 0.1
    max_new_tokens: int = 1

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("tasks", "seeds"):
            if not getattr(self, name):
                raise ConfigError(f"give at least one of {name}.")
        check_ranges(
            self,
            positive=(
                "r",
                "steps",
                "router_steps",
                "router_examples_per_task",
                "train_examples_per_task",
                "eval_examples_per_task",
                "batch_size",
                "top_k",
                "max_new_tokens",
                "lr",
                "router_lr",
                "lora_alpha",
            ),
            non_negative=("balance_coef", "specialization_coef"),
        )
        # Names and paths are checked here, not in a grid worker, so a typo is one line before any work.
        if self.model == "tiny":
            SyntheticTasks(self.tasks)
        else:
            resolve_model_path(self.model)

    def mixer_config(self) -> LoraMixerConfig:
        """One expert per task (named after it), soft routing, this experiment's routing loss."""
        return LoraMixerConfig(
            experts=[{"name": n, "r": self.r, "lora_alpha": self.lora_alpha} for n in self.tasks],
            target_modules=self.target_modules,
            routing="soft",
            top_k=min(self.top_k, len(self.tasks)),
            balance_coef=self.balance_coef,
            specialization_coef=self.specialization_coef,
        )

    @classmethod
    def preset_config(cls, name: str, **overrides: Any) -> MixerExperimentConfig:
        if name == "quick":
            base = cls()
        elif name == "smollm2":
            base = cls(
                preset="smollm2",
                model="smollm2",
                tasks=["basic_arithmetic", "letter_counting", "spell_backward", "caesar_cipher"],
                r=8,
                lora_alpha=16,
                lr=1e-3,
                steps=400,
                router_lr=5e-3,
                router_steps=100,
                router_examples_per_task=200,
                train_examples_per_task=1000,
                eval_examples_per_task=100,
                batch_size=8,
                max_new_tokens=16,
            )
        else:
            raise ConfigError(f"unknown preset {name!r}; choose quick or smollm2.")
        return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


def build_base(cfg: MixerExperimentConfig, tasks, seed: int) -> nn.Module:
    if cfg.model == "tiny":
        import transformers as tf

        torch.manual_seed(seed)
        config = tf.LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=tasks.vocab_size,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        return tf.LlamaForCausalLM(config).eval()
    from factorlab.models import load_causal_lm

    return load_causal_lm(cfg.model)[0]


def make_tasks(cfg: MixerExperimentConfig):
    if cfg.model == "tiny":
        return SyntheticTasks(cfg.tasks), 0
    from factorlab.models import load_causal_lm

    tokenizer = load_causal_lm(cfg.model)[1]
    return GymTasks(cfg.tasks, tokenizer), tokenizer.pad_token_id


# ---- the two workflows --------------------------------------------------------------------------------


def train_joint(
    model: nn.Module,
    data: Sequence[Sequence[Example]],
    mixer: LoraMixerConfig,
    steps: int,
    lr: float,
    router_steps: int,
    router_lr: float,
    router_data: Sequence[Sequence[Example]],
    batch_size: int = 64,
    seed: int = 0,
    pad_id: int = 0,
    progress=None,
) -> AdaptedModel:
    """Workflow 1: stage 1 trains expert e on data[e] (hard routing); stage 2 trains the routers
    (and, with ``preservation_coef > 0``, lightly tunes the experts under the preservation penalty).
    ``progress(stage, step)`` is called as training advances."""
    if len(data) != mixer.num_experts:
        raise ConfigError(f"{len(data)} task datasets for {mixer.num_experts} experts; give one per expert.")
    report = (lambda stage: lambda s: progress(stage, s)) if progress else (lambda stage: None)
    adapted = adapt(model, mixer)
    set_stage(adapted, "experts")
    train(adapted, data, steps, lr, batch_size, seed, hard=True, pad_id=pad_id, progress=report("experts"))
    set_stage(adapted, "all" if mixer.preservation_coef > 0 else "router")
    train(
        adapted,
        router_data,
        router_steps,
        router_lr,
        batch_size,
        seed + 1,
        hard=False,
        pad_id=pad_id,
        progress=report("router"),
    )
    return adapted


def train_router_on_peft(
    model: nn.Module,
    folders: Sequence[str | Path],
    router_data: Sequence[Sequence[Example]],
    steps: int,
    lr: float,
    batch_size: int = 64,
    seed: int = 0,
    pad_id: int = 0,
    names: list[str] | None = None,
    **mixer_kwargs: Any,
) -> AdaptedModel:
    """Workflow 2: experts from existing PEFT LoRA folders (frozen); only the routers train."""
    adapted = adapt(model, LoraMixerConfig.from_peft_adapters(list(folders), names, **mixer_kwargs))
    train(adapted, router_data, steps, lr, batch_size, seed, hard=False, pad_id=pad_id)
    return adapted


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
    data = [tasks.examples(k, cfg.train_examples_per_task, seed) for k in range(len(cfg.tasks))]
    router_data = [d[: cfg.router_examples_per_task] for d in data]
    evals = [tasks.examples(k, cfg.eval_examples_per_task, 10_000 + seed) for k in range(len(cfg.tasks))]
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

        mixer = adapt(copy.deepcopy(base), cfg.mixer_config())
        set_stage(mixer, "experts")
        train(mixer, data, cfg.steps, cfg.lr, cfg.batch_size, seed, True, pad_id, lambda s: bars.update(1, s))
        score(mixer, "per-task LoRA (oracle)", hard=True)
        set_routing(mixer, "uniform")
        score(mixer, "uniform average of experts")
        set_routing(mixer, "soft")
        set_stage(mixer, "router")
        train(
            mixer,
            router_data,
            cfg.router_steps,
            cfg.router_lr,
            cfg.batch_size,
            seed + 1,
            False,
            pad_id,
            lambda s: bars.update(2, s),
        )
    score(mixer, "LoRA-Mixer (soft)")
    usage, router_acc = routing_report(mixer, evals, pad_id)
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


@torch.no_grad()
def routing_report(mixer: AdaptedModel, evals: Sequence[Sequence[Example]], pad_id: int):
    """Mean routing weight per (task, expert) and router accuracy: the share of samples whose most
    used expert is their own task's expert."""
    usage, correct, total = [], 0, 0
    for k, examples in enumerate(evals):
        batch = collate([dataclasses.replace(e, answer=[]) for e in examples], pad_id)
        weights = routing_weights_per_sample(
            mixer, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        )
        usage.append(weights.mean(0))
        correct += int((weights.argmax(-1) == k).sum())
        total += len(examples)
    return torch.stack(usage), correct / total


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
    from factorlab.recipes import mixer_plots

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
    data = [tasks.examples(k, cfg.train_examples_per_task, seed) for k in range(len(cfg.tasks))]
    evals = [tasks.examples(k, cfg.eval_examples_per_task, 10_000 + seed) for k in range(len(cfg.tasks))]
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
    usage, router_acc = routing_report(adapted, evals, pad_id)
    return _workflow_report(out, "joint training", cfg, accuracies, usage, router_acc)


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

    from factorlab.models import OFFLINE, resolve_model_path

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(base_path), **OFFLINE).eval()
    router_data = [tasks.examples(k, cfg.router_examples_per_task, seed) for k in range(len(cfg.tasks))]
    evals = [tasks.examples(k, cfg.eval_examples_per_task, 10_000 + seed) for k in range(len(cfg.tasks))]
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
    usage, router_acc = routing_report(adapted, evals, pad_id)
    return _workflow_report(
        out, "plug-and-play (frozen PEFT experts)", cfg, accuracies, usage, router_acc, oracle
    )


def _workflow_report(
    out: Path, title: str, cfg, accuracies, usage, router_acc, oracle=None
) -> dict[str, Any]:
    from factorlab.recipes import mixer_plots

    rows = [
        {"task": t, "accuracy": accuracies[t], **({"oracle": oracle[t]} if oracle else {})} for t in cfg.tasks
    ]
    columns = [Column("task", "task"), Column("accuracy", "LoRA-Mixer accuracy", "{:.3f}")]
    if oracle:
        columns.append(Column("oracle", "expert alone (task id given)", "{:.3f}"))
    table = write_table(rows, columns, out / "table")
    mixer_plots.usage_heatmap(usage, cfg.tasks, out / "routing.png")
    result = {
        "accuracy": accuracies,
        "oracle": oracle,
        "router_accuracy": router_acc,
        "usage": usage.tolist(),
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
