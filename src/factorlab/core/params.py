"""Parameter counts that say what they count."""

from __future__ import annotations

from torch import nn

from factorlab.core.method import METHODS
from factorlab.layers.base import AdapterLayer


def parameter_kind(name: str) -> str:
    """What a trainable parameter is, by the labels each method registers (``Method.param_kinds``)."""
    kinds = [kind for method in METHODS.values() for kind in method.param_kinds]
    kinds.append((".modules_to_save.", "trained copies of whole modules (e.g. LayerNorms)"))
    for needle, kind in kinds:
        if needle in name:
            return kind
    return "other (unfrozen base weights)"


def count_parameters(model: nn.Module) -> dict:
    """Unique parameters of ``model`` (a tensor shared by several modules counts once).

    Returns ``trainable`` (requires_grad), ``total``, ``adapter`` (weights held by adapter layers or
    shared adapter containers), ``base`` (everything else), ``trainable_percent`` (of ``total``),
    ``trainable_percent_of_base`` (the papers' convention) and ``trainable_by_kind``. Works on the
    meta device, so paper-sized models can be counted without allocating weights. Buffers (such as
    a frozen shared weight kept as a buffer) are not parameters and are not counted.
    """
    adapter_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            for name in module.adapter_names:
                adapter_ids |= {id(p) for p in module.adapter_parameters(name)}
    shared = getattr(model, "shared_adapter_weights", None)
    if isinstance(shared, nn.Module):
        adapter_ids |= {id(p) for p in shared.parameters()}
    seen: set[int] = set()
    trainable = total = adapter = 0
    by_kind: dict[str, int] = {}
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        adapter += p.numel() if id(p) in adapter_ids else 0
        if p.requires_grad:
            trainable += p.numel()
            kind = parameter_kind(name)
            by_kind[kind] = by_kind.get(kind, 0) + p.numel()
    base = total - adapter
    return {
        "trainable": trainable,
        "total": total,
        "adapter": adapter,
        "base": base,
        "trainable_percent": 100.0 * trainable / total if total else 0.0,
        "trainable_percent_of_base": 100.0 * trainable / base if base else 0.0,
        "trainable_by_kind": by_kind,
    }


def parameter_report(model: nn.Module) -> str:
    c = count_parameters(model)
    lines = [
        f"trainable params: {c['trainable']:,d} || all params: {c['total']:,d} || "
        f"trainable%: {c['trainable_percent']:.4f} (of the base model's {c['base']:,d}: "
        f"{c['trainable_percent_of_base']:.4f}%)"
    ]
    lines += [f"  {count:>12,d}  {kind}" for kind, count in c["trainable_by_kind"].items()]
    return "\n".join(lines)
