"""Adaptation methods, one folder each (config.py, model.py); layers live in factorlab.layers."""

from factorlab.methods.base import METHODS, AdapterConfig, Method, get_method, register_method
from factorlab.methods.compacter import (
    COMPACTER,
    COMPACTER_PLUS_PLUS,
    PHM_ADAPTER,
    CompacterConfig,
    CompacterPlusPlusConfig,
    PHMAdapterConfig,
)
from factorlab.methods.lora import LORA, LoraConfig

for _method in (LORA, COMPACTER, COMPACTER_PLUS_PLUS, PHM_ADAPTER):
    register_method(_method)

__all__ = [
    "METHODS",
    "AdapterConfig",
    "CompacterConfig",
    "CompacterPlusPlusConfig",
    "LoraConfig",
    "Method",
    "PHMAdapterConfig",
    "get_method",
    "register_method",
]
