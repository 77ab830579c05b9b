"""Bottleneck adapters on a layer's output: h -> h + up(act(down(h))), before the residual add.

Wrapping the projection that ends a block (attention output, FFN output) puts the adapter exactly
where Houlsby adapters and Compacter put it: on the block's output, before it is added to the
residual stream. ``down`` and ``up`` are PHMLinear layers (Compacter, PHM-Adapter). Pure torch.
"""

from __future__ import annotations

import torch
from torch import nn

from factorlab.errors import ConfigError
from factorlab.layers.base import AdapterLayer
from factorlab.layers.shapes import linear_dims

ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_new": lambda: nn.GELU(approximate="tanh"),  # the tanh GELU of T5 and the Compacter code
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
    "leakyrelu": nn.LeakyReLU,
    "identity": nn.Identity,
}


def activation(name: str) -> nn.Module:
    if name.lower() not in ACTIVATIONS:
        raise ConfigError(f"unknown non_linearity {name!r}; choose one of {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name.lower()]()


def output_features(module: nn.Module) -> int:
    """Width of a linear layer's output (nn.Linear weight (out, in); Conv1D weight (in, out))."""
    return linear_dims(module)[1]


class BottleneckAdapterLayer(AdapterLayer):
    """base(x), then each active adapter in turn: h <- h + up(act(down(h)))."""

    adapter_weights = ("adapter_down", "adapter_up")
    adapter_extras = ("adapter_act",)

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.hidden_size = output_features(base_layer)
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_act = nn.ModuleDict()

    def update_layer(self, name: str, down: nn.Module, up: nn.Module, non_linearity: str) -> None:
        self.adapter_down[name] = down
        self.adapter_up[name] = up
        self.adapter_act[name] = activation(non_linearity)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        h = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return h
        for name in self.active_adapters:
            down, up = self.adapter_down[name], self.adapter_up[name]
            h = h + up(self.adapter_act[name](down(h)))
        return h
