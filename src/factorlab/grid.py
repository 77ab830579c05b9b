"""Experiment grids: many independent cells, run in parallel, resumable, nothing lost.

A cell is a JSON-able dict; a cell function ``fn(cell, folder) -> summary dict`` (named by an
import path "module:function", so any worker process can find it) computes it. Each finished cell
is written atomically to ``OUT/cells/<cell id>/summary.json`` by the worker itself as it
completes, so a crash never leaves a half-written result and a rerun skips finished cells. A
cell whose worker dies is retried (``retries`` times) in a fresh pool.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from factorlab.cells import (  # noqa: F401
    SUMMARY,
    cell_id,
    load_summary,
    pack_key,
    resolve,
    run_cell,
    run_pack,
    summary_check,
)
from factorlab.errors import ConfigError
from factorlab.workers import ending_with_parent, start_worker


@dataclass
class GridReport:
    results: list[dict[str, Any]] = field(default_factory=list)
    ran: int = 0
    reused: int = 0
    retried: int = 0
    failed: list[tuple[dict[str, Any], str]] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"{len(self.results)} cells: {self.ran} ran, {self.reused} reused, {self.retried} retried, "
            f"{len(self.failed)} failed"
        )


def check_grid_options(backend: str, address: str | None = None, workers: int | None = None) -> None:
    """Everything about where cells run, checked before any work (a grid may pretrain models first)."""
    if backend not in ("local", "ray"):
        raise ConfigError(f"--backend must be 'local' or 'ray', got {backend!r}.")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"--workers must be a positive integer, got {workers!r}.")
    if address and backend != "ray":
        raise ConfigError(f"--address {address!r} applies to --backend ray only; add --backend ray.")
    if backend == "ray":
        from factorlab.grid_ray import check_address

        check_address(address)


def run_grid(
    fn_path: str,
    cells: Sequence[dict[str, Any]],
    out: str | os.PathLike,
    workers: int | None = None,
    retries: int = 1,
    backend: str = "local",
    address: str | None = None,
    on_done: Callable[[int, int], None] | None = None,
    pack: int = 1,
) -> GridReport:
    """Run every cell not already finished under ``out/cells``; return all results in cell order.

    ``backend``: "local" (a process pool of ``workers`` processes; ``workers=1`` runs in this
    process) or "ray" (a local Ray instance, or the cluster at ``address``). ``pack``: the most cells
    that train together as one model where the cell function can pack them (its ``pack_key`` and
    ``run_pack``; local backend); 1 runs every cell alone.
    """
    check_grid_options(backend, address, workers)
    check_pack(pack)
    if not cells:
        raise ConfigError("the grid has no cells: give at least one value for every list option.")
    out = Path(out)
    (out / "cells").mkdir(parents=True, exist_ok=True)  # an unusable --out fails here, before any work
    report = GridReport()
    folders = [out / "cells" / cell_id(c) for c in cells]
    for stale in out.glob("cells/*/.*.tmp"):  # left by a writer that was killed mid-write
        stale.unlink(missing_ok=True)
    complete = summary_check(fn_path)
    results: list[dict[str, Any] | None] = [load_summary(f, c, complete) for f, c in zip(folders, cells)]
    report.reused = sum(r is not None for r in results)
    todo = [i for i, r in enumerate(results) if r is None]
    done = report.reused
    if on_done:
        on_done(done, len(cells))
    if backend == "ray":
        from factorlab.grid_ray import run_on_ray

        jobs = [(cells[i], str(folders[i])) for i in todo]
        for j, summary, error, attempts in run_on_ray(fn_path, jobs, address, retries, workers):
            written = load_summary(folders[todo[j]], cells[todo[j]], complete) if error is not None else None
            if written is not None:  # died after writing
                summary, error = written, None
            _record(report, results, todo[j], summary, error, cells)
            report.retried += attempts - 1
            done += 1
            if on_done:
                on_done(done, len(cells))
    elif backend == "local" and workers == 1:  # in this process: cells may show their own progress
        for job in plan_packs(fn_path, cells, todo, pack, 1):
            outcomes = _run_job(fn_path, [cells[i] for i in job], [folders[i] for i in job])
            for i, (summary, error) in zip(job, outcomes):
                _record(report, results, i, summary, error, cells)
            if on_done:
                on_done(sum(r is not None for r in results), len(cells))
    else:  # "local", with a process pool (the backend was checked above)
        attempts = dict.fromkeys(todo, 0)
        while todo:
            todo = _local_pass(
                fn_path,
                cells,
                folders,
                plan_packs(fn_path, cells, todo, pack, workers or os.cpu_count() or 1),
                complete,
                workers,
                report,
                results,
                attempts,
                retries,
                lambda: on_done(sum(r is not None for r in results), len(cells)) if on_done else None,
            )
    report.results = [r for r in results if r is not None]
    return report


def check_pack(pack: int) -> None:
    if isinstance(pack, bool) or not isinstance(pack, int) or pack < 1:
        raise ConfigError(f"--pack must be a positive integer (1 runs every cell alone), got {pack!r}.")


def plan_packs(
    fn_path: str, cells: Sequence[dict], todo: list[int], pack: int, workers: int
) -> list[list[int]]:
    """The jobs that run ``todo``: cells of one pack key in packs of at most ``pack`` (split so that
    every worker gets a share), then the cells that train alone, one job each. Packs come first: they
    are the longest jobs."""
    key_of = pack_key(fn_path) if pack > 1 else None
    by_key: dict[Any, list[int]] = {}
    alone = []
    for i in todo:
        key = key_of(cells[i]) if key_of else None
        (alone.append(i) if key is None else by_key.setdefault(key, []).append(i))
    jobs = []
    for members in by_key.values():
        count = max(-(-len(members) // pack), min(workers, len(members)))  # ceil, or one per worker
        size = -(-len(members) // count)
        jobs += [members[j : j + size] for j in range(0, len(members), size)]
    return sorted(jobs, key=len, reverse=True) + [[i] for i in alone]


def _run_job(fn_path, cells, folders) -> list[tuple[dict | None, str | None]]:
    """One job in this process: a cell alone, or the cells of a pack (only the job's own cells travel
    to the worker)."""
    if len(cells) > 1:
        return run_pack(fn_path, list(cells), [str(f) for f in folders])
    try:
        return [(run_cell(fn_path, cells[0], str(folders[0])), None)]
    except Exception as err:  # the cell itself failed: report it, do not retry
        return [(None, f"{type(err).__name__}: {err}")]


def _record(report, results, index, summary, error, cells) -> None:
    if error is None:
        results[index] = summary
        report.ran += 1
    else:
        report.failed.append((cells[index], error))


def _local_pass(
    fn_path, cells, folders, jobs, complete, workers, report, results, attempts, retries, tick
) -> list[int]:
    """One process pool over ``jobs``; returns the cells to retry because their worker died."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    retry: list[int] = []
    ctx = mp.get_context("spawn")
    with (
        ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=start_worker, initargs=(os.getpid(),)
        ) as pool,
        ending_with_parent(pool),
    ):
        futures = {
            pool.submit(_run_job, fn_path, [cells[i] for i in job], [folders[i] for i in job]): job
            for job in jobs
        }
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                job = futures[f]
                try:
                    outcomes = f.result()
                except BrokenProcessPool:
                    outcomes = [(None, None)] * len(job)  # None, None: the worker died
                for i, (summary, error) in zip(job, outcomes):
                    if summary is None and error is None:
                        written = load_summary(folders[i], cells[i], complete)  # finished before it died?
                        if written is not None:
                            _record(report, results, i, written, None, cells)
                            continue
                        attempts[i] += 1
                        if attempts[i] <= retries:
                            retry.append(i)
                        else:
                            report.failed.append((cells[i], "worker process died"))
                        continue
                    _record(report, results, i, summary, error, cells)
                if tick:
                    tick()
    if retry:
        report.retried += len(retry)
    return retry
