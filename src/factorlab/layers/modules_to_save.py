"""Whole modules trained along with an adapter (PEFT's ``modules_to_save``).

Each adapter gets its own trainable copy of the module; the original stays untouched, so
``disable_adapters()`` and other adapters still see the base model. Compacter's recipe uses
this to train the LayerNorms. Pure torch.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from factorlab.layers.base import AdapterLayer, copy_state_exact


class ModulesToSave(AdapterLayer):
    adapter_weights = ("modules_to_save",)

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.modules_to_save = nn.ModuleDict()

    def update_layer(self, name: str) -> None:
        module = copy.deepcopy(self.base_layer)
        for p in module.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = module

    can_merge = True

    @torch.no_grad()
    def merge(self, names=None) -> None:
        """Put the active copy's weights into the original module (the original is kept for unmerge)."""
        if self.merged_adapters or not self.active_adapters:
            return
        name = self.active_adapters[-1]
        self._original_state = {k: v.clone() for k, v in self.base_layer.state_dict().items()}
        self.base_layer.load_state_dict(self.modules_to_save[name].state_dict())
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged_adapters:
            self.base_layer.load_state_dict(self._original_state)
            self.merged_adapters.clear()

    # Keys as PEFT saves them: the copy's own names ("weight"), not "modules_to_save.weight".
    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        return dict(self.modules_to_save[name].state_dict()) if name in self.modules_to_save else {}

    def load_adapter_state_dict(self, name: str, tensors: dict[str, torch.Tensor], where: str) -> None:
        tensors = {
            k.removeprefix("modules_to_save."): v for k, v in tensors.items()
        }  # files of factorlab 0.1
        copy_state_exact(self.adapter_state_dict(name), tensors, where)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        if self.disabled or not self.active_adapters or self.merged_adapters:
            return self.base_layer(*args, **kwargs)
        return self.modules_to_save[self.active_adapters[-1]](*args, **kwargs)
