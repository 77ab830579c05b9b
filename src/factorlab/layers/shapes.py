"""What kind of layer a module is and which transformer block it sits in; pure torch, shared by
the layers, the methods and the core's targeting."""

from __future__ import annotations

import re

from torch import nn

LAYER_PATTERNS = ("layers", "h", "block", "blocks", "layer")  # the ModuleList names of HF blocks


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D (weight stored (in, out)), recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_linear(module: nn.Module) -> bool:
    """An nn.Linear or Conv1D, or an adapter layer already wrapping one."""
    base = getattr(module, "base_layer", None)
    if base is not None and hasattr(module, "adapter_weights"):
        return is_linear(base)
    return isinstance(module, nn.Linear) or is_conv1d(module)


def weight_dims(weight, fan_in_fan_out: bool) -> tuple[int, int]:
    """(in_features, out_features) of a weight stored (out, in), or (in, out) when fan_in_fan_out."""
    return (weight.shape[0], weight.shape[1]) if fan_in_fan_out else (weight.shape[1], weight.shape[0])


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a Conv1D (whose weight is stored (in, out))."""
    return weight_dims(module.weight, is_conv1d(module))


def layer_index(name: str) -> int | None:
    """The block index in a module name ("model.layers.3.self_attn.q_proj" -> 3), or None."""
    for pattern in LAYER_PATTERNS:
        m = re.match(rf"(?:^|.*\.){pattern}\.(\d+)\.", name)
        if m:
            return int(m.group(1))
    return None
