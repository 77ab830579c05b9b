"""Adapter layers: plain torch modules, readable top to bottom, no transformers import."""

from factorlab.layers.base import AdapterLayer
from factorlab.layers.lora import LoRALinear

__all__ = ["AdapterLayer", "LoRALinear"]
