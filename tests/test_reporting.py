import csv
import json

import pytest

from factorlab.reporting import Column, MeanStd, aggregate, mean_std, write_table


def test_mean_std_ignores_missing_values():
    assert mean_std([1.0, None, 3.0]) == MeanStd(2.0, pytest.approx(1.41421356), 2)
    assert mean_std([None]) is None


def test_aggregate_and_write_table(tmp_path):
    records = [
        {"model": "a", "seed": 0, "acc": 1.0},
        {"model": "a", "seed": 1, "acc": 0.5},
        {"model": "b", "seed": 0, "acc": 0.25},
    ]
    rows = aggregate(records, ["model"], ["acc"])
    assert rows[0]["acc"].mean == 0.75 and rows[0]["seeds"] == 2 and rows[1]["acc"].n == 1
    md = write_table(rows, [Column("model", "model"), Column("acc", "accuracy", "{:.2f}")], tmp_path / "t")
    assert "| a | 0.75 ± 0.35 |" in md and "| b | 0.25 |" in md
    with open(tmp_path / "t.csv") as f:
        lines = list(csv.reader(f))
    assert lines[0] == ["model", "acc_mean", "acc_std"]
    assert float(lines[1][1]) == 0.75
    data = json.loads((tmp_path / "t.json").read_text())
    half_width = 12.706 * 0.3535534 / 2**0.5  # Student's t(0.975, 1 dof) x std / sqrt(n)
    assert data[0]["acc"] == {
        "mean": 0.75,
        "std": pytest.approx(0.353553, rel=1e-5),
        "n": 2,
        "ci95": pytest.approx(half_width, rel=1e-4),
    }


@pytest.mark.parametrize("grid", ["inject-tiny-v4", "inject-smollm2", "inject-smollm2-gpu"])
def test_readme_tables_are_the_ones_rebuilt_from_the_committed_cells(grid, tmp_path):
    """The README quotes each real grid's tables; `factorlab report results/<grid>` must rebuild them
    from the committed cell summaries with identical numbers."""
    import shutil
    from pathlib import Path

    from factorlab.recipes.inject import report_from_cells

    root = Path(__file__).resolve().parents[1]
    for summary in (root / "results" / grid / "cells").glob("*/summary.json"):
        target = tmp_path / "cells" / summary.parent.name
        target.mkdir(parents=True)
        shutil.copy(summary, target / "summary.json")
    report_from_cells(tmp_path)
    readme = (root / "README.md").read_text()
    for name in ("table.md", "train_fact_table.md"):
        table = (tmp_path / name).read_text().strip()
        assert table in readme, f"README's {grid} {name} differs from `factorlab report results/{grid}`"


@pytest.mark.parametrize(
    ("grid", "kind"),
    [
        ("mixer-quick", "table"),
        ("mixer-quick", "paired"),
        ("mixer-smollm2", "table"),
        ("mixer-smollm2", "routed"),
        ("mixer-smollm2", "paired"),
    ],
)
def test_readme_comparison_tables_are_the_ones_rebuilt_from_the_committed_cells(grid, kind):
    """`python tools/readme_tables.py` pasted them; a hand edit of README or of a cell fails here."""
    import re
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    block = re.search(rf"<!-- {grid} {kind} -->\n(.*?)<!-- end {grid} {kind} -->", readme, re.S)
    assert block is not None, f"README has no {grid} {kind} block"
    sys.path.insert(0, str(root / "tools"))
    from readme_tables import rebuilt_table

    assert block.group(1).strip() == rebuilt_table(grid, kind)


def test_comparison_report_builds_where_the_model_is_not_installed(monkeypatch):
    """CI has no SmolLM2: rebuilding results/mixer-smollm2's tables must not re-validate its config."""
    import sys
    from pathlib import Path

    import factorlab.mixer.config as mixer_config
    from factorlab.errors import ConfigError

    def unavailable(*_, **__):
        raise ConfigError("SmolLM2 is unavailable (simulated)")

    monkeypatch.setattr(mixer_config, "resolve_model_path", unavailable)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from readme_tables import rebuilt_table

    assert "| base |" in rebuilt_table("mixer-smollm2")


def test_readme_ocr_sweep_table_is_the_one_rebuilt_from_the_committed_runs():
    """results/ocr-sweep holds the sweep's runs and its float64 rerun; README's table must be theirs."""
    import re
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    block = re.search(r"<!-- ocr-sweep table -->\n(.*?)<!-- end ocr-sweep table -->", readme, re.S)
    assert block is not None, "README has no ocr-sweep table block"
    sys.path.insert(0, str(root / "tools"))
    from readme_tables import ocr_sweep_table

    table = ocr_sweep_table()
    assert block.group(1).strip() == table
    assert "| combined |" in table and "—" not in table.split("\n")[2].split("|")[4]  # float64 column filled


def test_every_number_in_readme_prose_blocks_comes_from_the_reports_they_cite():
    """README prose between `<!-- numbers: FILES [| constants: ...] -->` and `<!-- end numbers -->` may
    quote only numbers (with a decimal point) that appear in those committed files, as they print them,
    or in its listed constants: a figure retyped by hand, rounded differently or left over from an
    earlier run fails here. Code spans (commands, names) are not prose."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    number = re.compile(r"(?<![\w.])\d+\.\d+(?![\w.])")
    blocks = re.findall(r"<!-- numbers: (.*?) -->\n(.*?)<!-- end numbers -->", readme, re.S)
    assert len(blocks) >= 3
    for header, text in blocks:
        files, _, constants = header.partition("| constants:")
        known = set(number.findall(constants))
        for name in files.split():
            known |= set(number.findall((root / name).read_text()))
        prose = re.sub(r"`[^`]*`", "", text)
        stray = sorted({n for n in number.findall(prose) if n not in known})
        assert not stray, f"README numbers not in {files.split()}: {stray}"
