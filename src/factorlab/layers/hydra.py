"""HydraLoRA (Tian et al., 2024, "HydraLoRA: An Asymmetric LoRA Architecture for Efficient Fine-Tuning"):
one A shared by every expert, one B per expert, a router over the Bs, all trained from scratch.

    y = base(x) + s * sum_e w_e(x) B_e A x          the paper's eq. (6): W = W0 + sum_i w_i B_i A
    w(x) = softmax(W_g x)                            per token; W_g (E, in), no bias

    A (r, in) shared;  B_e (out, r);  s = alpha / r

All Bs act in one GEMM: h = s * x A^T (N, r), then (w ⊗ h) (N, E * r) times B_cat^T (E * r, out).
Routing depends on each token, so the update cannot be merged into the base weight. Pure torch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from factorlab.layers.base import AdapterLayer
from factorlab.layers.lora import adapter_dtype, init_lora_pair
from factorlab.layers.shapes import weight_dims


class ExpertBs(nn.Module):
    """The experts' B matrices stacked, ``weight`` (E, out, r)."""

    def __init__(self, experts: int, out_features: int, r: int, **factory):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(experts, out_features, r, **factory))


class HydraLoRALinear(AdapterLayer):
    """A frozen linear layer plus, per adapter name, a shared A, E Bs and a router."""

    adapter_weights = ("lora_A", "lora_B", "router")
    adapter_extras = ("scaling",)

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False):
        super().__init__(base_layer)
        self.in_features, self.out_features = weight_dims(base_layer.weight, fan_in_fan_out)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.router = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.last_routing: dict[str, torch.Tensor] = {}  # (tokens, E) of the latest forward, detached

    def update_layer(
        self, name: str, r: int, experts: int, lora_alpha: float, init_lora_weights: bool | str = True
    ) -> None:
        weight = self.base_layer.weight
        factory = {"device": weight.device, "dtype": adapter_dtype(weight)}
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B[name] = ExpertBs(experts, self.out_features, r, **factory)
        self.router[name] = nn.Linear(self.in_features, experts, bias=False, **factory)
        with torch.no_grad():
            for e in range(experts):  # A drawn once, then each B as LoRA draws its B
                b = self.lora_B[name].weight[e]
                if e == 0:
                    init_lora_pair(self.lora_A[name].weight, b, init_lora_weights, r)
                elif init_lora_weights is False:
                    nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        self.scaling[name] = lora_alpha / r

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        for name in self.active_adapters:
            a, bs, router = self.lora_A[name], self.lora_B[name].weight, self.router[name]
            flat = x.reshape(-1, self.in_features).to(a.weight.dtype)  # (N, in)
            logits = router(flat)
            weights = torch.softmax(logits, -1, dtype=torch.promote_types(logits.dtype, torch.float32))
            weights = weights.to(flat.dtype)  # (N, E), at least float32 inside the softmax
            self.last_routing[name] = weights.detach()
            h = a(flat) * self.scaling[name]  # (N, r): the shared A, once
            E, out, r = bs.shape
            mixed = (weights.unsqueeze(-1) * h.unsqueeze(1)).reshape(-1, E * r)  # (N, E * r)
            delta = mixed @ bs.permute(0, 2, 1).reshape(E * r, out)  # every B in one GEMM
            result = result + delta.view(*x.shape[:-1], out).to(result.dtype)
        return result
