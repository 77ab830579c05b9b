"""MixLoRA (Li et al., 2024, "MixLoRA: Enhancing Large Language Models Fine-Tuning with LoRA-based Mixture
of Experts"): the frozen feed-forward block becomes E experts that share its weights and differ by their
LoRAs, a router sends each token to its top-2; the attention projections carry a plain LoRA.

    p(x)   = softmax(W_r x)                                   router, W_r (E, hidden), per token
    y      = sum_{e in top-k(p)} (p_e / sum_top-k p) FFN_e(x)       k = 2
    FFN_e  = D_e(act(G_e x) * U_e x),  G_e = W_gate + s B_gate,e A_gate,e  (U_e, D_e: up, down alike)
    L_aux  = coef * E * sum_i f_i P_i                         Switch-style; f_i: share of routed (token,
                                                              slot) pairs sent to i, P_i: mean p_i

The base gate and up projections run once for all tokens; each expert computes its LoRAs and the down
projection on its own tokens only (a loop over the E experts, as Mixtral's reference does; E is small).
Routing is per token, so the update cannot be merged. Pure torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from factorlab.layers.base import AdapterLayer
from factorlab.layers.lora import adapter_dtype

PROJECTIONS = ("gate", "up", "down")


def is_gated_mlp(module: nn.Module) -> bool:
    """A Llama-style feed-forward block: gate_proj, up_proj, down_proj linears and act_fn."""
    parts = [getattr(module, f"{p}_proj", None) for p in PROJECTIONS]
    return all(isinstance(p, nn.Linear) for p in parts) and callable(getattr(module, "act_fn", None))


@dataclass
class RouterRecords:
    """Per call, per MixLoRA block: router probabilities (N, E) and the chosen experts (N, k), with the
    call's token mask (False at padding) for the auxiliary loss."""

    records: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    token_mask: torch.Tensor | None = None
    record: bool = False


class FeedForwardExperts(nn.Module):
    """E experts' LoRAs on gate, up and down, stacked: ``{p}_A`` (E, r, in_p), ``{p}_B`` (E, out_p, r)."""

    def __init__(self, experts: int, r: int, hidden: int, intermediate: int, init: bool, **factory):
        super().__init__()
        dims = {"gate": (hidden, intermediate), "up": (hidden, intermediate), "down": (intermediate, hidden)}
        for p, (fan_in, fan_out) in dims.items():
            a = torch.empty(experts, r, fan_in, **factory)
            for e in range(experts):
                nn.init.kaiming_uniform_(a[e], a=math.sqrt(5))
            b = torch.zeros(experts, fan_out, r, **factory)
            if not init:  # both random: tests see every expert act from the start
                for e in range(experts):
                    nn.init.kaiming_uniform_(b[e], a=math.sqrt(5))
            setattr(self, f"{p}_A", nn.Parameter(a))
            setattr(self, f"{p}_B", nn.Parameter(b))

    def delta(self, p: str, e: int, x: torch.Tensor, scaling: float) -> torch.Tensor:
        return (x @ getattr(self, f"{p}_A")[e].T) @ getattr(self, f"{p}_B")[e].T * scaling


class MixLoRAFeedForward(AdapterLayer):
    """A frozen gated feed-forward block turned into routed LoRA experts, per adapter name."""

    adapter_weights = ("router", "experts")
    adapter_extras = ("settings",)

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.hidden = base_layer.gate_proj.in_features
        self.intermediate = base_layer.gate_proj.out_features
        self.router = nn.ModuleDict()
        self.experts = nn.ModuleDict()
        self.settings: dict[str, tuple[int, float]] = {}  # per adapter: (top_k, scaling)
        self.records: dict[str, RouterRecords] = {}

    def update_layer(
        self,
        name: str,
        experts: int,
        r: int,
        lora_alpha: float,
        top_k: int,
        records: RouterRecords,
        init: bool = True,
    ) -> None:
        weight = self.base_layer.gate_proj.weight
        factory = {"device": weight.device, "dtype": adapter_dtype(weight)}
        self.router[name] = nn.Linear(self.hidden, experts, bias=False, **factory)
        nn.init.normal_(self.router[name].weight, std=0.02)
        self.experts[name] = FeedForwardExperts(experts, r, self.hidden, self.intermediate, init, **factory)
        self.settings[name] = (top_k, lora_alpha / r)
        self.records[name] = records

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.records.pop(name, None)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled or not self.active_adapters:
            return self.base_layer(x, *args, **kwargs)
        name = self.active_adapters[0]  # MixLoRA adapters do not add up: one is active
        experts, (top_k, scaling), base = self.experts[name], self.settings[name], self.base_layer
        flat = x.reshape(-1, self.hidden)
        adapter_x = flat.to(experts.gate_A.dtype)
        logits = self.router[name](adapter_x)
        probs = torch.softmax(logits, -1, dtype=torch.promote_types(logits.dtype, torch.float32))  # (N, E)
        top_p, chosen = probs.topk(top_k, dim=-1)  # (N, k)
        top_p = top_p / top_p.sum(-1, keepdim=True)
        records = self.records[name]
        if records.record:
            records.records.append((probs, chosen))
        gate, up = base.gate_proj(flat), base.up_proj(flat)  # the shared frozen part, once for every token
        dtype = torch.promote_types(gate.dtype, experts.gate_A.dtype)
        out = torch.zeros(flat.shape[0], self.hidden, dtype=dtype, device=flat.device)
        for e in range(probs.shape[-1]):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            if not len(rows):
                continue
            xe = adapter_x[rows]
            g = gate[rows] + experts.delta("gate", e, xe, scaling).to(gate.dtype)
            u = up[rows] + experts.delta("up", e, xe, scaling).to(up.dtype)
            h = base.act_fn(g) * u
            y = base.down_proj(h) + experts.delta("down", e, h.to(xe.dtype), scaling).to(h.dtype)
            out.index_add_(0, rows, top_p[rows, slot].unsqueeze(-1).to(out.dtype) * y.to(out.dtype))
        return out.view(*x.shape[:-1], self.hidden).to(x.dtype)


def switch_balance_loss(records: RouterRecords, num_experts: int) -> torch.Tensor:
    """E * sum_i f_i P_i per recorded block, averaged over blocks, real tokens only: f_i the share of the
    (token, slot) assignments that went to expert i, P_i expert i's mean router probability. 1 when
    balanced (uniform p, even assignments); E at worst."""
    if not records.records:
        return torch.zeros(())
    total = torch.zeros((), device=records.records[0][0].device)
    for probs, chosen in records.records:
        mask = records.token_mask
        if mask is not None and mask.numel() == probs.shape[0]:
            keep = mask.reshape(-1).bool()
            probs, chosen = probs[keep], chosen[keep]
        counts = torch.zeros(num_experts, device=probs.device).index_add_(
            0, chosen.reshape(-1), torch.ones(chosen.numel(), device=probs.device)
        )
        f = counts / max(chosen.numel(), 1)
        total = total + num_experts * (f * probs.mean(0)).sum()
    return total / len(records.records)
