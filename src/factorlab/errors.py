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
