"""Adaptation methods, one folder each (config.py, model.py); layers live in factorlab.layers. The
package's root (factorlab/__init__.py) registers them."""

from factorlab.core.method import METHODS, AdapterConfig, Method, get_method, register_method
from factorlab.methods.compacter import (
    COMPACTER,
    COMPACTER_PLUS_PLUS,
    PHM_ADAPTER,
    CompacterConfig,
    CompacterPlusPlusConfig,
    PHMAdapterConfig,
)
from factorlab.methods.hydralora import HYDRALORA, HydraLoraConfig
from factorlab.methods.lora import LORA, LoraConfig
from factorlab.methods.lora_mixer import LORA_MIXER, ExpertSpec, LoraMixerConfig
from factorlab.methods.mixlora import MIXLORA, MixLoraConfig

BUILT_IN = (LORA, COMPACTER, COMPACTER_PLUS_PLUS, PHM_ADAPTER, LORA_MIXER, HYDRALORA, MIXLORA)

__all__ = [
    "BUILT_IN",
    "METHODS",
    "AdapterConfig",
    "CompacterConfig",
    "CompacterPlusPlusConfig",
    "ExpertSpec",
    "HydraLoraConfig",
    "LoraConfig",
    "LoraMixerConfig",
    "Method",
    "MixLoraConfig",
    "PHMAdapterConfig",
    "get_method",
    "register_method",
]
