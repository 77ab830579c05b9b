"""Exceptions. Every message names the problem and the fix."""


class FactorlabError(Exception):
    """Base class of factorlab's own errors."""


class ConfigError(FactorlabError, ValueError):
    """A configuration value is invalid; the message says which one and what would work."""


class TrainingDivergedError(FactorlabError, RuntimeError):
    """Training produced a non-finite loss. factorlab stops rather than continue with NaNs."""
