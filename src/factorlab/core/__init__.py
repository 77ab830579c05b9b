"""The shared core: targeting, model surgery (AdaptedModel), adapter files, parameter counts."""

from factorlab.core.adapted import AdaptedModel, adapt
from factorlab.core.params import count_parameters
from factorlab.core.targeting import PRESETS, resolve_targets

__all__ = ["PRESETS", "AdaptedModel", "adapt", "count_parameters", "resolve_targets"]
