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
    ResourceError,
    TargetError,
    TrainingDivergedError,
)
from factorlab.interop.peft import get_peft_model_state_dict, set_peft_model_state_dict
from factorlab.layers.base import AdapterLayer
from factorlab.methods import (
    BUILT_IN,
    AdapterConfig,
    CompacterConfig,
    CompacterPlusPlusConfig,
    ExpertSpec,
    HydraLoraConfig,
    LoraConfig,
    LoraMixerConfig,
    Method,
    MixLoraConfig,
    PHMAdapterConfig,
    register_method,
)
from factorlab.version import __version__

for _method in BUILT_IN:  # the built-in methods; others register themselves the same way
    register_method(_method)

__all__ = [
    "AdaptedModel",
    "AdapterConfig",
    "AdapterLayer",
    "AdapterLoadError",
    "AdapterSaveError",
    "CompacterConfig",
    "CompacterPlusPlusConfig",
    "ConfigError",
    "ExpertSpec",
    "FactorlabError",
    "HydraLoraConfig",
    "LoraConfig",
    "LoraMixerConfig",
    "Method",
    "MixLoraConfig",
    "PHMAdapterConfig",
    "ResourceError",
    "TargetError",
    "TrainingDivergedError",
    "__version__",
    "adapt",
    "count_parameters",
    "get_peft_model_state_dict",
    "register_method",
    "set_peft_model_state_dict",
]
