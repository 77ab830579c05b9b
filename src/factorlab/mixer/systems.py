"""The comparison's non-mixer systems, built on the same base and targets: one multi-task LoRA with the
mixer's total rank, Compacter++, full fine-tuning, HydraLoRA, MixLoRA, and X-LoRA (peft) over the same PEFT
experts."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from factorlab.core.adapted import AdaptedModel, adapt
from factorlab.errors import ConfigError
from factorlab.methods.compacter.config import CompacterPlusPlusConfig, reduction_for
from factorlab.methods.hydralora.config import HydraLoraConfig
from factorlab.methods.lora.config import LoraConfig
from factorlab.methods.mixlora.config import MixLoraConfig
from factorlab.mixer.tasks import Example
from factorlab.mixer.train import collate


def mixer_targets(cfg, base: nn.Module):
    """The projections the mixer adapts (its default roles unless ``cfg.target_modules``)."""
    from factorlab.core.targeting import model_family, resolve_targets
    from factorlab.methods.lora_mixer.model import default_mixer_roles

    if cfg.target_modules is not None:
        return cfg.target_modules
    return resolve_targets(base, None, default_roles=default_mixer_roles(model_family(base)))


def multitask_lora(cfg, base: nn.Module) -> AdaptedModel:
    """One LoRA on the mixed data with the mixer's total rank (E x r) on the mixer's projections;
    alpha grows with the rank so alpha / r, the update's scale, is the experts'."""
    experts = len(cfg.tasks)
    config = LoraConfig(
        r=cfg.r * experts, lora_alpha=cfg.lora_alpha * experts, target_modules=mixer_targets(cfg, base)
    )
    return adapt(copy.deepcopy(base), config)


def hydralora(cfg, base: nn.Module) -> AdaptedModel:
    """HydraLoRA on the mixer's projections, trained from scratch on the mixed data: one A of the experts'
    rank, one B per task (the router learns which), the experts' alpha / r."""
    config = HydraLoraConfig(
        r=cfg.r,
        num_experts=len(cfg.tasks),
        lora_alpha=cfg.lora_alpha,
        target_modules=mixer_targets(cfg, base),
    )
    return adapt(copy.deepcopy(base), config)


def mixlora(cfg, base: nn.Module) -> AdaptedModel:
    """MixLoRA trained from scratch on the mixed data: a LoRA of the experts' rank on the mixer's attention
    projections, one routed LoRA expert per task in every feed-forward block, top-2 per token."""
    targets = mixer_targets(cfg, base)
    targets = [targets] if isinstance(targets, str) else list(targets)
    config = MixLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        num_experts=len(cfg.tasks),
        top_k=min(2, len(cfg.tasks)),
        target_modules=[*targets, "mlp"],
    )
    return adapt(copy.deepcopy(base), config)


def compacter_plus_plus(base: nn.Module) -> AdaptedModel:
    """Compacter++ as the paper trains it (phm_dim 4, gelu_new, LayerNorms trained), with the largest
    reduction factor <= 32 whose bottleneck phm_dim divides (SmolLM2's 576: 28, a bottleneck of 20)."""
    hidden = base.config.hidden_size
    config = CompacterPlusPlusConfig.paper_recipe(reduction_factor=reduction_for(hidden))
    return adapt(copy.deepcopy(base), config)


def full_finetune(base: nn.Module) -> nn.Module:
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def xlora(base: nn.Module, folders: Sequence[str | Path]) -> nn.Module:
    """peft's X-LoRA over the same frozen PEFT experts, in order (only its scaling classifier trains). X-LoRA
    refuses a model that would use a KV cache, so the copy's cache is off (generation re-reads the prompt)."""
    try:
        import peft
    except ImportError:
        raise ConfigError("the X-LoRA baseline needs peft: pip install peft") from None
    model = copy.deepcopy(base)
    model.config.use_cache = False
    config = peft.XLoraConfig(
        task_type="CAUSAL_LM",
        hidden_size=model.config.hidden_size,
        # peft 0.21 loads the experts as "0", "1", ... whatever they are called, then looks them up by
        # the given names: any other names fail with a KeyError on the first forward.
        adapters={str(e): str(folder) for e, folder in enumerate(folders)},
    )
    return peft.get_peft_model(model, config)


@torch.no_grad()
def xlora_routing_report(model: nn.Module, evals: Sequence[Sequence[Example]], pad_id: int):
    """X-LoRA's counterpart of ``routing_report``: (mean scaling per (task, expert), router accuracy,
    per task), from its latest scalings (batch, length, layers, experts) averaged over real tokens
    and layers."""
    usage, per_task = [], []
    model.eval()
    for k, examples in enumerate(evals):
        weights = []
        for start in range(0, len(examples), 64):
            chunk = [dataclasses.replace(e, answer=[]) for e in examples[start : start + 64]]
            batch = collate(chunk, pad_id)
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            scalings = model.get_latest_scalings().float().mean(2)  # (batch, length, experts)
            real = batch["attention_mask"].unsqueeze(-1).float()
            weights.append((scalings * real).sum(1) / real.sum(1))
        weights = torch.cat(weights)
        usage.append(weights.mean(0))
        per_task.append(float((weights.argmax(-1) == k).float().mean()))
    total = sum(len(e) for e in evals)
    overall = sum(acc * len(e) for acc, e in zip(per_task, evals)) / total
    return torch.stack(usage), overall, per_task
