"""LoRAHub (Huang et al., 2023, "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA
Composition"): one scalar weight per LoRA module, found without gradients, merged into one static LoRA.

    m(w) = (sum_i w_i A_i, sum_i w_i B_i)                     eq. (1): A and B are composed separately
    w*   = argmin_w  L(few examples; base + m(w)) + l1 * sum_i |w_i|      eq. (2), w in [-1.5, 1.5]^N

The search is nevergrad's NGOpt from w = 0 for ``budget`` loss evaluations, as the original runs it
(its defaults: budget 40, l1 0.05, bounds 1.5). The original is hard-wired to seq2seq models; here the
loss is any model's own loss on its examples (decoder-only models included). Every module of every
LoRA must have the same shape, rank and scaling (the composition adds factors elementwise).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from factorlab.core.adapted import AdaptedModel, adapt
from factorlab.errors import ConfigError
from factorlab.methods.lora.config import LoraConfig
from factorlab.peft_format import PeftLora, read_peft_lora

BUDGET, L1, BOUND = 40, 0.05, 1.5  # the original's defaults


def read_loras(folders: Sequence[str | os.PathLike]) -> list[PeftLora]:
    """The PEFT LoRA folders, checked to be composable: same modules, ranks, shapes and scalings."""
    if len(folders) < 2:
        raise ConfigError(f"LoRAHub composes at least two LoRA folders, got {len(folders)}.")
    loras = [read_peft_lora(folder) for folder in folders]
    first = loras[0]
    for lora in loras[1:]:
        if set(lora.weights) != set(first.weights):
            odd = sorted(set(lora.weights) ^ set(first.weights))
            raise ConfigError(
                f"LoRAHub adds the LoRAs' factors module by module, but {lora.path} and {first.path} adapt "
                f"different modules ({odd[:3]}...); train the LoRAs on the same target_modules."
            )
        for module, (a, b) in lora.weights.items():
            a0, b0 = first.weights[module]
            if a.shape != a0.shape or b.shape != b0.shape or lora.scaling(module) != first.scaling(module):
                raise ConfigError(
                    f"LoRAHub adds the LoRAs' factors elementwise, but at {module} the LoRA in {lora.path} "
                    f"has A {tuple(a.shape)}, B {tuple(b.shape)}, scaling {lora.scaling(module):g} while the "
                    f"one in {first.path} has A {tuple(a0.shape)}, B {tuple(b0.shape)}, scaling "
                    f"{first.scaling(module):g}; give LoRAs of one rank and lora_alpha."
                )
    return loras


def compose(
    loras: Sequence[PeftLora], weights: Sequence[float]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Eq. (1): per module, (sum_i w_i A_i, sum_i w_i B_i)."""
    if len(weights) != len(loras):
        raise ConfigError(f"{len(weights)} weights for {len(loras)} LoRAs; give one weight per LoRA.")
    out = {}
    for module in loras[0].weights:
        a = sum(float(w) * lora.weights[module][0].float() for w, lora in zip(weights, loras))
        b = sum(float(w) * lora.weights[module][1].float() for w, lora in zip(weights, loras))
        out[module] = (a, b)
    return out


def lorahub_model(base: nn.Module, loras: Sequence[PeftLora], weights: Sequence[float]) -> AdaptedModel:
    """A plain LoRA adapter on a copy of ``base`` holding the composition m(w): it saves as a PEFT folder
    and merges into the base (``merge_and_unload``) like any LoRA."""
    first = loras[0]
    module = next(iter(first.weights))
    config = LoraConfig(
        r=first.ranks[module],
        lora_alpha=first.alphas[module],
        use_rslora=first.use_rslora,
        target_modules=sorted(first.weights),
    )
    adapted = adapt(copy.deepcopy(base), config)
    set_composition(adapted, loras, weights)
    return adapted


@torch.no_grad()
def set_composition(adapted: AdaptedModel, loras: Sequence[PeftLora], weights: Sequence[float]) -> None:
    """Write m(w) into ``adapted``'s LoRA layers (built by ``lorahub_model``), in place."""
    composed = compose(loras, weights)
    layers = dict(adapted.adapter_layers())
    for module, (a, b) in composed.items():
        layer = layers[module]
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)


@dataclass
class LoraHubResult:
    weights: list[float]
    """w*, one per LoRA, in the folders' order."""
    loss: float
    """The examples' loss at w* (without the l1 term)."""
    model: AdaptedModel
    """The base with m(w*) as a LoRA adapter."""
    history: list[tuple[list[float], float]] = field(default_factory=list)
    """Every evaluated (w, loss + l1 term), in order."""


def lorahub_search(
    base: nn.Module,
    folders: Sequence[str | os.PathLike],
    loss: Callable[[nn.Module], float],
    budget: int = BUDGET,
    l1: float = L1,
    bound: float = BOUND,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> LoraHubResult:
    """Eq. (2): search w with NGOpt for ``budget`` evaluations of ``loss(model)`` (the model in eval mode,
    gradients off; e.g. the mean loss of a few examples) plus ``l1 * sum |w|``; returns w*, its loss and
    the composed model. Reproducible for a seed."""
    try:
        import nevergrad as ng
        import numpy as np
    except ImportError:
        raise ConfigError("LoRAHub searches with nevergrad: pip install nevergrad") from None
    if not isinstance(budget, int) or budget < 1:
        raise ConfigError(f"budget must be a positive number of loss evaluations, got {budget!r}.")
    loras = read_loras(folders)
    model = lorahub_model(base, loras, [0.0] * len(loras))
    model.eval()
    parametrization = ng.p.Array(init=np.zeros(len(loras)), lower=-bound, upper=bound)
    parametrization.random_state = np.random.RandomState(seed)
    optimizer = ng.optimizers.NGOpt(parametrization=parametrization, budget=budget)
    history: list[tuple[list[float], float]] = []
    for step in range(budget):
        candidate = optimizer.ask()
        w = [float(v) for v in candidate.value]
        set_composition(model, loras, w)
        with torch.no_grad():
            value = float(loss(model))
        if value != value:  # NaN: the search may wander where the composition diverges
            value = float("inf")
        objective = value + l1 * sum(abs(v) for v in w)
        optimizer.tell(candidate, objective)
        history.append((w, objective))
        if progress is not None:
            progress(step + 1)
    best = [float(v) for v in optimizer.provide_recommendation().value]
    set_composition(model, loras, best)
    with torch.no_grad():
        best_loss = float(loss(model))
    return LoraHubResult(best, best_loss, model, history)
