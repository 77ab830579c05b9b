"""Grids: resumable, atomic, retried on worker death, identical on the local and Ray backends."""

import json
from pathlib import Path

import pytest

from factorlab.grid import cell_id, run_grid
from grid_cells import kill_grid_midway

HERE = Path(__file__).parent


def test_a_worker_that_dies_is_retried_and_every_cell_is_present_once(tmp_path):
    cells = [{"x": i, "marker_dir": str(tmp_path)} for i in range(4)]
    report = run_grid("grid_cells:dies_once", cells, tmp_path / "out", workers=2, retries=1)
    assert report.retried >= 1 and not report.failed
    assert sorted(r["y"] for r in report.results) == [0, 10, 20, 30]
    folders = list((tmp_path / "out" / "cells").iterdir())
    assert len(folders) == 4 and all(json.loads((f / "summary.json").read_text()) for f in folders)


def test_an_interrupted_grid_resumes_without_losing_or_repeating_cells(tmp_path):
    cells = [{"x": i, "sleep": 0.4} for i in range(12)]
    out = tmp_path / "out"
    kill_grid_midway("grid_cells:slow", cells, out, 3, workers=2)
    finished_before = len(list(out.glob("cells/*/summary.json")))
    assert 3 <= finished_before < 12
    report = run_grid("grid_cells:slow", cells, out, workers=2)
    assert report.reused == finished_before and report.ran == 12 - finished_before
    assert sorted(r["y"] for r in report.results) == [100 + i for i in range(12)]
    summaries = list(out.glob("cells/*/summary.json"))
    assert len(summaries) == 12
    assert {json.loads(p.read_text())["cell"]["x"] for p in summaries} == set(range(12))
    assert not list(out.glob("cells/*/*.tmp"))  # stale temporary files from the kill are cleaned up


def test_ray_backend_gives_the_same_numbers_as_local(tmp_path):
    pytest.importorskip("ray")
    cells = [
        {
            "model": "tiny",
            "relation": rel,
            "method": "lora",
            "r": 4,
            "lora_alpha": 8.0,
            "seed": 0,
            "epochs": 2,
        }
        for rel in ("city-language", "profession-color")
    ]
    cells += [{"x": i} for i in range(3)]
    local = run_grid("test_grid:mixed_cell", cells, tmp_path / "local", workers=2)
    ray_report = run_grid("test_grid:mixed_cell", cells, tmp_path / "ray", workers=2, backend="ray")
    assert local.ran == ray_report.ran == len(cells)
    strip = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "pid")}  # noqa: E731
    assert [strip(r) for r in local.results] == [strip(r) for r in ray_report.results]
    assert cell_id(cells[0]) in {p.name for p in (tmp_path / "ray" / "cells").iterdir()}


def mixed_cell(cell, folder):
    if "x" in cell:
        from grid_cells import square

        return square(cell, folder)
    from factorlab.recipes.inject import inject_cell

    summary = inject_cell(cell, folder)
    return {k: summary[k] for k in summary if k.endswith("rank") or k.endswith("rank_before")}
