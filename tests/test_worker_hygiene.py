"""A killed grid takes its worker processes with it: SIGTERM, Ctrl-C (SIGINT) and SIGKILL of the grid's
process leave no worker running (before, they ran on with parent 1, some still pretraining)."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table from /proc")


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def workers_of(grid: subprocess.Popen, count: int, timeout: float = 90) -> list[int]:
    """The grid's worker processes once ``count`` of them run a cell (they write a start file)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        started = list(Path(grid.args[-1]).glob("started-*"))
        if len(started) >= count:
            return [int(p.name.split("-")[1]) for p in started]
        assert grid.poll() is None, grid.stderr.read().decode()[-2000:]
        time.sleep(0.1)
    raise AssertionError("the grid's workers did not start")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_killing_a_grid_leaves_no_worker_behind(tmp_path, sig):
    cells = [{"x": i, "sleep": 600, "marker_dir": str(tmp_path)} for i in range(4)]
    script = (
        "import sys; from factorlab.grid import run_grid; "
        f"run_grid('grid_cells:slow', {cells!r}, sys.argv[1] + '/out', workers=2)"
    )
    grid = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)],
        env={**os.environ, "PYTHONPATH": str(HERE)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        # as from a terminal: a suite started in the background (`make test &`) inherits SIGINT ignored,
        # and Python then installs no KeyboardInterrupt handler, so Ctrl-C would not be what is tested
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        workers = workers_of(grid, 2)
        assert set(workers) <= set(children(grid.pid))  # the pool's processes, each inside a cell
        grid.send_signal(sig)  # the grid alone, as a timeout or `kill PID` would
        grid.wait(timeout=30)
        deadline = time.time() + 10
        while time.time() < deadline and any(running(w) for w in workers):
            time.sleep(0.1)
        assert not [w for w in workers if running(w)], f"workers outlived the grid after {sig.name}"
        assert grid.returncode != 0
        if sig == signal.SIGTERM:  # unwinds as SystemExit(143): no traceback
            assert grid.returncode == 143 and b"Traceback" not in grid.stderr.read()
    finally:
        with contextlib.suppress(OSError):
            os.killpg(grid.pid, signal.SIGKILL)
        for pid in children(grid.pid) if grid.poll() is None else []:
            os.kill(pid, signal.SIGKILL)
