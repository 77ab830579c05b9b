"""How MixLoRA is injected: a MixLoRA layer per gated feed-forward block, a LoRA per attention projection,
and the per-call router records behind the auxiliary loss."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from factorlab.core.method import Method, no_forward_state
from factorlab.layers.base import AdapterLayer
from factorlab.layers.lora import LoRALinear
from factorlab.layers.mixlora import MixLoRAFeedForward, RouterRecords, is_gated_mlp, switch_balance_loss
from factorlab.layers.shapes import is_conv1d, is_linear
from factorlab.methods.mixlora.config import MixLoraConfig


class MixLoRAShared(nn.Module):
    """The router records every block of one adapter writes in a call (no weights)."""

    def __init__(self, config: MixLoraConfig):
        super().__init__()
        self.records = RouterRecords()
        self.num_experts = config.num_experts
        self.coef = config.router_aux_loss_coef


def build_shared(base: nn.Module, config: MixLoraConfig, targets, loading: bool) -> MixLoRAShared:
    return MixLoRAShared(config)


def build_mixlora_layer(
    target: nn.Module,
    config: MixLoraConfig,
    adapter_name: str,
    module_name: str,
    existing: AdapterLayer | None,
    shared: MixLoRAShared | None = None,
) -> AdapterLayer:
    if is_gated_mlp(target):
        layer = existing if existing is not None else MixLoRAFeedForward(target)
        layer.update_layer(
            adapter_name,
            config.num_experts,
            config.r,
            config.lora_alpha,
            config.top_k,
            shared.records,
            config.init_lora_weights,
        )
        return layer
    layer = existing if existing is not None else LoRALinear(target, fan_in_fan_out=is_conv1d(target))
    layer.update_layer(
        adapter_name, r=config.r, lora_alpha=config.lora_alpha, init_lora_weights=config.init_lora_weights
    )
    return layer


@contextlib.contextmanager
def mixlora_forward(adapted, adapter_name: str, kwargs: dict, record: bool) -> Iterator:
    """Around one forward / generate: record the routers while training, and yield the balance loss."""
    shared: MixLoRAShared = adapted.shared_adapter_weights[adapter_name]
    records = shared.records
    with no_forward_state(adapted, adapter_name, kwargs, record):
        records.records.clear()
        records.record = record
        mask = kwargs.get("attention_mask")
        records.token_mask = mask if mask is not None and getattr(mask, "dim", lambda: 0)() == 2 else None
        try:
            yield (
                (lambda: shared.coef * switch_balance_loss(records, shared.num_experts))
                if shared.coef
                else None
            )
        finally:
            records.record = False


def accepts(module: nn.Module) -> bool:
    return is_linear(module) or is_gated_mlp(module)


def default_mixlora_roles(family: str | None) -> tuple[str, ...]:
    return ("attn_q", "attn_k", "attn_v", "attn_out")  # the config adds the MLP blocks (DEFAULT_TARGETS)


MIXLORA = Method(
    "mixlora",
    MixLoraConfig,
    (MixLoRAFeedForward, LoRALinear),  # type: ignore[arg-type]  # feed-forward blocks and attention LoRAs
    build_mixlora_layer,
    default_mixlora_roles,
    build_shared=build_shared,
    shared_trainable_parameters=lambda shared: iter(()),
    accepts=accepts,
    accepted_kinds="nn.Linear / Conv1D layers or gated feed-forward blocks (gate_proj, up_proj, down_proj)",
    forward_context=mixlora_forward,
    label="MixLoRA",
    not_combinable_hint="a MixLoRA adapter routes between its own experts: give it more num_experts",
    param_kinds=(
        (".router.", "MixLoRA routers"),
        (".experts.", "MixLoRA feed-forward experts"),
        (".lora_A.", "MixLoRA attention LoRA A"),
        (".lora_B.", "MixLoRA attention LoRA B"),
    ),
)
