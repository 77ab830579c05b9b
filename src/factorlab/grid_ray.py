"""The Ray backend of factorlab.grid: one Ray task per cell, on a local Ray instance or a cluster.

Ray is an optional extra (``pip install "factorlab[ray]"``). A task runs the same ``run_cell`` as
the local backend, so it writes the same atomic summary file and gives the same numbers. A task
whose worker dies is resubmitted (up to ``retries`` times) and counted as retried.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

from factorlab.cells import run_cell
from factorlab.errors import ConfigError


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError('the ray backend needs Ray: pip install "factorlab[ray]"') from None
    return ray


def check_address(address: str | None) -> None:
    """Before any work: Ray is installed and the cluster at ``address`` answers (a TCP connection to
    its port within a few seconds; ray.init itself retries an unreachable address for minutes)."""
    import socket
    from urllib.parse import urlsplit

    _ray()
    if address in (None, "", "auto", "local"):
        return
    parts = urlsplit(address if "://" in address else f"gcs://{address}")
    if parts.scheme not in ("ray", "gcs"):
        raise ConfigError(
            f"--address {address!r}: use ray://HOST:10001 (Ray client) or HOST:6379 (a cluster head on this "
            "network), or leave it out to start a local Ray."
        )
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or port is None:
        raise ConfigError(f"--address {address!r} has no HOST:PORT; e.g. ray://head:10001 or head:6379.")
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as err:
        raise ConfigError(
            f"cannot reach the Ray cluster at {address} ({err.strerror or type(err).__name__}); check the "
            "address and that the cluster runs, or leave --address out to start a local Ray."
        ) from None


def run_on_ray(
    fn_path: str,
    jobs: Sequence[tuple[dict[str, Any], str]],
    address: str | None,
    retries: int = 1,
    num_cpus: int | None = None,
) -> Iterator[tuple[int, dict | None, str | None, int]]:
    """Yield (job index, summary or None, error or None, attempts) as tasks finish."""
    ray = _ray()
    started_here = not ray.is_initialized()
    if started_here:
        if address:
            check_address(address)
            try:
                ray.init(address=address, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError, TimeoutError) as err:
                raise ConfigError(
                    f"Ray at {address} refused the connection ({type(err).__name__}: {str(err)[:200]}); the "
                    "cluster may run another Ray or Python version than this one."
                ) from None
        else:
            env = {k: os.environ[k] for k in ("PYTHONPATH", "FACTORLAB_CACHE") if k in os.environ}
            ray.init(
                num_cpus=num_cpus or os.cpu_count(),
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"env_vars": env} if env else None,
            )
    task = ray.remote(num_cpus=1, max_retries=0)(run_cell)
    try:
        refs = {task.remote(fn_path, cell, folder): i for i, (cell, folder) in enumerate(jobs)}
        attempts = dict.fromkeys(range(len(jobs)), 1)
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            for ref in done:
                i = refs.pop(ref)
                try:
                    yield i, ray.get(ref), None, attempts[i]
                except (
                    ray.exceptions.WorkerCrashedError,
                    ray.exceptions.NodeDiedError,
                    ray.exceptions.LocalRayletDiedError,
                ) as err:
                    if attempts[i] <= retries:
                        attempts[i] += 1
                        refs[task.remote(fn_path, *jobs[i])] = i
                    else:
                        yield i, None, f"worker died: {type(err).__name__}", attempts[i]
                except ray.exceptions.RayTaskError as err:
                    yield i, None, f"{type(err.cause).__name__}: {err.cause}", attempts[i]
    finally:
        if started_here:
            ray.shutdown()
