"""factorlab: factorized adaptation of neural networks, and a lab for what fine-tuning does to knowledge.

Components: ``factorlab.layers`` (adapter layers, pure torch), ``factorlab.core`` (targeting, model
surgery, adapter files), ``factorlab.methods`` (one folder per method), ``factorlab.ocr`` (the
out-of-context-reasoning task and model). Runnable experiments live in ``factorlab.recipes`` and
are reachable from the ``factorlab`` CLI.
"""

from factorlab.core import AdaptedModel, adapt, count_parameters
from factorlab.errors import (
    AdapterLoadError,
    AdapterSaveError,
    ConfigError,
    FactorlabError,
    TargetError,
    TrainingDivergedError,
)
from factorlab.methods import (
    AdapterConfig,
    CompacterConfig,
    CompacterPlusPlusConfig,
    ExpertSpec,
    LoraConfig,
    LoraMixerConfig,
    PHMAdapterConfig,
    register_method,
)

__version__ = "0.1.0"

__all__ = [
    "AdaptedModel",
    "AdapterConfig",
    "AdapterLoadError",
    "AdapterSaveError",
    "CompacterConfig",
    "CompacterPlusPlusConfig",
    "ConfigError",
    "ExpertSpec",
    "FactorlabError",
    "LoraConfig",
    "LoraMixerConfig",
    "PHMAdapterConfig",
    "TargetError",
    "TrainingDivergedError",
    "__version__",
    "adapt",
    "count_parameters",
    "register_method",
]
