"""The fact-injection grid's report: results.json, the tables (mean and 95% interval over runs), the
plots and report.md, from the cells' summaries (a running grid's, or ``factorlab report``'s)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from factorlab.inject.tiny import PROBE_THRESHOLD
from factorlab.inject.train import DEFAULTS, METHODS
from factorlab.reporting import Column, aggregate, mean_std, unit_means, write_table
from factorlab.runtime import atomic_write_text, write_json

KINDS = ("train_fact", "test_fact", "train_implication", "test_implication")
# The paper's LLM table (Huang et al., 2025): mean rank of test implications after full fine-tuning,
# 3 seeds, 7-9B models; quoted beside real-model grids for shape, not comparable in absolute terms.
PAPER_LLM_RANKS = {
    "Gemma-2-9B": (0.00, 0.19, 0.19, 1.64, 0.56),
    "OLMo-7B": (0.07, 1.33, 0.15, 1.84, 0.17),
    "Qwen-2-7B": (0.13, 4.55, 3.63, 0.82, 0.40),
    "Mistral-7B-v0.3": (0.00, 2.10, 1.48, 1.15, 1.28),
    "Llama-3-8B": (0.00, 1.18, 0.77, 0.93, 0.63),
}
PAPER_RELATIONS = ("city-language", "city-language-cf", "country-code", "profession-color", "sport-music")
MEMORISED = 0.5  # a cell memorised its training facts when their mean rank is at most this


def method_label(cfg: dict[str, Any]) -> str:
    """The method as a table row names it; a learning rate or number of epochs other than the method's
    default (an lr / epochs sweep) is part of the label, so such cells never average with the default's."""
    method = cfg["method"]
    label = f"{method} r={cfg['r']}" if method in ("lora", "lora-mixer") else method
    defaults = DEFAULTS["tiny" if cfg.get("model") == "tiny" else "hf"].get(method)
    if defaults is not None:
        lr, epochs = cfg.get("lr"), cfg.get("epochs")
        if lr is not None and not math.isclose(lr, defaults[0], rel_tol=1e-9):
            label += f" lr={lr:g}"
        if epochs is not None and epochs != defaults[1]:
            label += f" epochs={epochs}"
    return label


def memorised(record: dict[str, Any]) -> bool:
    fact = record["train_fact_rank"]
    return fact is not None and fact <= MEMORISED


def _record(summary: dict[str, Any]) -> dict[str, Any]:
    cfg = summary["config"]
    return {
        "model": cfg["model"],
        "relation": cfg["relation"],
        "method": method_label(cfg),
        "setup": method_label({**cfg, "lr": None, "epochs": None}),
        "lr": cfg.get("lr"),
        "epochs": cfg.get("epochs"),
        "pretrain_seed": cfg.get("pretrain_seed", 0),
        "seed": cfg["seed"],
        "r": cfg["r"],
        "causal": summary["causal"],
        **{k: summary.get(k) for k in summary if k.endswith("rank") or k.endswith("rank_before")},
        "probe_accuracy": (summary.get("probe") or {}).get("accuracy"),
        "verdict": summary["verdict"],
        "seconds": summary["seconds"],
        "cpu_capability": (summary.get("machine") or {}).get("cpu_capability"),
        "gpu": (summary.get("machine") or {}).get("gpu"),
    }


def independent_unit(records: list[dict[str, Any]]) -> str | None:
    """The unit a table's intervals are over: the pretrained backend when a grid has several (its
    fine-tuning seeds share it, so they are not independent), else the run."""
    return "pretrain_seed" if len({r["pretrain_seed"] for r in records}) > 1 else None


def interval_method(unit: str | None, runs: int, pretrain_seeds: list, seeds: list) -> str:
    """How every table's intervals were computed, in words (said once per report, above the tables)."""
    if unit == "pretrain_seed":
        return (
            f"Each entry: mean ± half-width of the 95% confidence interval (Student's t) with the "
            f"pretrained backend as the independent unit: {len(pretrain_seeds)} backends (pretraining "
            f"seeds {pretrain_seeds}), each the mean of its {len(seeds)} fine-tuning seeds {seeds} "
            f"({runs} runs in all), so n = {len(pretrain_seeds)}."
        )
    return (
        f"Each entry: mean ± half-width of the 95% confidence interval (Student's t) over {runs} runs "
        f"(fine-tuning seeds {seeds} of one base model), so n = {runs}."
    )


def write_grid_report(out: Path, report, seconds: float, cell_seconds: bool = False) -> dict[str, Any]:
    """results.json, table.{md,csv,json} (mean ± 95% CI over every run), plots and report.md."""
    from factorlab.inject import plots as inject_plots

    records = [_record(s) for s in report.results]
    machines = sorted(
        {json.dumps(s.get("machine", {}), sort_keys=True) for s in report.results if s.get("machine")}
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
            "machines": [json.loads(m) for m in machines],
        },
    )
    relations = list(dict.fromkeys(r["relation"] for r in records))
    # one row order however the records were gathered (a running grid, or `factorlab report`)
    order = {m: i for i, m in enumerate(METHODS)}
    # by method, rank, then label (a sweep's lr / epochs rows after the default's)
    kinds = {r["method"]: (order[r["method"].split(" ")[0]], r["r"], r["method"]) for r in records}
    methods = sorted(kinds, key=kinds.get)
    causal = {r["relation"]: r["causal"] for r in records}
    unit = independent_unit(records)
    agg = aggregate(
        records,
        ["method", "relation"],
        [f"{k}_rank" for k in KINDS] + [f"{k}_rank_before" for k in KINDS],
        unit=unit,
    )
    # the before-rank does not depend on the method: count each (pretraining seed, seed) once
    before: dict[tuple, dict[str, Any]] = {}
    for r in records:
        before.setdefault((r["relation"], r["pretrain_seed"], r["seed"]), r)
    rows = [
        {
            "method": "before fine-tuning",
            **{
                rel: mean_std(
                    unit_means(
                        [v for (x, _, _), v in before.items() if x == rel],
                        "test_implication_rank_before",
                        unit,
                    )
                )
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
    probe_row = {
        "method": "background probe (accuracy)",
        **{
            rel: mean_std(unit_means([r for r in records if r["relation"] == rel], "probe_accuracy", unit))
            for rel in relations
        },
    }
    headers = {rel: f"{rel} ({'generalization' if causal[rel] else 'hallucination'})" for rel in relations}
    columns = [
        Column("method", "method"),
        *(Column(rel, headers[rel], "{:.2f}", ci=True) for rel in relations),
    ]
    table = write_table(rows, columns, out / "table")
    fact_rows = []
    for method in methods:
        row = {"method": method}
        for a in agg:
            if a["method"] == method:
                row[a["relation"]] = a["train_fact_rank"]
        fact_rows.append(row)
    fact_table = write_table(
        [*fact_rows, probe_row],
        [Column("method", "method"), *(Column(rel, rel, "{:.2f}", ci=True) for rel in relations)],
        out / "train_fact_table",
    )
    inject_plots.ranks_by_relation(rows, relations, causal, out / "ranks.png")
    sweep = [r for r in records if r["method"].startswith("lora r=") and r["method"] == r["setup"]]
    has_sweep = len({r["r"] for r in sweep}) > 1
    if has_sweep:
        inject_plots.rank_sweep(records, relations, causal, out / "rank_sweep.png")
    pretrain_seeds = sorted({r["pretrain_seed"] for r in records})
    seeds = sorted({r["seed"] for r in records})
    runs = max((a["seeds"] for a in agg), default=0)
    chance = (_num_candidates(report) - 1) / 2
    low_probe = sorted(
        {
            r["relation"]
            for r in records
            if r["probe_accuracy"] is not None and r["probe_accuracy"] < PROBE_THRESHOLD
        }
    )
    timing = "summed over cells" if cell_seconds else "wall time"
    lines = [
        "# Knowledge injection: generalization or hallucination?",
        "",
        f"{report.line()}; {seconds:.0f} s ({timing}). Mean rank (0 = best) of the correct answer's "
        f"first-token logit among the {_num_candidates(report)} candidate answers; guessing gives "
        f"{chance:.1f}. {interval_method(unit, runs, pretrain_seeds, seeds)}",
        "",
        "## Test implications (never shown in training)",
        "",
        "For the causal relation a low rank is **generalization**; for the others, whose association "
        "exists only among the bridge subjects, the same low rank is **hallucination**.",
        "",
        table,
        "![ranks](ranks.png)",
        "",
        "## Training facts (memorisation) and background knowledge",
        "",
        "Mean rank of the trained facts after fine-tuning, and the background-knowledge probe before it: "
        'the share of the world\'s known pairs ("People in Paris speak" -> French) the base model '
        "ranks first. Relations without background knowledge have no probe (–).",
        "",
        fact_table,
    ]
    if low_probe:
        lines += [
            f"**Warning:** the base model fails the background probe (< {PROBE_THRESHOLD}) on "
            f"{', '.join(low_probe)}; read those columns with care.",
            "",
        ]
    unlearned = [r for r in records if not memorised(r)]
    lines += [
        f"Every cell memorised its training facts (train-fact rank <= {MEMORISED}), {len(records)} of "
        f"{len(records)}."
        if not unlearned
        else f"**{len(unlearned)} of {len(records)} cells did not memorise their training facts** "
        f"(train-fact rank > {MEMORISED}): "
        + "; ".join(
            f"{r['relation']} {r['method']} pretraining seed {r['pretrain_seed']} seed {r['seed']} "
            f"({r['train_fact_rank']:.2f})"
            for r in unlearned
        ),
        "",
    ]
    lines += measures_sections(out, report.results, records, methods, relations, unit)
    lines += _lr_epochs_lines(records, relations, unit, out)
    if has_sweep:
        lines += ["## LoRA rank sweep against full fine-tuning", "", "![rank sweep](rank_sweep.png)", ""]
    if any(r["model"] != "tiny" for r in records):
        shown = [rel for rel in PAPER_RELATIONS if rel in relations]
        lines += [
            "## The paper's LLMs, for shape",
            "",
            "Huang et al. (2025), full fine-tuning of 7-9B models, 3 seeds, mean test-implication rank "
            "(their setup, not comparable in absolute terms):",
            "",
            "| model | " + " | ".join(shown) + " |",
            "|---|" + "---|" * len(shown),
            *(
                f"| {name} | "
                + " | ".join(f"{ranks[PAPER_RELATIONS.index(rel)]:.2f}" for rel in shown)
                + " |"
                for name, ranks in PAPER_LLM_RANKS.items()
            ),
            "",
        ]
    lines += ["## Machines", "", *(f"- `{m}`" for m in machines), ""]
    lines += ["## Every cell", "", *_cell_lines(records), ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    return {"records": records, "rows": rows, "report": report}


def measures_sections(
    out: Path,
    summaries: list[dict[str, Any]],
    records: list[dict[str, Any]],
    methods: list[str],
    relations: list[str],
    unit: str | None,
) -> list[str]:
    """The report's sections on what cells measure beside final ranks (cells made before these
    measurements have none; a section appears when some cell has its measurement)."""
    from factorlab.inject import analysis
    from factorlab.inject import plots as inject_plots

    lines: list[str] = []
    means = analysis.curve_means(summaries, method_label)
    if means:
        inject_plots.curves(means, relations, out / "curves.png")
        lines += [
            "## During training",
            "",
            f"Mean ranks at {len(next(iter(means.values()))) - 1} points of training (the first "
            "32 queries of each kind; averaged over cells point by point). 'memorised at': the first point "
            f"where the training facts' rank is <= {MEMORISED}.",
            "",
            "| method | relation | memorised at (share of training) | test implication then | at the end |",
            "|---|---|---|---|---|",
        ]
        for (method, relation), points in sorted(means.items()):
            first = next(
                (p for p in points if p["train_fact"] is not None and p["train_fact"] <= MEMORISED), None
            )
            then = "–" if first is None else f"{first['test_implication']:.2f}"
            at = "never" if first is None else f"{first['share']:.2f}"
            lines.append(f"| {method} | {relation} | {at} | {then} | {points[-1]['test_implication']:.2f} |")
        lines += ["", "![curves](curves.png)", ""]
    known = [dict(r, **s["known"]) for r, s in zip(records, summaries) if s.get("known")]
    if known:
        agg = aggregate(known, ["method"], ["top1_before", "top1_after", "top1_drop"], unit=unit)
        rows = [
            {"method": a["method"], **{k: a[k] for k in ("top1_before", "top1_after", "top1_drop")}}
            for a in agg
        ]
        table = write_table(
            rows,
            [
                Column("method", "method"),
                Column("top1_before", "known facts ranked first, before", "{:.3f}", ci=True),
                Column("top1_after", "after", "{:.3f}", ci=True),
                Column("top1_drop", "drop", "{:.3f}", ci=True),
            ],
            out / "known_table",
        )
        lines += [
            "## What the base model knew",
            "",
            f"{known[0]['queries']} facts the base model was asked before and after each cell, unrelated to "
            "the injected world (every relation's background knowledge; on the tiny backend also 20 "
            "pretraining people per relation): the share ranked first. Intervals as above.",
            "",
            table,
        ]
    points = analysis.spectrum_points(summaries, method_label)
    if points:
        measure = "nuclear / Frobenius"
        inject_plots.spectrum_scatter(points, measure, out / "spectrum.png")
        lines += [
            "## The update's spectrum against out-of-context transfer",
            "",
            "The OCR paper's mechanism predicts that updates of lower nuclear norm reach lower test-"
            "implication ranks (a positive correlation), for causal and non-causal relations alike. "
            f"Pearson's r over cells, 95% bootstrap interval ({analysis.BOOTSTRAP} resamples of cells; none "
            f"under {analysis.MIN_CELLS} cells). The first rows compare each cell only with the other seeds "
            "of its setup (same base model, method and relation; measure and rank minus their group's "
            "means): the mechanism's claim in its sharpest form. Across all methods the comparison is "
            "partly between methods (full fine-tuning's updates are dense and large); the rows of one "
            "method compare its cells across relations too:",
            "",
            "| cells of | relation kind | measure | cells | r | 95% interval | reading |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in analysis.spectrum_correlations(points):
            r = "–" if row["r"] is None else f"{row['r']:+.2f}"
            interval = (
                "–" if row["interval"] is None else f"[{row['interval'][0]:+.2f}, {row['interval'][1]:+.2f}]"
            )
            reading = analysis.verdict_of(row)
            lines.append(
                f"| {row['method']} | {row['kind']} | {row['measure']} | {row['cells']} | {r} | {interval} | "
                f"{reading} |"
            )
        lines += ["", "![spectrum](spectrum.png)", ""]
    return lines


def _lr_epochs_lines(
    records: list[dict[str, Any]], relations: list[str], unit: str | None, out: Path
) -> list[str]:
    """Where a grid sweeps learning rate or epochs (``inject grid --lr-scales --epochs-sweep``): per
    method, the test-implication rank at each (learning rate, epochs), relations side by side, with the
    training facts' rank beside it (did the longer or faster run memorise more, and did it move the
    implications?)."""
    setups = [s for s in dict.fromkeys(r["setup"] for r in records)]
    lines: list[str] = []
    for setup in setups:
        mine = [r for r in records if r["setup"] == setup and r["lr"] is not None]
        settings = sorted({(r["lr"], r["epochs"]) for r in mine})
        if len(settings) < 2:
            continue
        agg = aggregate(
            mine, ["lr", "epochs", "relation"], ["test_implication_rank", "train_fact_rank"], unit=unit
        )
        rows = []
        for lr, epochs in settings:
            row: dict[str, Any] = {"lr": f"{lr:g}", "epochs": epochs}
            for a in agg:
                if (a["lr"], a["epochs"]) == (lr, epochs):
                    row[a["relation"]] = a["test_implication_rank"]
                    row[f"{a['relation']} facts"] = a["train_fact_rank"]
            rows.append(row)
        shown = [rel for rel in relations if any(rel in row for row in rows)]
        columns = [
            Column("lr", "learning rate"),
            Column("epochs", "epochs"),
            *(
                col
                for rel in shown
                for col in (
                    Column(rel, f"{rel}: test implication", "{:.2f}", ci=True),
                    Column(f"{rel} facts", "training facts", "{:.2f}", ci=True),
                )
            ),
        ]
        stem = "lr_epochs_" + "".join(ch if ch.isalnum() else "_" for ch in setup)
        if not lines:
            lines += [
                "## Learning rate and epochs",
                "",
                "Mean rank after fine-tuning at each learning rate and number of epochs (the method's "
                "default is one of them): does more training move the implications, or only the facts? "
                "Intervals as above.",
                "",
            ]
        lines += [f"**{setup}**", "", write_table(rows, columns, out / stem)]
    return lines


def _cell_lines(records: list[dict[str, Any]]) -> list[str]:
    """One row per cell: whether it memorised its training facts, and its test implications."""

    def rank(value: float | None) -> str:
        return "–" if value is None else f"{value:.2f}"

    lines = [
        "| relation | method | pretraining seed | seed | train-fact rank | memorised | "
        "test implication before -> after | seconds | CPU kernels or GPU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(records, key=lambda r: (r["relation"], r["method"], r["pretrain_seed"], r["seed"]))
    for r in order:
        before, after = rank(r["test_implication_rank_before"]), rank(r["test_implication_rank"])
        lines.append(
            f"| {r['relation']} | {r['method']} | {r['pretrain_seed']} | {r['seed']} | "
            f"{rank(r['train_fact_rank'])} | {'yes' if memorised(r) else '**no**'} | {before} -> {after} | "
            f"{r['seconds']:.0f} | "
            f"{r.get('gpu') or r['cpu_capability']} |"
        )
    return lines


def _num_candidates(report) -> int:
    return report.results[0]["num_candidates"] if report.results else 0
