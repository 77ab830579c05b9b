"""Small runtime helpers shared by recipes: seeds, threads, atomic file writes."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from factorlab.errors import ConfigError, ResourceError


def derive_seed(seed: int, stream: str) -> int:
    """A stable 63-bit seed for one named random stream of an experiment.

    Independent streams (data, init, evaluation set) come from one user seed, so runs that share
    a seed share exactly the streams they should, in any process and in any batching.
    """
    digest = hashlib.blake2b(f"{seed}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator(seed: int, stream: str) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, stream))


def limit_threads(num_threads: int = 1) -> None:
    """Pin torch to few threads: on a busy 2-core machine, oversubscription is up to 10x slower."""
    torch.set_num_threads(num_threads)


def available_memory() -> int | None:
    """Bytes of memory this process could still allocate (Linux: MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(needed: int, what: str, fix: str) -> None:
    """Refuse work that would need more memory than is available, before anything is allocated (an
    allocation that fails part-way is a traceback from deep inside torch, after minutes of work)."""
    available = available_memory()
    if available is not None and needed > available:
        raise ResourceError(
            f"{what} needs about {_size(needed)} of memory, and {_size(available)} is available; {fix}."
        )


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    return value


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write via a temporary file and rename, so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def publish_folder(
    folder: str | os.PathLike, write: Callable[[Path], object], keep: Callable[[Path], bool] | None = None
) -> Path:
    """``write(tmp)`` fills a temporary folder beside ``folder``, which is then renamed into place, so the
    folder appears whole or not at all. A folder already there is replaced, unless ``keep(folder)`` says
    it is a finished copy: caches that several processes may build from the same inputs (grid workers)
    pass it, so the first copy wins and is never deleted under a process loading it; the later copies
    are dropped. Temporary folders of processes that no longer run (an interrupted build) are removed."""
    folder = Path(folder)
    for stale in folder.parent.glob(f"{folder.name}.tmp*"):
        pid = stale.name.rsplit(".tmp", 1)[1]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if keep is not None and keep(folder):
        shutil.rmtree(tmp, ignore_errors=True)
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    try:
        tmp.rename(folder)
    except OSError:  # another process renamed its copy into place first: keep it
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, run by another user
        return True
    return True


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(_jsonable(obj), indent=2) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(_jsonable(r)) + "\n" for r in rows))


def resolve_device(spec: str | torch.device) -> torch.device:
    """``spec`` ("cpu", "cuda", "cuda:1", "mps") as a device this machine has, or a ConfigError that
    names what is missing and what to pass instead."""
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {spec!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:N'.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {spec!r} asked for, but this torch ({torch.__version__}) sees no CUDA GPU; "
                "use --device cpu."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {spec!r} asked for, but only {torch.cuda.device_count()} CUDA GPU(s) are visible."
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {spec!r} asked for, but MPS is not available here; use --device cpu.")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {spec!r}: factorlab runs on 'cpu', 'cuda' or 'mps'.")
    return device


def machine_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """What float results depend on: CPU capability (AVX2 / AVX-512 kernels), torch version, threads,
    and for a GPU run its name, CUDA version and whether float32 matmuls may round through TF32."""
    import platform

    overrides = {  # kernel-selection variables: set, they make an AVX-512 CPU run AVX2 code paths
        k: os.environ[k]
        for k in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
        if k in os.environ
    }
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_has_avx512": _cpu_has("avx512f"),
        "kernel_overrides": overrides,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        **_accelerator_info(torch.device(device)),
    }


def _accelerator_info(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {}
    return {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device),
        "cuda": torch.version.cuda,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
    }


def _cpu_has(flag: str) -> bool | None:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and flag in line.split() for line in f)
    except OSError:
        return None


class PeakMemory:
    """The most memory held during a block: on a GPU the device's allocated peak (torch's own counter),
    on a CPU this process's resident set sampled every ``interval`` seconds (``ru_maxrss`` would carry
    the high-water mark of earlier work in the same process, e.g. a grid worker's previous cell).

        with PeakMemory(device) as peak:
            train(...)
        peak.bytes   # None where it cannot be read
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.01):
        self.device, self.interval = torch.device(device), interval
        self.bytes: int | None = None

    def __enter__(self) -> PeakMemory:
        import threading

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self.bytes = _resident_bytes()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(self.interval):
                now = _resident_bytes()
                if now is not None and self.bytes is not None:
                    self.bytes = max(self.bytes, now)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.bytes = int(torch.cuda.max_memory_allocated(self.device))
            return
        self._stop.set()
        self._thread.join()
        now = _resident_bytes()
        if now is not None and self.bytes is not None:
            self.bytes = max(self.bytes, now)


def _resident_bytes() -> int | None:
    """This process's resident set (Linux /proc/self/statm), or None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
