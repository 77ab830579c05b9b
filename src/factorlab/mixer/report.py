"""The LoRA-Mixer lab's reports: the comparison's tables, plots and report.md rebuilt from its cells
(``write_comparison``, also behind ``factorlab report``), and the two workflows' short reports."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from factorlab.cells import cell_id, load_summary
from factorlab.reporting import Column, aggregate, t_quantile_975, write_table
from factorlab.runtime import atomic_write_text, write_json

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
    "HydraLoRA (shared A, routed Bs)",
    "MixLoRA (top-2 FFN experts)",
    "LoRAHub (gradient-free merge)",
    "MoLE (layer gates)",
    "Arrow (training-free)",
)


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
    evaluation: dict[str, list[dict[str, Any]]] = {}
    for s in done:
        for name, cost in s["systems"].items():
            train_s = cost["seconds"] + cost.get("stage1_seconds", 0.0)
            costs.setdefault(name, []).append(
                {
                    "trainable": cost["trainable"],
                    "train_s": train_s,
                    # the last stage's throughput: stage 1 has its own row (the oracle experts)
                    "tok_s": cost["tokens"] / cost["seconds"] if cost["seconds"] else None,
                    "peak_mb": cost["peak_memory_bytes"] / 2**20 if cost.get("peak_memory_bytes") else None,
                }
            )
        for name, route in s.get("routing", {}).items():
            routes.setdefault(name, []).append(route)
        for name, ev in s.get("evaluation", {}).items():  # cells made before it was measured have none
            if ev["seconds"]:
                tokens = ev.get("prompt", 0) + ev.get("generated", 0)
                evaluation.setdefault(name, []).append({"eval_tok_s": tokens / ev["seconds"]})
    rows = []
    means = seed_means(records)
    for system in systems:
        row: dict[str, Any] = {"system": system}
        for r in by_task:
            if r["system"] == system:
                row[r["task"]] = r["accuracy"]
        row["mean"] = aggregate([{"m": m} for m in means[system].values()], [], ["m"])[0]["m"]
        row["seeds"] = len(means[system])
        if system in costs:
            cost = aggregate(costs[system], [], ["trainable", "train_s", "tok_s", "peak_mb"])[0]
            row["trainable"], row["train_s"] = cost["trainable"].mean, cost["train_s"]
            row["tok_s"] = cost["tok_s"] if system != "base" else None
            row["peak_mb"] = cost["peak_mb"]
        if system in evaluation:
            row["eval_tok_s"] = aggregate(evaluation[system], [], ["eval_tok_s"])[0]["eval_tok_s"]
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
        # measured in cells since session 16: older cells' tables keep their columns
        *([Column("peak_mb", "train peak MB", "{:.0f}")] if any(r.get("peak_mb") for r in rows) else []),
        *([Column("eval_tok_s", "eval tokens/s", "{:.0f}")] if evaluation else []),
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
        "real tokens of the last training stage per second; *train peak MB*: the most memory held while "
        "training (the process's resident set, sampled every 10 ms, base model included; on a GPU the "
        "device's peak); *eval tokens/s*: prompt tokens read plus answer tokens generated per second of "
        "evaluation (greedy, the system's own generation path).",
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
    report += paired_section(records, systems, out)
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


def seed_means(records: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """Per system, per seed: the mean accuracy over tasks (the table's "mean" and the paired differences)."""
    per_seed: dict[str, dict[int, list[float]]] = {}
    for rec in records:
        per_seed.setdefault(rec["system"], {}).setdefault(rec["seed"], []).append(rec["accuracy"])
    return {name: {seed: sum(v) / len(v) for seed, v in seeds.items()} for name, seeds in per_seed.items()}


PAIRED_REFERENCES = ("LoRA-Mixer joint (top-k)", "LoRA-Mixer plug-and-play (top-k)")


def paired_differences(
    records: list[dict[str, Any]], systems: Sequence[str], references: Sequence[str] = PAIRED_REFERENCES
) -> list[dict[str, Any]]:
    """Each reference system against every other system, paired by seed: the per-seed difference of
    mean accuracy over tasks (reference minus system), its mean, 95% Student's t interval over the
    common seeds (none from one seed), and on how many seeds the reference is ahead."""
    means = seed_means(records)
    rows = []
    for reference in (r for r in references if r in means):
        for system in (s for s in systems if s != reference and s in means):
            seeds = sorted(set(means[reference]) & set(means[system]))
            if not seeds:
                continue
            diffs = [means[reference][k] - means[system][k] for k in seeds]
            mean = statistics.fmean(diffs)
            half = None
            if len(diffs) > 1:
                half = t_quantile_975(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
            rows.append(
                {
                    "reference": reference,
                    "system": system,
                    "seeds": len(seeds),
                    "difference": mean,
                    "low": None if half is None else mean - half,
                    "high": None if half is None else mean + half,
                    "ahead": f"{sum(d > 0 for d in diffs)}/{len(diffs)}",
                }
            )
    return rows


def paired_section(records: list[dict[str, Any]], systems: Sequence[str], out: Path) -> list[str]:
    """paired.md (LoRA-Mixer against each system, in report.md) and paired_all.md (every ordered pair of
    systems, for statements about the others)."""

    def columns(first: str) -> list[Column]:
        return [
            Column("reference", first),
            Column("system", "against"),
            Column("difference", "paired difference", "{:+.3f}"),
            Column("low", "95% CI low", "{:+.3f}"),
            Column("high", "95% CI high", "{:+.3f}"),
            Column("ahead", "ahead on seeds"),
            Column("seeds", "seeds"),
        ]

    table = write_table(paired_differences(records, systems), columns("LoRA-Mixer"), out / "paired")
    write_table(paired_differences(records, systems, systems), columns("system"), out / "paired_all")
    return [
        "## LoRA-Mixer against each system, paired by seed",
        "",
        "Mean accuracy over tasks, LoRA-Mixer minus the system, per seed; the mean difference with a 95% "
        "Student's t interval over the seeds both have (an interval that holds 0 does not separate them); "
        "every other pair of systems is in paired_all.md:",
        "",
        table,
    ]


def mixer_verdict(rows: list[dict[str, Any]], tasks: Sequence[str]) -> str:
    by_name = {r["system"]: r for r in rows}
    single, mixer = by_name.get("multi-task LoRA (equal total rank)"), by_name.get("LoRA-Mixer joint (top-k)")
    if single is None or mixer is None:
        missing = "multi-task LoRA" if single is None else "joint mixer"
        return f"no verdict: these cells hold no {missing} (left out with skip, or not run yet)."
    better = [t for t in tasks if mixer[t].mean > single[t].mean]
    worse = [t for t in tasks if mixer[t].mean < single[t].mean]
    return (
        f"LoRA-Mixer joint (top-k) beats the multi-task LoRA of equal total rank on {better or 'no task'} "
        f"and is behind it on {worse or 'no task'}."
    )


def workflow_report(
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
