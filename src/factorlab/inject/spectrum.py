"""The spectrum of the update a fine-tuning run made: the quantity of the OCR paper's mechanism.

The paper explains out-of-context generalization (and hallucination) by the implicit bias of gradient
descent on a factorized update toward a low nuclear norm ||dW||_* = sum_i s_i of the combined matrix.
Each injection cell records, for every adapted weight, its update's singular values s_i and

    nuclear   ||dW||_* = sum s_i            frobenius ||dW||_F = sqrt(sum s_i^2)
    effective rank  exp(H(p)),  p_i = s_i / sum s_j    (Roy & Vetterli 2007; 1 for a rank-one update)

LoRA's update dW = s B A (B: (out, r), A: (r, in)) has the singular values of an r x r matrix, taken
from the factors without forming dW (thin QR of B and of A^T):

    B = Q_B R_B,  A^T = Q_A R_A   =>   dW = Q_B (s R_B R_A^T) Q_A^T,   svd(dW) = svd(s R_B R_A^T)

Full fine-tuning's update is the materialised difference W_after - W_before. Compacter++ adds no
update to a base weight (it inserts a bottleneck adapter after each block's MLP); its entry is the
spectrum of each adapter's materialised PHM projections (down and up), named so. Everything in float64.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
from torch import nn

TOP = 8  # singular values kept per block type


def lora_singular_values(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Singular values of ``scaling * b @ a`` (b: (out, r), a: (r, in)) from the factors, descending."""
    _, r_b = torch.linalg.qr(b.detach().double())
    _, r_a = torch.linalg.qr(a.detach().double().T)
    return torch.linalg.svdvals(scaling * r_b @ r_a.T)


def dense_singular_values(delta: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(delta.detach().double())


def summary_of(values: torch.Tensor) -> dict[str, float]:
    """Nuclear and Frobenius norms and effective rank of one update's singular values."""
    values = values.double().clamp_min(0)
    nuclear = float(values.sum())
    p = values / nuclear if nuclear > 0 else values
    entropy = -float((p[p > 0] * p[p > 0].log()).sum())
    return {
        "nuclear": nuclear,
        "frobenius": float(values.square().sum().sqrt()),
        "effective_rank": math.exp(entropy) if nuclear > 0 else 0.0,
    }


def block_type(name: str) -> str:
    """The kind of weight a module name denotes: attention q/k/v/o, mlp, adapter or other."""
    leaf = name.rsplit(".", 1)[-1]
    for kind, pattern in (
        ("attention.q", r"q_proj|query|wq"),
        ("attention.k", r"k_proj|key|wk"),
        ("attention.v", r"v_proj|value|wv"),
        ("attention.o", r"o_proj|out_proj|dense|wo"),
        ("mlp", r"gate_proj|up_proj|down_proj|fc\d|w\d|c_fc|c_proj|mlp"),
    ):
        if re.fullmatch(pattern, leaf):
            return kind
    if "adapter" in name or "phm" in name:
        return "adapter"
    return "other"


def aggregate(per_weight: Iterable[tuple[str, torch.Tensor]]) -> dict[str, dict]:
    """Per block type (and "all"): summed nuclear norm, Frobenius norm of the whole group, mean
    effective rank, number of weights, and the group's largest ``TOP`` singular values."""
    groups: dict[str, list[torch.Tensor]] = {}
    for name, values in per_weight:
        groups.setdefault(block_type(name), []).append(values)
        groups.setdefault("all", []).append(values)
    out = {}
    for kind, spectra in sorted(groups.items()):
        each = [summary_of(v) for v in spectra]
        out[kind] = {
            "nuclear": sum(e["nuclear"] for e in each),
            "frobenius": math.sqrt(sum(e["frobenius"] ** 2 for e in each)),
            "effective_rank_mean": sum(e["effective_rank"] for e in each) / len(each),
            "weights": len(each),
            "top_singular_values": torch.cat(spectra).sort(descending=True).values[:TOP].tolist(),
        }
    return out


def lora_spectra(model: nn.Module, adapter: str = "default") -> list[tuple[str, torch.Tensor]]:
    """(module name, singular values) of every LoRA update of ``adapter`` in an adapted model."""
    out = []
    for name, layer in model.adapter_layers():
        if adapter in getattr(layer, "lora_A", {}):
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            out.append((name, lora_singular_values(a, b, float(layer.scaling[adapter]))))
    return out


def difference_spectra(after: nn.Module, before: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(module name, singular values of W_after - W_before) of every 2-D linear weight except the
    output head (full fine-tuning)."""
    old = dict(before.named_modules())
    head = after.get_output_embeddings() if hasattr(after, "get_output_embeddings") else None
    out = []
    for name, module in after.named_modules():
        if isinstance(module, nn.Linear) and module is not head and name in old:
            delta = module.weight - old[name].weight.to(module.weight.device)
            out.append((name, dense_singular_values(delta)))
    return out


def adapter_spectra(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(module name + ".adapter", singular values) of each PHM projection (Compacter's down and up
    projections, materialised: sum_i kron(A_i, B_i))."""
    from factorlab.layers.phm import PHMLinear

    return [
        (f"{name}.adapter", dense_singular_values(module.weight))
        for name, module in model.named_modules()
        if isinstance(module, PHMLinear)
    ]


def update_spectrum(method: str, trained: nn.Module, base: nn.Module) -> dict[str, dict]:
    """The per-block-type spectrum summary of the update ``method`` made (see the module docstring)."""
    if method == "lora":
        spectra = lora_spectra(trained)
    elif method == "full":
        spectra = difference_spectra(trained, base)
    else:
        spectra = adapter_spectra(trained)
    return aggregate(spectra)
