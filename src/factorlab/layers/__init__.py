"""Adapter layers: plain torch modules, readable top to bottom, no transformers import."""

from factorlab.layers.base import AdapterLayer
from factorlab.layers.bottleneck import BottleneckAdapterLayer
from factorlab.layers.lora import LoRAConv, LoRAEmbedding, LoRALayer, LoRALinear
from factorlab.layers.mixer import ExpertBank, LoRAMixerLinear
from factorlab.layers.modules_to_save import ModulesToSave
from factorlab.layers.phm import PHMFastWeights, PHMLinear, PHMRule

__all__ = [
    "AdapterLayer",
    "BottleneckAdapterLayer",
    "ExpertBank",
    "LoRAConv",
    "LoRAEmbedding",
    "LoRALayer",
    "LoRALinear",
    "LoRAMixerLinear",
    "ModulesToSave",
    "PHMFastWeights",
    "PHMLinear",
    "PHMRule",
]
