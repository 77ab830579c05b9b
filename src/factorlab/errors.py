"""Exceptions. Every message names the problem and the fix."""


class FactorlabError(Exception):
    """Base class of factorlab's own errors."""


class ConfigError(FactorlabError, ValueError):
    """A configuration value is invalid; the message says which one and what would work."""


class TrainingDivergedError(FactorlabError, RuntimeError):
    """Training produced a non-finite loss. factorlab stops rather than continue with NaNs."""


class TargetError(FactorlabError, ValueError):
    """An adapter's targets are wrong: they match nothing, or a module that cannot be adapted."""


class AdapterLoadError(FactorlabError, ValueError):
    """A saved adapter does not fit the model, or its files are missing or corrupt."""


class AdapterSaveError(FactorlabError, ValueError):
    """An adapter cannot be written as it is (NaN or inf in its weights): a file nobody could load."""


class GridCellsFailed(FactorlabError, RuntimeError):
    """Some cells of an experiment grid failed; the others' results were kept and reported."""

    def __init__(self, what: str, failed: list[tuple[dict, str]]):
        self.failed = failed
        lines = [f"{len(failed)} {what} failed (finished cells are kept; rerun the command to retry):"]
        lines += [f"  {cell}: {error[:300]}" for cell, error in failed[:20]]
        if len(failed) > 20:
            lines.append(f"  ... and {len(failed) - 20} more")
        super().__init__("\n".join(lines))


class SharedModelChangedError(FactorlabError, RuntimeError):
    """A base model shared by several runs (a grid worker's cells) changed while one of them ran."""


class PeftOnlyError(FactorlabError, AttributeError):
    """A PEFT function that reads PEFT's own classes was given a factorlab model; the message names
    factorlab's function of the same name. An AttributeError, so ``hasattr`` stays False."""


class ResourceError(FactorlabError, MemoryError):
    """A run would need more memory or disk than this machine has; the message says how much and what
    to lower."""


def explain(err: BaseException, context: str = "") -> FactorlabError | None:
    """The factorlab error for an exception from the standard library, torch or Ray where factorlab
    promises one clean line: an unusable path, a bad regular expression, an allocation that fails, a
    Ray cluster out of reach. None for anything else: a bug, which keeps its traceback.

    The one place such errors are translated; ``translated`` applies it around a block, and the CLI
    applies it to whatever a command raises."""
    import errno
    import re

    where = f"{context}: " if context else ""
    if isinstance(err, FactorlabError):
        return err
    if isinstance(err, re.error):
        pattern = err.pattern.decode(errors="replace") if isinstance(err.pattern, bytes) else err.pattern
        return ConfigError(
            f"{where}{_clip(pattern)!r} is not a valid regular expression ({err.msg} at position {err.pos}); "
            "fix it, or escape a literal name with re.escape()."
        )
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" or _allocation_failed(err):
        reason = _clip(str(err).splitlines()[0] if str(err) else type(err).__name__)
        return ResourceError(
            f"{where}not enough memory ({reason}); "
            "lower the sizes (vocabulary, batch, rank, model) or use a machine with more memory."
        )
    if isinstance(err, ConnectionError) or type(err).__module__.split(".")[0] == "ray":
        return ConfigError(
            f"{where}cannot reach the Ray cluster ({type(err).__name__}: {_clip(str(err))}); check --address "
            "(ray://HOST:10001 or HOST:6379) and that the cluster runs the same Ray version, or drop "
            "--address to start a local one."
        )
    if isinstance(err, OSError):
        path = err.filename if err.filename is not None else ""
        reasons = {
            errno.EISDIR: "is a folder where a file is expected",
            errno.ENOTDIR: "has a file where a folder is expected (a part of the path is a file)",
            errno.EEXIST: "already exists and is not a folder",
            errno.ENOENT: "does not exist",
            errno.EACCES: "is not readable/writable by this user",
            errno.EPERM: "is not readable/writable by this user",
            errno.EROFS: "is on a read-only file system",
            errno.ENAMETOOLONG: "is too long a name",
            errno.ELOOP: "is a loop of symbolic links",
        }
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            return ResourceError(f"{where}no space left on the device writing {path}; free some disk space.")
        reason = reasons.get(err.errno, err.strerror or type(err).__name__)
        return ConfigError(f"{where}{path or 'the path'} {reason}; choose a path you can read/write.")
    return None


def _allocation_failed(err: BaseException) -> bool:
    text = str(err)
    return isinstance(err, RuntimeError) and (
        "can't allocate memory" in text or "not enough memory" in text or "Out of memory" in text
    )


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class translated:
    """``with translated("saving adapter 'default'"):`` turns what ``explain`` knows (OS, regex,
    allocation and Ray errors) into factorlab errors of the same kind, prefixed with the context;
    ``error`` replaces ConfigError (e.g. AdapterSaveError for writes)."""

    def __init__(self, context: str = "", error: type[FactorlabError] | None = None):
        self.context, self.error = context, error

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, err, tb) -> bool:
        if err is None or isinstance(err, FactorlabError):
            return False
        mapped = explain(err, self.context)
        if mapped is None:
            return False
        if self.error is not None and type(mapped) is ConfigError:
            mapped = self.error(str(mapped))
        raise mapped from None
