"""Paste the comparison tables rebuilt from committed cells into README.md, between
``<!-- GRID KIND -->`` and ``<!-- end GRID KIND -->``, KIND "table" (accuracy, cost), "routed" (routing
accuracy per task) or "paired" (LoRA-Mixer against each system, paired by seed) (tests/test_reporting.py
checks they match). The OCR rank sweep's table
(``<!-- ocr-sweep table -->``) is rebuilt from results/ocr-sweep/results.json and, for its float64
column, results/ocr-sweep/precision/precision.json.

    python tools/readme_tables.py            # every results/mixer-* grid with a marker, and ocr-sweep
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

from factorlab.recipes.mixer import report_from_cells
from factorlab.reporting import mean_std

ROOT = Path(__file__).resolve().parents[1]


def rebuilt_table(grid: str, kind: str = "table") -> str:
    """The grid's KIND.md as `factorlab report` rebuilds it from the committed summaries alone."""
    with tempfile.TemporaryDirectory() as tmp:
        for summary in (ROOT / "results" / grid / "cells").glob("*/summary.json"):
            target = Path(tmp) / "cells" / summary.parent.name
            target.mkdir(parents=True)
            shutil.copy(summary, target / "summary.json")
        report_from_cells(tmp)
        return (Path(tmp) / f"{kind}.md").read_text().strip()


# The paper's numbers (from its code, single seed) where it reports them.
PAPER_OCR = {
    "factorized d_h=3": "0.59 / 4.65 (partial failure)",
    "factorized d_h=4": "0.95 / 0.20",
    "combined": "0.04 / ~3.03 (chance: 0.05 / 3.00)",
}


def ocr_sweep_table(folder: Path = ROOT / "results" / "ocr-sweep") -> str:
    """Test-implication accuracy and loss per model, mean ± std over seeds, beside the float64 rerun's
    mean accuracy (bench/ocr_precision.py) and the paper's numbers."""
    runs = json.loads((folder / "results.json").read_text())
    precision = folder / "precision" / "precision.json"
    float64 = json.loads(precision.read_text())["float64"] if precision.exists() else []

    def model(summary: dict) -> str:
        c = summary["config"]
        return "combined" if c["param"] == "combined" else f"factorized d_h={c['d_h']}"

    lines = [
        "| model | test impl acc | test impl loss | float64 rerun: test impl acc | paper: acc / loss |",
        "|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(model(r) for r in runs):
        mine = [r for r in runs if model(r) == name]
        wide = [r["test_impl_acc"] for r in float64 if model(r) == name]
        acc, loss = (
            mean_std([r[k] for r in mine]).render("{:.3f}") for k in ("test_impl_acc", "test_impl_loss")
        )
        rerun = mean_std(wide).render("{:.3f}") if wide else "—"
        lines.append(f"| {name} | {acc} | {loss} | {rerun} | {PAPER_OCR.get(name, '—')} |")
    return "\n".join(lines)


def _paste(readme: str, marker: str, table: str) -> str:
    block = re.compile(rf"(<!-- {marker} -->\n).*?(<!-- end {marker} -->)", re.S)
    return block.sub(lambda m: m.group(1) + table + "\n" + m.group(2), readme)


def main() -> None:
    readme = (ROOT / "README.md").read_text()
    if "<!-- ocr-sweep table -->" in readme:
        readme = _paste(readme, "ocr-sweep table", ocr_sweep_table())
        print("README: ocr-sweep table rebuilt")
    for grid, kind in re.findall(r"<!-- (mixer-[\w-]+) (table|routed|paired) -->", readme):
        if not (ROOT / "results" / grid / "cells").exists():
            continue
        readme = _paste(readme, f"{grid} {kind}", rebuilt_table(grid, kind))
        print(f"README: {grid} {kind} rebuilt")
    (ROOT / "README.md").write_text(readme)


if __name__ == "__main__":
    main()
