"""How LoRA is injected: one LoRA layer per target (linear, Conv1D, embedding or convolution)."""

from __future__ import annotations

from torch import nn

from factorlab.core.method import Method
from factorlab.errors import ConfigError
from factorlab.layers.base import AdapterLayer
from factorlab.layers.lora import LoRAConv, LoRAEmbedding, LoRALayer, LoRALinear
from factorlab.layers.shapes import is_conv1d, is_linear
from factorlab.methods.lora.combine import combine_lora_adapters
from factorlab.methods.lora.config import LoraConfig


def build_lora_layer(
    target: nn.Module,
    config: LoraConfig,
    adapter_name: str,
    module_name: str,
    existing: LoRALayer | None,
    shared: nn.Module | None = None,
) -> LoRALayer:
    if existing is not None:
        layer = existing
    elif isinstance(target, nn.Embedding):
        layer = LoRAEmbedding(target)
    elif isinstance(target, (nn.Conv1d, nn.Conv2d)):
        layer = LoRAConv(target)
    else:
        conv1d = is_conv1d(target)
        if config.fan_in_fan_out is not None and config.fan_in_fan_out != conv1d:
            kind = "a Conv1D (weight stored in x out)" if conv1d else "an nn.Linear (weight stored out x in)"
            raise ConfigError(
                f"{module_name} is {kind} but fan_in_fan_out={config.fan_in_fan_out}; "
                "leave fan_in_fan_out=None to detect it per module."
            )
        layer = LoRALinear(target, fan_in_fan_out=conv1d)
    layer.update_layer(
        adapter_name,
        r=config.rank_for(module_name),
        lora_alpha=config.alpha_for(module_name),
        lora_dropout=config.lora_dropout,
        use_rslora=config.use_rslora,
        init_lora_weights=config.init_lora_weights,
        use_dora=config.use_dora,
    )
    return layer


def lora_bias_parameters(base: nn.Module, config: LoraConfig, targets: list[str]) -> list[str]:
    """PEFT's ``bias``: "all" = every bias of the base model, "lora_only" = those of adapted layers."""
    if config.bias == "none":
        return []
    adapter_params = {
        id(p)
        for m in base.modules()
        if isinstance(m, AdapterLayer)
        for p in m.parameters()
        if all(p is not q for q in m.base_layer.parameters())
    }
    biases = [  # tied aliases too (BERT: decoder.bias is predictions.bias), as PEFT saves both
        n
        for n, p in base.named_parameters(remove_duplicate=False)
        if n.endswith("bias") and id(p) not in adapter_params
    ]
    if config.bias == "lora_only":
        own = {f"{t}.base_layer.bias" for t in targets}
        biases = [n for n in biases if n in own]
    return biases


def default_lora_roles(family: str | None) -> tuple[str, ...]:
    """PEFT's defaults in role form: query and value projections; Mamba's input projections."""
    if family in ("mamba", "falcon_mamba"):
        return ("ssm_in", "ssm_x")
    return ("attn_q", "attn_v")


def lora_accepts(module: nn.Module) -> bool:
    return is_linear(module) or isinstance(module, (nn.Embedding, nn.Conv1d, nn.Conv2d))


LORA = Method(
    "lora",
    LoraConfig,
    LoRALayer,
    build_lora_layer,
    default_lora_roles,
    in_place_parameters=lora_bias_parameters,
    peft_type="LORA",
    label="LoRA",
    combinable=True,
    combine=combine_lora_adapters,
    param_kinds=(
        (".lora_A.", "LoRA A matrices"),
        (".lora_B.", "LoRA B matrices"),
        (".lora_embedding_A.", "LoRA A matrices (embeddings)"),
        (".lora_embedding_B.", "LoRA B matrices (embeddings)"),
        (".lora_magnitude_vector.", "DoRA magnitudes"),
    ),
    accepts=lora_accepts,
    accepted_kinds="nn.Linear, Conv1D, nn.Embedding, nn.Conv1d or nn.Conv2d layers",
)
