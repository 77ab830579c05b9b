"""One grid cell: its folder name, running it in this process, and reading its finished summary.
Both grid backends (the local process pool in ``factorlab.grid``, Ray in ``factorlab.grid_ray``)
run cells through ``run_cell``."""

from __future__ import annotations

import hashlib
import importlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from factorlab.runtime import limit_threads, write_json

SUMMARY = "summary.json"


def cell_id(cell: dict[str, Any]) -> str:
    """A readable, stable folder name: short key=value pairs in key order, plus a hash of the whole
    cell when a long value (a hash, a path) was left out or the name grew long."""
    parts = [f"{k}={cell[k]}" for k in sorted(cell) if len(str(cell[k])) <= 16]
    name = re.sub(r"[^A-Za-z0-9=.,+_-]", "_", ",".join(parts))
    if len(parts) < len(cell) or len(name) > 160:
        digest = hashlib.sha1(json.dumps(cell, sort_keys=True).encode()).hexdigest()[:16]
        name = f"{name[:140]}-{digest}"
    return name


SummaryCheck = Callable[[dict[str, Any], dict[str, Any]], bool]


def load_summary(
    folder: Path, cell: dict[str, Any] | None = None, complete: SummaryCheck | None = None
) -> dict[str, Any] | None:
    """A finished cell's summary, or None when it is missing, unreadable, (given ``cell``) written for
    another cell, or (given ``complete``) lacking what its readers need: such a summary is
    recomputed, never reused."""
    try:
        summary = json.loads((folder / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(summary, dict):
        return None
    if cell is not None and summary.get("cell") != json.loads(json.dumps(cell)):
        return None
    if complete is not None and cell is not None:
        try:
            if not complete(summary, cell):
                return None
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
    return summary


def has_keys(*keys: str) -> SummaryCheck:
    """A completeness check: the summary holds ``keys`` (a cell function's ``summary_is_complete``)."""
    return lambda summary, cell: all(k in summary for k in keys)


def summary_check(fn_path: str) -> SummaryCheck | None:
    """The cell function's ``summary_is_complete`` (summary, cell) -> bool, if it declares one."""
    return getattr(resolve(fn_path), "summary_is_complete", None)


def resolve(fn_path: str) -> Callable[[dict[str, Any], Path], dict[str, Any]]:
    module, _, name = fn_path.partition(":")
    return getattr(importlib.import_module(module), name)


PackWriter = Callable[[int, dict[str, Any]], None]


def run_pack(
    fn_path: str, cells: list[dict[str, Any]], folders: list[str]
) -> list[tuple[dict | None, str | None]]:
    """Run cells that train together (the cell function's ``run_pack(cells, folders, write)``) in this
    process; each cell's summary is written atomically as that cell finishes, so a pack killed midway
    keeps its finished cells. Returns (summary, None) or (None, error) per cell."""
    limit_threads(1)
    results: list[dict[str, Any] | None] = [None] * len(cells)

    def write(j: int, summary: dict[str, Any]) -> None:
        summary = {**summary, "cell": cells[j]}
        write_json(Path(folders[j]) / SUMMARY, summary)
        results[j] = summary

    for folder in folders:
        Path(folder).mkdir(parents=True, exist_ok=True)
    try:
        resolve(fn_path).run_pack(cells, [Path(f) for f in folders], write)
        error = "its pack ended without writing it"
    except Exception as err:  # the pack failed: its finished cells stand, the others carry the error
        error = f"{type(err).__name__}: {err}"
    return [(r, None) if r is not None else (None, error) for r in results]


def pack_key(fn_path: str) -> Callable[[dict[str, Any]], Any] | None:
    """The cell function's ``pack_key(cell)``: cells with the same non-None key may train as one pack."""
    return getattr(resolve(fn_path), "pack_key", None)


def run_cell(fn_path: str, cell: dict[str, Any], folder: str) -> dict[str, Any]:
    """Run one cell in this process and write its summary atomically; returns the summary."""
    limit_threads(1)
    folder_path = Path(folder)
    folder_path.mkdir(parents=True, exist_ok=True)
    summary = resolve(fn_path)(cell, folder_path)
    summary = {**summary, "cell": cell}
    write_json(folder_path / SUMMARY, summary)
    return summary
