"""How HydraLoRA is injected: one HydraLoRA layer per target linear (or Conv1D) projection."""

from __future__ import annotations

from torch import nn

from factorlab.core.method import Method
from factorlab.layers.hydra import HydraLoRALinear
from factorlab.layers.shapes import is_conv1d
from factorlab.methods.hydralora.config import HydraLoraConfig


def build_hydra_layer(
    target: nn.Module,
    config: HydraLoraConfig,
    adapter_name: str,
    module_name: str,
    existing: HydraLoRALinear | None,
    shared: nn.Module | None = None,
) -> HydraLoRALinear:
    layer = existing if existing is not None else HydraLoRALinear(target, fan_in_fan_out=is_conv1d(target))
    layer.update_layer(
        adapter_name, config.r, config.num_experts, config.lora_alpha, config.init_lora_weights
    )
    return layer


def default_hydra_roles(family: str | None) -> tuple[str, ...]:
    return ("attn_q", "attn_k", "attn_v", "attn_out", "ffn_in", "ffn_out")


HYDRALORA = Method(
    "hydralora",
    HydraLoraConfig,
    HydraLoRALinear,
    build_hydra_layer,
    default_hydra_roles,
    label="HydraLoRA",
    not_combinable_hint="a HydraLoRA adapter routes between its own Bs: give it more num_experts",
    param_kinds=(
        (".lora_A.", "HydraLoRA shared A"),
        (".lora_B.", "HydraLoRA expert Bs"),
        (".router.", "HydraLoRA routers"),
    ),
)
