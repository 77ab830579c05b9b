"""PEFT's ``add_weighted_adapter`` for LoRA on linear layers: cat, linear and svd combinations.

For each target module with adapters i = 1..n (weights w_i, scalings s_i, factors A_i (r_i, in) and
B_i (out, r_i)), the new adapter has alpha = r, so its own scaling is 1 (PEFT's rule; like PEFT,
it keeps the first adapter's use_rslora, which then makes it alpha / sqrt(r)):

    cat:    A = [w_1 s_1 A_1; ...; w_n s_n A_n]  B = [B_1, ..., B_n]  so B A = sum_i w_i s_i B_i A_i
    linear: A = sum_i sign_i sqrt|w_i s_i| A_i   B = sum_i sqrt|w_i s_i| B_i  (equal ranks; PEFT's rule)
    svd:    B A = the best rank-k approximation of sum_i w_i s_i B_i A_i  (k = svd_rank or max r_i)
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch

from factorlab.errors import ConfigError
from factorlab.layers.lora import LoRALayer, LoRALinear
from factorlab.methods.lora.config import LoraConfig

if TYPE_CHECKING:
    from factorlab.core.adapted import AdaptedModel

COMBINATIONS = ("cat", "linear", "svd")


def combine_lora_adapters(
    adapted: AdaptedModel,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
) -> None:
    """Add ``adapter_name``, a combination of the LoRA ``adapters`` (see the module docstring)."""
    configs = _check(adapted, adapters, weights, combination_type, svd_rank)
    if len(adapters) == 1:
        combination_type = "linear"  # as PEFT: one adapter is a rescaling
    ranks = [max([c.r, *c.rank_pattern.values()]) for c in configs]
    if combination_type == "linear" and len(set(ranks)) != 1:
        raise ConfigError(
            f"combination_type='linear' needs adapters of one rank, got ranks {ranks}; use 'cat' or 'svd'."
        )
    new_rank = {"linear": ranks[0], "cat": sum(ranks), "svd": svd_rank or max(ranks)}[combination_type]
    layers = {name: layer for name, layer in adapted.adapter_layers() if isinstance(layer, LoRALayer)}
    targets = sorted(n for n, layer in layers.items() if any(a in layer.adapter_names for a in adapters))
    config = dataclasses.replace(
        configs[0],
        r=new_rank,
        lora_alpha=new_rank,
        target_modules=targets,
        target_roles=None,
        exclude_modules=None,
        layers_to_transform=None,
        rank_pattern={},
        alpha_pattern={},
        init_lora_weights=True,
        fan_in_fan_out=None,
        inference_mode=False,
    )
    adapted.add_adapter(adapter_name, config)
    with torch.no_grad():
        for name in targets:
            layer = layers[name]
            present = [(a, w) for a, w in zip(adapters, weights) if a in layer.adapter_names]
            a_new, b_new = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            a_new.zero_()
            b_new.zero_()
            if combination_type == "cat":
                a_cat = torch.cat([layer.lora_A[a].weight * w * layer.scaling[a] for a, w in present])
                b_cat = torch.cat([layer.lora_B[a].weight for a, _ in present], dim=1)
                a_new[: a_cat.shape[0]] = a_cat
                b_new[:, : b_cat.shape[1]] = b_cat
            elif combination_type == "linear":
                for a, w in present:
                    ws = w * layer.scaling[a]
                    a_new += math.copysign(math.sqrt(abs(ws)), ws) * layer.lora_A[a].weight
                    b_new += math.sqrt(abs(ws)) * layer.lora_B[a].weight
            else:
                delta = sum(w * layer.delta_weight(a, out_in=True) for a, w in present)  # (out, in)
                u, s, vh = torch.linalg.svd(delta, full_matrices=False)
                k = min(new_rank, s.numel())
                b_new[:, :k] = u[:, :k] * s[:k]
                a_new[:k] = vh[:k]


def _check(adapted, adapters, weights, combination_type, svd_rank) -> list[LoraConfig]:
    if combination_type not in COMBINATIONS:
        raise ConfigError(
            f"combination_type {combination_type!r} is not supported; choose from {COMBINATIONS} (PEFT's "
            "ties/dare variants are not in factorlab)."
        )
    if not adapters or len(adapters) != len(weights):
        raise ConfigError(f"give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights.")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise ConfigError(f"weights must be finite numbers, got {weights!r}.")
    if svd_rank is not None and (not isinstance(svd_rank, int) or isinstance(svd_rank, bool) or svd_rank < 1):
        raise ConfigError(f"svd_rank must be a positive integer, got {svd_rank!r}.")
    configs = []
    for name in adapters:
        config = adapted.adapter_configs.get(name)
        if config is None:
            raise ConfigError(f"no adapter named {name!r}; adapters: {sorted(adapted.adapter_configs)}.")
        if not isinstance(config, LoraConfig):
            raise ConfigError(f"add_weighted_adapter combines LoRA adapters; {name!r} is {config.method}.")
        if (
            config.use_dora
            or config.bias != "none"
            or config.modules_to_save
            or config.task_type in TASKS_WITH_HEADS
        ):
            raise ConfigError(
                f"{name!r} uses DoRA, bias training or modules_to_save; factorlab combines plain LoRA "
                "adapters only."
            )
        configs.append(config)
    for name, layer in adapted.adapter_layers():
        if any(a in layer.adapter_names for a in adapters) and not isinstance(layer, LoRALinear):
            raise ConfigError(
                f"{name} is a {type(layer).__name__}; factorlab combines LoRA on linear layers only."
            )
    return configs


TASKS_WITH_HEADS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")
