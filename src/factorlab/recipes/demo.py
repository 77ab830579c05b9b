"""`make demo`: a short reproduction of the OCR paper's central claims, with a report.

1. Factorized (d_h = 128 and d_h = 4) against combined W_OV, causal and spurious association:
   factorized generalizes to unseen implications, combined does not, and in the spurious world
   the very same generalization is hallucination.
2. A small rank sweep over d_h with several seeds.
3. The max-margin analysis: trained factorized models point to the nuclear-norm solution,
   combined ones to the Frobenius-norm solution, whose test margin is zero.
4. Knowledge injection on the tiny backend: fine-tuning on fictitious facts generalizes a causal
   link and hallucinates a counterfactual one (full fine-tuning and LoRA).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from factorlab.ocr.train import OCRConfig
from factorlab.progress import console
from factorlab.recipes import inject, ocr
from factorlab.runtime import atomic_write_text


def _find(records: list[dict[str, Any]], model: str, association: str) -> dict[str, Any]:
    return next(r for r in records if r["model"] == model and r["association"] == association)


def run_demo(out: str | Path = "runs/demo", quick: bool = False) -> Path:
    """Run the demo into ``out`` and return the path of its report.md.

    ``quick`` shrinks every part (for tests); the numbers are then not the paper's.
    """
    out = Path(out)
    started = time.perf_counter()
    steps = 300 if quick else 2000
    console.rule("1/4  factorized vs combined, causal vs spurious")
    main = ocr.sweep(
        OCRConfig(steps=steps),
        d_hs=[128, 4],
        combined=True,
        seeds=[42],
        out=out / "ocr",
        associations=("causal", "spurious"),
    )
    console.rule("2/4  rank sweep")
    sweep_steps = 200 if quick else 3000
    ocr.sweep(
        OCRConfig(steps=sweep_steps),
        d_hs=[2, 3, 4, 8, 128],
        combined=True,
        seeds=[0] if quick else [0, 1, 2],
        out=out / "rank-sweep",
    )
    console.rule("3/4  max-margin analysis")
    theory = ocr.theory(
        OCRConfig(groups=4, subjects_per_group=4, steps=300 if quick else 3000), out / "theory"
    )
    console.rule("4/4  knowledge injection on the tiny backend")
    cells = inject.grid_cells(
        "tiny", ["city-language", "city-language-cf"], ["full", "lora"], [0], r=4, epochs=2 if quick else None
    )
    injection = inject.grid(cells, out / "inject")

    report = out / "report.md"
    text = _report(out, main, theory, steps, sweep_steps, time.perf_counter() - started)
    atomic_write_text(report, text + _injection_section(injection))
    console.print(f"\n[bold green]demo finished[/] — report: {report.resolve()}")
    return report


def _report(out: Path, main, theory, steps: int, sweep_steps: int, seconds: float) -> str:
    fact = _find(main, "factorized d_h=128", "causal")
    comb = _find(main, "combined", "causal")
    low = _find(main, "factorized d_h=4", "causal")
    spur = _find(main, "factorized d_h=128", "spurious")
    groups = fact["config"]["groups"]
    lines = [
        "# factorlab demo: out-of-context reasoning in a one-layer transformer",
        "",
        f"Total time {seconds:.0f} s. Chance on test implications: {1 / groups:.2f} (1/{groups}).",
        "",
        "## 1. Factorized generalizes, combined does not — and the same mechanism hallucinates",
        "",
        f"After {steps} steps every model fits its training set (train implication accuracy "
        f"{fact['train_impl_acc']:.2f} factorized, {comb['train_impl_acc']:.2f} combined). "
        "On the test subjects, whose implication was never shown:",
        "",
        f"- factorized W_O W_V^T (d_h = 128): test implication accuracy **{fact['test_impl_acc']:.2f}**, "
        f"loss {fact['test_impl_loss']:.3f};",
        f"- factorized with d_h = 4: **{low['test_impl_acc']:.2f}**, loss {low['test_impl_loss']:.3f};",
        f"- combined W_OV: **{comb['test_impl_acc']:.2f}**, loss {comb['test_impl_loss']:.2f} "
        f"(chance loss {math.log(groups):.2f}).",
        "",
        "When the association is spurious (test subjects' true implications drawn independently of their "
        f"group), the same factorized model answers with the group's implication for "
        f"**{spur['hallucination_rate']:.0%}** of the test subjects whose truth differs: hallucination. Its "
        f"true-implication accuracy is {spur['test_impl_acc']:.2f}.",
        "",
        "Full table (`ocr/table.md`):",
        "",
        (out / "ocr" / "table.md").read_text(),
        "![curves](ocr/curves.png)",
        "",
        "## 2. Rank sweep",
        "",
        f"{sweep_steps} steps per run. Table (`rank-sweep/table.md`):",
        "",
        (out / "rank-sweep" / "table.md").read_text(),
        "![accuracy vs d_h](rank-sweep/accuracy_vs_dh.png)",
        "",
        "![curves](rank-sweep/curves.png)",
        "",
        "## 3. Which max-margin solution does gradient descent find?",
        "",
        ocr.theory_report(theory).split("\n", 2)[2].replace("(theory.png)", "(theory/theory.png)"),
    ]
    return "\n".join(lines)


def _injection_section(injection: dict[str, Any]) -> str:
    lines = [
        "",
        "## 4. Knowledge injection: the same mechanism in a language model",
        "",
        "A small Llama, pretrained by factorlab on a generated corpus that teaches which language each "
        "city speaks (the reference backend, pretraining seed 0, ships with factorlab), is fine-tuned on "
        "facts about 100 fictitious people; the implication is shown for 20 of them. Mean rank (0 = "
        "best, guessing 2.0) of the associated implication for the other 80, one fine-tuning seed "
        "(`factorlab inject grid` runs 3 pretraining x 3 fine-tuning seeds):",
        "",
    ]
    probes = {r["relation"]: r["probe_accuracy"] for r in injection["records"]}
    lines += [
        'Background knowledge before fine-tuning (share of "People in <city> speak" -> language ranked '
        "first): " + ", ".join(f"{k} {v:.2f}" for k, v in probes.items() if v is not None) + ".",
        "",
    ]
    for r in injection["records"]:
        lines.append(
            f"- {r['relation']} ({'causal' if r['causal'] else 'counterfactual'}), {r['method']}: "
            f"{r['test_implication_rank_before']:.2f} before -> **{r['test_implication_rank']:.2f}** after: "
            f"{r['verdict']}"
        )
    lines += ["", "Full table: `inject/report.md`.", "", "![injection ranks](inject/ranks.png)", ""]
    return "\n".join(lines)
