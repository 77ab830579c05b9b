"""Adaptation methods, one folder each (config.py, model.py); layers live in factorlab.layers."""

from factorlab.methods.base import METHODS, AdapterConfig, Method, get_method, register_method
from factorlab.methods.lora import LORA, LoraConfig

register_method(LORA)

__all__ = ["METHODS", "AdapterConfig", "LoraConfig", "Method", "get_method", "register_method"]
