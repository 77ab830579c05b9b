"""Cell functions for the grid tests (importable by worker processes)."""

import os
import time
from pathlib import Path


def square(cell, folder: Path):
    if cell["x"] < 0:
        raise ValueError("negative")
    return {"y": cell["x"] ** 2, "pid": os.getpid()}


def dies_once(cell, folder: Path):
    """Kills its own worker process the first time it runs (as an out-of-memory kill would)."""
    marker = Path(cell["marker_dir"]) / f"tried-{cell['x']}"
    if cell["x"] == 1 and not marker.exists():
        marker.write_text("x")
        os._exit(1)
    return {"y": cell["x"] * 10}


def slow(cell, folder: Path):
    if "marker_dir" in cell:  # tell the test which process runs the cell
        (Path(cell["marker_dir"]) / f"started-{os.getpid()}-{cell['x']}").write_text("")
    time.sleep(cell.get("sleep", 0.5))
    return {"y": cell["x"] + 100}
