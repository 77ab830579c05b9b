"""Paste the comparison tables rebuilt from committed cells into README.md, between
``<!-- GRID KIND -->`` and ``<!-- end GRID KIND -->``, KIND "table" (accuracy, cost) or "routed" (routing
accuracy per task) (tests/test_reporting.py checks they match).

    python tools/readme_tables.py            # every results/mixer-* grid with a marker in README.md
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from factorlab.recipes.mixer import report_from_cells

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


def main() -> None:
    readme = (ROOT / "README.md").read_text()
    for grid, kind in re.findall(r"<!-- (mixer-[\w-]+) (table|routed) -->", readme):
        if not (ROOT / "results" / grid / "cells").exists():
            continue
        block = re.compile(rf"(<!-- {grid} {kind} -->\n).*?(<!-- end {grid} {kind} -->)", re.S)
        table = rebuilt_table(grid, kind)
        readme = block.sub(lambda m, table=table: m.group(1) + table + "\n" + m.group(2), readme)
        print(f"README: {grid} {kind} rebuilt")
    (ROOT / "README.md").write_text(readme)


if __name__ == "__main__":
    main()
