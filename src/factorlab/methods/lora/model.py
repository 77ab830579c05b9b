"""How LoRA is injected: one LoRALinear per target linear layer."""

from __future__ import annotations

from torch import nn

from factorlab.core.targeting import is_conv1d
from factorlab.errors import ConfigError
from factorlab.layers.lora import LoRALinear
from factorlab.methods.base import Method
from factorlab.methods.lora.config import LoraConfig


def build_lora_layer(
    target: nn.Module,
    config: LoraConfig,
    adapter_name: str,
    module_name: str,
    existing: LoRALinear | None,
    shared: nn.Module | None = None,
) -> LoRALinear:
    conv1d = is_conv1d(target)
    if config.fan_in_fan_out is not None and config.fan_in_fan_out != conv1d:
        kind = "a Conv1D (weight stored in x out)" if conv1d else "an nn.Linear (weight stored out x in)"
        raise ConfigError(
            f"{module_name} is {kind} but fan_in_fan_out={config.fan_in_fan_out}; "
            "leave fan_in_fan_out=None to detect it per module."
        )
    layer = existing if existing is not None else LoRALinear(target, fan_in_fan_out=conv1d)
    layer.update_layer(
        adapter_name,
        r=config.rank_for(module_name),
        lora_alpha=config.alpha_for(module_name),
        lora_dropout=config.lora_dropout,
        use_rslora=config.use_rslora,
        init_lora_weights=config.init_lora_weights,
    )
    return layer


def default_lora_roles(family: str | None) -> tuple[str, ...]:
    """PEFT's defaults in role form: query and value projections; Mamba's input projections."""
    if family in ("mamba", "falcon_mamba"):
        return ("ssm_in", "ssm_x")
    return ("attn_q", "attn_v")


LORA = Method("lora", LoraConfig, LoRALinear, build_lora_layer, default_lora_roles)
