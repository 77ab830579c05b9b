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


def packed(cell, folder: Path):
    """Alone: y = x + 100. Cells with the same "group" may run as one pack (``packed.run_pack``)."""
    time.sleep(cell.get("sleep", 0.0))
    return {"y": cell["x"] + 100, "pid": os.getpid(), "pack": None}


def _packed_run(cells, folders, write):
    """Writes its cells one by one (sleeping between), as a pack whose cells finish at different steps
    does; a cell with "fail" raises after the cells before it were written."""
    for j, cell in enumerate(cells):
        if cell.get("fail"):
            raise ValueError(f"cell {cell['x']} failed")
        time.sleep(cell.get("sleep", 0.0))
        write(j, {"y": cell["x"] + 100, "pid": os.getpid(), "pack": [c["x"] for c in cells]})


packed.pack_key = lambda cell: cell.get("group")
packed.run_pack = _packed_run


def kill_grid_midway(fn_path: str, cells: list, out: Path, finished: int, **options) -> None:
    """Run ``run_grid(fn_path, cells, out, **options)`` in a fresh process and SIGKILL it with its
    workers (its process group) once ``finished`` cells have written their summaries."""
    import signal
    import subprocess
    import sys

    here = str(Path(__file__).parent)
    script = (
        f"import sys; sys.path.insert(0, {here!r}); from factorlab.grid import run_grid; "
        f"run_grid({fn_path!r}, {cells!r}, {str(out)!r}, **{options!r})"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], start_new_session=True, env={**os.environ, "PYTHONPATH": here}
    )
    deadline = time.time() + 60
    while time.time() < deadline and len(list(Path(out).glob("cells/*/summary.json"))) < finished:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its workers, mid-grid
    proc.wait()
