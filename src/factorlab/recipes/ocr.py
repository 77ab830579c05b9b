"""OCR recipes: one run, a rank sweep, and the max-margin analysis. Each writes JSON, PNG plots
and a short Markdown report into its output folder."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from factorlab.errors import GridCellsFailed
from factorlab.grid import run_grid
from factorlab.ocr import plots
from factorlab.ocr import theory as mm
from factorlab.ocr.task import OCRWorld
from factorlab.ocr.train import (
    SUMMARY_KEYS,
    OCRConfig,
    RunResult,
    check_group_memory,
    group_cost,
    group_runs,
    train_batched,
    train_runs,
)
from factorlab.progress import StepBars, console
from factorlab.reporting import Column, aggregate, write_table
from factorlab.runtime import atomic_write_text, machine_info, write_json, write_jsonl

RESULT_COLUMNS = [
    Column("model", "model"),
    Column("association", "association"),
    Column("seeds", "seeds"),
    Column("train_fact_acc", "train fact acc", "{:.3f}"),
    Column("train_impl_acc", "train impl acc", "{:.3f}"),
    Column("test_fact_acc", "test fact acc", "{:.3f}"),
    Column("test_impl_acc", "test impl acc", "{:.3f}"),
    Column("test_impl_loss", "test impl loss", "{:.3f}"),
    Column("hallucination_rate", "hallucination rate", "{:.3f}"),
    Column("nuclear_norm", "‖W_OV‖_*", "{:.1f}"),
    Column("frobenius_norm", "‖W_OV‖_F", "{:.1f}"),
    Column("effective_rank", "‖W‖_*/‖W‖_2", "{:.2f}"),
]
TABLE_METRICS = [*SUMMARY_KEYS, "effective_rank", "seconds"]


def train_with_progress(configs: Sequence[OCRConfig]) -> list[RunResult]:
    """``train_runs`` (in this process) with one progress bar per batched group."""
    with StepBars() as bars:

        def on_start(groups):
            names = [f"{g[0].label} ×{len(g)}" for g in groups]
            bars.start(names, [g[0].steps for g in groups])

        return train_runs(configs, on_progress=bars.update, on_start=on_start)


def record(result: RunResult) -> dict[str, Any]:
    """A flat record of one run: model label, seed, association, summary keys and full config."""
    c = result.config
    return {
        "model": c.label,
        "param": c.param,
        "d_h": c.hidden_dim,
        "seed": c.seed,
        "association": c.association,
        **result.summary,
    }


# ---- one run ------------------------------------------------------------------------------------


def run(config: OCRConfig, out: str | Path) -> dict[str, Any]:
    """Train one model; write metrics.jsonl, summary.json and curves.png into ``out``."""
    out = Path(out)
    result = train_with_progress([config])[0]
    write_jsonl(out / "metrics.jsonl", result.history)
    write_json(out / "summary.json", result.summary)
    title = f"{config.label}, {config.init} init, {config.association} association, seed {config.seed}"
    plots.run_curves(result.history, out / "curves.png", title, config.groups)
    return result.summary


# ---- rank sweep ---------------------------------------------------------------------------------


def sweep_configs(
    base: OCRConfig,
    d_hs: Sequence[int],
    combined: bool,
    seeds: Sequence[int],
    associations: Sequence[str] = ("causal",),
) -> list[OCRConfig]:
    configs = []
    for association in associations:
        for seed in seeds:
            for d_h in d_hs:
                configs.append(
                    dataclasses.replace(base, param="factorized", d_h=d_h, seed=seed, association=association)
                )
            if combined:
                configs.append(
                    dataclasses.replace(base, param="combined", d_h=None, seed=seed, association=association)
                )
    return configs


def group_cells(configs: Sequence[OCRConfig], batch: bool = True) -> list[dict[str, Any]]:
    """One grid cell per batched group (``batch=False``: per run), the costliest first so the slowest
    group does not start last."""
    groups = [[configs[i] for i in g] for g in group_runs(configs, batch)]
    groups.sort(key=lambda g: -group_cost(g))
    return [{"runs": [dataclasses.asdict(c) for c in g]} for g in groups]


def train_group_cell(cell: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Grid cell: one batched group of same-shape runs (see factorlab.grid)."""
    results = train_batched([OCRConfig(**c) for c in cell["runs"]])
    runs = [{"summary": r.summary, "history": r.history} for r in results]
    return {"runs": runs, "machine": machine_info()}  # the worker's: its kernels and threads


def _group_is_complete(summary: dict[str, Any], cell: dict[str, Any]) -> bool:
    runs = summary["runs"]
    return (
        isinstance(runs, list)
        and len(runs) == len(cell["runs"])
        and all(isinstance(r["summary"], dict) and isinstance(r["history"], list) for r in runs)
    )


train_group_cell.summary_is_complete = _group_is_complete  # a damaged summary is recomputed


def sweep(
    base: OCRConfig,
    d_hs: Sequence[int],
    combined: bool,
    seeds: Sequence[int],
    out: str | Path,
    workers: int | None = None,
    associations: Sequence[str] = ("causal",),
    backend: str = "local",
    address: str | None = None,
) -> list[dict[str, Any]]:
    """Rank sweep: every (d_h, seed) and optionally the combined model, same-shape runs batched.

    Each batched group is one grid cell (factorlab.grid): run in parallel on a local process pool or
    on Ray, written atomically as it finishes, and reused when the sweep is run again.
    Writes results.json (one record per run), metrics.jsonl (every evaluation of every run),
    table.{md,csv,json} (mean ± std over seeds), curves.png, accuracy_vs_dh.png and report.md.
    """
    out = Path(out)
    configs = sweep_configs(base, d_hs, combined, seeds, associations)
    cells = group_cells(configs)
    for cell in cells:  # before any worker starts
        check_group_memory([OCRConfig(**c) for c in cell["runs"]])
    started = time.perf_counter()
    with StepBars("OCR sweep") as bars:
        bars.start([f"{len(cells)} batched groups of {len(configs)} runs"], [len(cells)])
        grid = run_grid(
            "factorlab.recipes.ocr:train_group_cell",
            cells,
            out,
            workers,
            backend=backend,
            address=address,
            on_done=lambda done, total: bars.update(0, done),
        )
    if grid.failed:
        raise GridCellsFailed("OCR groups", grid.failed)
    wall = time.perf_counter() - started
    by_config = {
        OCRConfig(**c): RunResult(OCRConfig(**c), run["history"], run["summary"])
        for cell, res in zip(cells, grid.results)
        for c, run in zip(cell["runs"], res["runs"])
    }
    results = [by_config[c] for c in configs]  # the sweep's order, not the cells' (costliest first)
    records = [record(r) for r in results]
    write_json(out / "results.json", records)
    write_jsonl(
        out / "metrics.jsonl",
        (
            {"model": r.config.label, "seed": r.config.seed, "association": r.config.association, **row}
            for r in results
            for row in r.history
        ),
    )
    rows = aggregate(records, ["model", "param", "d_h", "association"], TABLE_METRICS)
    table = write_table(rows, RESULT_COLUMNS, out / "table")
    histories: dict[str, list] = {}
    for r in results:
        if r.config.association == associations[0]:
            histories.setdefault(r.config.label, []).append(r.history)
    title = f"{base.steps} steps, {len(seeds)} seed(s), {associations[0]} association"
    plots.sweep_curves(histories, out / "curves.png", base.groups, title)
    plots.accuracy_vs_dh(
        [r for r in rows if r["association"] == associations[0]],
        out / "accuracy_vs_dh.png",
        base.groups,
        f"generalization after {base.steps} steps",
    )
    machines = sorted({json.dumps(res.get("machine"), sort_keys=True) for res in grid.results})
    machine = [json.loads(m) for m in machines]
    machine_line = "; ".join(
        f"{m['cpu_capability']} kernels, torch {m['torch']}, {m['threads']} thread(s) per worker"
        if m
        else "unrecorded (cell from an older version)"
        for m in machine
    )
    report = [
        "# OCR rank sweep",
        "",
        f"{len(configs)} runs ({len(d_hs)} factorized d_h values{' + combined' if combined else ''} × "
        f"{len(seeds)} seeds × {len(associations)} association(s)), {base.steps} steps each, "
        f"trained in {wall:.0f} s wall-clock.",
        f"Same-shape runs trained as one batched model ({grid.line().replace('cells', 'groups')}). "
        "Accuracy is argmax over the whole vocabulary on a",
        f"fixed evaluation set covering every subject; chance on test implications is 1/{base.groups}.",
        f"Machine: {machine_line}.",
        "",
        table,
        "![test implication loss and accuracy](curves.png)",
        "",
        "![final accuracy against d_h](accuracy_vs_dh.png)",
        "",
        "Files: `results.json` (one record per run), `metrics.jsonl` (every evaluation), "
        "`table.{md,csv,json}`.",
        "",
    ]
    atomic_write_text(out / "report.md", "\n".join(report))
    write_json(
        out / "sweep.json",
        {
            "wall_seconds": wall,
            "runs": len(configs),
            "workers": workers,
            "backend": backend,
            "groups_ran": grid.ran,
            "groups_reused": grid.reused,
            "machine": machine,
        },
    )
    return records


# ---- max-margin analysis ------------------------------------------------------------------------


def theory(
    base: OCRConfig,
    out: str | Path,
    solver: str | None = None,
    competitors: str = "vocabulary",
    margin_cases: list[tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """Solve the nuclear- and Frobenius-norm max-margin programs on ``base``'s (small) instance,
    train a factorized and a combined model with attention fixed as in Theorem 1, and compare.
    ``competitors``: which tokens a margin compares the answer with (see factorlab.ocr.theory);
    ``margin_cases``: (m_train, m_test) pairs for the Theorem 2 table (default: MARGIN_CASES)."""
    out = Path(out)
    task = base.task
    mm.check_instance(task)
    world = OCRWorld(task, base.seed)
    problem = mm.MarginProblem.from_world(world, competitors)
    solutions = {}
    with console.status("solving the max-margin programs"):
        for norm in ("nuclear", "frobenius"):
            solutions[norm] = mm.solve_max_margin(problem, norm, solver)
        table = mm.margin_table(
            mm.MARGIN_CASES if margin_cases is None else margin_cases, task.groups, competitors, solver
        )
    configs = [
        dataclasses.replace(base, param=p, d_h=None, fixed_attention=True, record_w_ov=True)
        for p in ("factorized", "combined")
    ]
    trained = train_with_progress(configs)
    result: dict[str, Any] = {
        "instance": {
            "groups": task.groups,
            "subjects_per_group": task.subjects_per_group,
            "train_fraction": task.train_fraction,
            "train_subjects": task.num_train_subjects,
            "test_subjects": task.num_subjects - task.num_train_subjects,
        },
        "competitors": competitors,
        "theorem2_lower_bound_references": mm.theorem2_references(problem),
        "margin_table": table,
        "solutions": {norm: mm.describe_solution(problem, w) for norm, w in solutions.items()},
        "trained": {},
        "config": base.to_dict(),
    }
    for r in trained:
        block = mm.centred(mm.block_of(world, r.w_ov, problem), task.groups, competitors)
        described = mm.describe_solution(problem, block)
        described["cosine"] = {
            norm: mm.cosine(block, mm.centred(w, task.groups, competitors)) for norm, w in solutions.items()
        }
        described["test_impl_acc"] = r.summary["test_impl_acc"]
        described["trajectory"] = []
        for step, w_ov in r.w_ov_history:
            snapshot = mm.centred(mm.block_of(world, w_ov, problem), task.groups, competitors)
            described["trajectory"].append(
                {
                    "step": step,
                    **{
                        n: mm.cosine(snapshot, mm.centred(w, task.groups, competitors))
                        for n, w in solutions.items()
                    },
                }
            )
        result["trained"][r.config.param] = described
    write_json(out / "theory.json", result)
    plots.theory_figure(result, out / "theory.png")
    atomic_write_text(out / "report.md", theory_report(result))
    return result


def _training_line(config: dict[str, Any]) -> str:
    how = "plain gradient descent" if config.get("optimizer") == "gd" else "AdamW (the paper's trainer)"
    return (
        f"Models trained with {how}: lr {config['lr']}, weight decay {config['weight_decay']}, "
        f"{config['steps']} steps, init {config['init']}, batch {config['batch_size']}."
    )


def theory_report(result: dict[str, Any]) -> str:
    inst = result["instance"]
    refs = result["theorem2_lower_bound_references"]
    sols = result["solutions"]
    lines = [
        "# Max-margin analysis (Theorems 1 and 2)",
        "",
        f"Instance: {inst['groups']} groups × {inst['subjects_per_group']} subjects, "
        f"{inst['train_subjects']} train and {inst['test_subjects']} test subjects; attention fixed on the "
        "subject and relation tokens. Both programs require margin ≥ 1 on every training pair, against "
        + {
            "vocabulary": "every other token of the vocabulary (as the cross-entropy loss does)",
            "answers": "every other answer token",
            "relation": "the other answers of the same relation only",
        }[result.get("competitors", "relation")]
        + ".",
        "",
        _training_line(result["config"]),
        "",
        "| solution | min test-implication margin | ‖W‖_* | ‖W‖_F | rank |",
        "|---|---|---|---|---|",
    ]
    for name, s in sols.items():
        s = {**s, "min_test_margin": round(s["min_test_margin"], 6) + 0.0}  # print solver noise as 0
        lines.append(
            f"| min-{name} | {s['min_test_margin']:.4f} | {s['nuclear_norm']:.3f} | "
            f"{s['frobenius_norm']:.3f} | {s['rank']} |"
        )
    if refs.get("sqrt_form") is not None:
        lines += [
            "",
            f"Theorem 2 lower-bound forms quoted by summaries (m_train={refs['m_train']}, "
            f"m_test={refs['m_test']}): min(√(m_train/m_test), 1) = {refs['sqrt_form']:.3f}; "
            f"m_train/(m_train+m_test) = {refs['ratio_form']:.3f}.",
        ]
    if result.get("margin_table"):
        lines += [
            "",
            "Test margin (per unit training margin) of the solved programs, by train / test subjects "
            "per group:",
            "",
            "| m_train | m_test | min-nuclear | min-Frobenius | min(√(m_train/m_test), 1) | "
            "m_train/(m_train+m_test) |",
            "|---|---|---|---|---|---|",
        ]
        for row in result["margin_table"]:
            lines.append(
                f"| {row['m_train']} | {row['m_test']} | {row['nuclear_test_margin']:.4f} | "
                f"{round(row['frobenius_test_margin'], 6) + 0.0:.4f} | {row['sqrt_form']:.4f} | "
                f"{row['ratio_form']:.4f} |"
            )
    lines += [
        "",
        "| trained model | test impl acc | test margin / train margin | cos vs min-nuclear | "
        "cos vs min-Frobenius |",
        "|---|---|---|---|---|",
    ]
    for name, t in result["trained"].items():
        lines.append(
            f"| {name} | {t['test_impl_acc']:.3f} | {t['normalized_test_margin']:.3f} | "
            f"{t['cosine']['nuclear']:.4f} | {t['cosine']['frobenius']:.4f} |"
        )
    trajectories = {n: t.get("trajectory") or [] for n, t in result["trained"].items()}
    if all(trajectories.values()):
        lines += ["", "Cosine with the min-nuclear / min-Frobenius solution over training:", ""]
        lines += ["| step | " + " | ".join(trajectories) + " |", "|---" * (1 + len(trajectories)) + "|"]
        first = next(iter(trajectories.values()))
        picks = sorted({0, len(first) // 10, len(first) // 4, len(first) // 2, len(first) - 1})
        for i in picks:
            cells = [f"{t[i]['nuclear']:.3f} / {t[i]['frobenius']:.3f}" for t in trajectories.values()]
            lines.append(f"| {first[i]['step']} | " + " | ".join(cells) + " |")
    verdicts = []
    for name, t in result["trained"].items():
        closer = max(t["cosine"], key=t["cosine"].get)
        verdicts.append(f"the trained {name} model points closer to the min-{closer} solution")
    lines += [
        "",
        "Reading: " + "; ".join(verdicts) + ". The Frobenius solution's test margin is "
        f"{round(sols['frobenius']['min_test_margin'], 6) + 0.0:.2g}, the nuclear one's "
        f"{sols['nuclear']['min_test_margin']:.3f}.",
        "",
        "![cosines and spectra](theory.png)",
        "",
    ]
    return "\n".join(lines)
