"""Knowledge-injection recipes: does fine-tuning on new facts generalize or hallucinate, and how
does the adaptation method change it?

``inject_cell`` is one relation x method x seed: generate a world, measure ranks before,
fine-tune on the world's training texts, measure ranks after. ``grid`` runs many cells in
parallel, resumably, and writes a paper-style table and plots.

Metric (as in the paper): the rank (0 = best) of the correct answer's first-token logit among the
relation's candidate answers, averaged over queries of one kind: training facts (all subjects,
training phrasings), test facts (a held-out phrasing), bridge implications (trained), and test
implications (never shown). For a non-causal relation a low test-implication rank is
hallucination: the model asserts a link the world does not have.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from factorlab.distributed import is_main
from factorlab.errors import ConfigError
from factorlab.grid import run_grid
from factorlab.inject.backends import Backend, load_backend
from factorlab.inject.train import METHODS, FineTuneSettings, fine_tune, total_steps
from factorlab.inject.world import BUILTIN_RELATIONS, Relation, World, load_relations, relation_by_name
from factorlab.progress import StepBars, console
from factorlab.reporting import Column, aggregate, mean_std, write_table
from factorlab.runtime import atomic_write_text, write_json

KINDS = ("train_fact", "test_fact", "train_implication", "test_implication")
CHANCE_MARGIN = 0.25  # a drop in mean rank smaller than this is not counted as transfer


@dataclasses.dataclass
class InjectConfig:
    model: str = "tiny"
    relation: str = "city-language"
    method: str = "lora"
    r: int = 4
    lora_alpha: float = 8.0
    seed: int = 0
    lr: float | None = None
    epochs: int | None = None
    num_subjects: int = 100
    bridge_fraction: float = 0.2
    relations_file: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}.")
        if self.r < 1:
            raise ConfigError(f"r must be >= 1, got {self.r}.")
        relation_by_name(self.relation, self.extra_relations())  # fails fast on an unknown relation

    def extra_relations(self) -> dict[str, Relation]:
        return load_relations(self.relations_file) if self.relations_file else {}


@functools.lru_cache(maxsize=2)
def cached_backend(model: str, relations_file: str | None) -> Backend:
    """One backend per worker process (the tiny one is built from every known relation)."""
    extra = load_relations(relations_file) if relations_file else {}
    return load_backend(model, {**BUILTIN_RELATIONS, **extra})


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def verdict(relation: Relation, before: float | None, after: float | None) -> str:
    """Transfer = the test-implication rank ends clearly below both its start and chance level."""
    chance = (len(relation.pairs) - 1) / 2
    if before is None or after is None or after > min(before, chance) - CHANCE_MARGIN:
        return "no out-of-context transfer"
    return "generalization" if relation.causal else "hallucination"


def inject_cell(cell: dict[str, Any], folder: Path, progress=None) -> dict[str, Any]:
    """One relation x method x seed; writes ranks.json into ``folder`` and returns the summary."""
    cfg = InjectConfig(**cell)
    started = time.perf_counter()
    relation = relation_by_name(cfg.relation, cfg.extra_relations())
    backend = cached_backend(cfg.model, cfg.relations_file)
    backend.check_candidates(relation.fact_answers)
    backend.check_candidates(relation.implication_answers)
    world = World.generate(relation, cfg.seed, cfg.num_subjects, cfg.bridge_fraction)
    queries = world.queries()
    before = backend.ranks(backend.model, queries)
    settings = FineTuneSettings(cfg.method, cfg.r, cfg.lora_alpha, cfg.lr, cfg.epochs, seed=cfg.seed)
    model, losses = fine_tune(backend, world, settings, progress)
    after = backend.ranks(model, queries)
    summary: dict[str, Any] = {}
    for kind in KINDS:
        summary[f"{kind}_rank"] = mean([r for q, r in zip(queries, after) if q.kind == kind])
        summary[f"{kind}_rank_before"] = mean([r for q, r in zip(queries, before) if q.kind == kind])
    lr, epochs, batch = settings.resolved(backend)
    summary |= {
        "num_candidates": len(relation.pairs),
        "causal": relation.causal,
        "verdict": verdict(
            relation, summary["test_implication_rank_before"], summary["test_implication_rank"]
        ),
        "final_loss": losses[-1],
        "steps": len(losses),
        "seconds": time.perf_counter() - started,
        "config": {**dataclasses.asdict(cfg), "lr": lr, "epochs": epochs, "batch_size": batch},
        "world": {
            "subjects": len(world.subjects),
            "bridge": len(world.bridge),
            "test": len(world.test),
            "training_texts": len(world.training_texts()),
        },
    }
    if is_main():  # under torchrun / accelerate only rank 0 writes
        rows = [
            {
                "kind": q.kind,
                "subject": q.subject,
                "prompt": q.prompt,
                "answer": q.answer,
                "rank_before": b,
                "rank": a,
            }
            for q, b, a in zip(queries, before, after)
        ]
        write_json(folder / "ranks.json", rows)
    return summary


def run(cfg: InjectConfig, out: str | Path) -> dict[str, Any]:
    """`factorlab inject run`: one cell into ``out`` (summary.json, ranks.json)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    backend = cached_backend(cfg.model, cfg.relations_file)
    world = World.generate(
        relation_by_name(cfg.relation, cfg.extra_relations()), cfg.seed, cfg.num_subjects, cfg.bridge_fraction
    )
    steps = total_steps(
        backend, world, FineTuneSettings(cfg.method, cfg.r, cfg.lora_alpha, cfg.lr, cfg.epochs, seed=cfg.seed)
    )
    with StepBars(f"{cfg.method} on {cfg.relation}") as bars:
        bars.start([f"{cfg.method}, {cfg.relation}, seed {cfg.seed}"], [steps])
        summary = inject_cell(dataclasses.asdict(cfg), out, progress=lambda s: bars.update(0, s))
    if is_main():
        write_json(out / "summary.json", summary)
    return summary


# ---- grids ------------------------------------------------------------------------------------------


def grid_cells(
    model: str,
    relations: Sequence[str],
    methods: Sequence[str],
    seeds: Sequence[int],
    r: int,
    rank_sweep: Sequence[int] = (),
    relations_file: str | None = None,
    **fixed: Any,
) -> list[dict]:
    cells = []
    for relation in relations:
        for seed in seeds:
            for method in methods:
                cells.append({"model": model, "relation": relation, "method": method, "r": r, "seed": seed})
            for rank in rank_sweep:
                if not ("lora" in methods and rank == r):
                    cells.append(
                        {"model": model, "relation": relation, "method": "lora", "r": rank, "seed": seed}
                    )
    for cell in cells:  # the scale is part of the cell id: results with another scale are never reused
        cell["lora_alpha"] = 8.0
    for cell in cells:
        if relations_file:
            cell["relations_file"] = relations_file
        cell.update({k: v for k, v in fixed.items() if v is not None})
        InjectConfig(**cell)  # validate every cell before any work starts
    return cells


def grid(
    cells: list[dict],
    out: str | Path,
    workers: int | None = None,
    backend: str = "local",
    address: str | None = None,
    retries: int = 1,
) -> dict[str, Any]:
    """`factorlab inject grid`: run (or reuse) every cell, then write results.json, table.{md,csv,json},
    ranks.png, rank_sweep.png and report.md."""
    out = Path(out)
    models = {c["model"] for c in cells}
    if "tiny" in models:  # build the cached tiny backend once, before workers race to build it
        with console.status("preparing the tiny backend"):
            cached_backend("tiny", cells[0].get("relations_file"))
    started = time.perf_counter()
    with StepBars("injection grid") as bars:
        bars.start([f"{len(cells)} cells"], [len(cells)])
        report = run_grid(
            "factorlab.recipes.inject:inject_cell",
            cells,
            out,
            workers,
            retries,
            backend,
            address,
            on_done=lambda done, total: bars.update(0, done),
        )
    for cell, error in report.failed:
        console.print(f"[red]cell failed[/] {cell}: {error}")
    return write_grid_report(out, report, time.perf_counter() - started)


def method_label(cfg: dict[str, Any]) -> str:
    return (
        f"lora r={cfg['r']}"
        if cfg["method"] == "lora"
        else (f"lora-mixer r={cfg['r']}" if cfg["method"] == "lora-mixer" else cfg["method"])
    )


def write_grid_report(out: Path, report, seconds: float) -> dict[str, Any]:
    from factorlab.recipes import inject_plots

    records = []
    for s in report.results:
        cfg = s["config"]
        records.append(
            {
                "relation": cfg["relation"],
                "method": method_label(cfg),
                "seed": cfg["seed"],
                "r": cfg["r"],
                "causal": s["causal"],
                **{k: s.get(k) for k in s if k.endswith("rank") or k.endswith("rank_before")},
                "verdict": s["verdict"],
                "seconds": s["seconds"],
            }
        )
    write_json(
        out / "results.json",
        {
            "records": records,
            "ran": report.ran,
            "reused": report.reused,
            "retried": report.retried,
            "failed": [c for c, _ in report.failed],
            "seconds": seconds,
        },
    )
    relations = list(dict.fromkeys(r["relation"] for r in records))
    methods = list(dict.fromkeys(r["method"] for r in records))
    causal = {r["relation"]: r["causal"] for r in records}
    agg = aggregate(
        records, ["method", "relation"], [f"{k}_rank" for k in KINDS] + [f"{k}_rank_before" for k in KINDS]
    )
    rows = [
        {
            "method": "before fine-tuning",
            **{
                rel: mean_std([r["test_implication_rank_before"] for r in records if r["relation"] == rel])
                for rel in relations
            },
        }
    ]
    for method in methods:
        row: dict[str, Any] = {"method": method}
        for a in agg:
            if a["method"] == method:
                row[a["relation"]] = a["test_implication_rank"]
        rows.append(row)
    headers = {rel: f"{rel} ({'generalization' if causal[rel] else 'hallucination'})" for rel in relations}
    columns = [Column("method", "method"), *(Column(rel, headers[rel], "{:.2f}") for rel in relations)]
    table = write_table(rows, columns, out / "table")
    fact_rows = []
    for method in methods:
        row = {"method": method}
        for a in agg:
            if a["method"] == method:
                row[a["relation"]] = a["train_fact_rank"]
        fact_rows.append(row)
    fact_table = write_table(
        fact_rows,
        [Column("method", "method"), *(Column(rel, rel, "{:.2f}") for rel in relations)],
        out / "train_fact_table",
    )
    inject_plots.ranks_by_relation(rows, relations, causal, out / "ranks.png")
    sweep = [r for r in records if r["method"].startswith("lora r=")]
    has_sweep = len({r["r"] for r in sweep}) > 1
    if has_sweep:
        inject_plots.rank_sweep(records, relations, causal, out / "rank_sweep.png")
    lines = [
        "# Knowledge injection: generalization or hallucination?",
        "",
        f"{report.line()} in {seconds:.0f} s. Mean rank (0 = best; uniform guessing among "
        f"{_num_candidates(report)} candidates gives {(_num_candidates(report) - 1) / 2:.1f}) of the correct "
        "answer's first-token logit among the candidates, mean ± std over seeds.",
        "",
        "## Test implications (never shown in training)",
        "",
        "For the causal relation a low rank is **generalization**; for the others, whose association "
        "exists only among the bridge subjects, the same low rank is **hallucination**.",
        "",
        table,
        "![ranks](ranks.png)",
        "",
        "## Training facts (memorisation)",
        "",
        fact_table,
    ]
    if has_sweep:
        lines += ["## LoRA rank sweep against full fine-tuning", "", "![rank sweep](rank_sweep.png)", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    return {"records": records, "rows": rows, "report": report}


def _num_candidates(report) -> int:
    return report.results[0]["num_candidates"] if report.results else 0
