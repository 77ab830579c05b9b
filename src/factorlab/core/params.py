"""Parameter counts that say what they count."""

from __future__ import annotations

from torch import nn

from factorlab.layers.base import AdapterLayer


def count_parameters(model: nn.Module) -> dict[str, int | float]:
    """Unique parameters of ``model`` (a tensor shared by several modules counts once).

    Returns ``trainable`` (requires_grad), ``total``, ``adapter`` (weights held by adapter layers or
    shared adapter containers), ``base`` (everything else) and ``trainable_percent``. Works on the
    meta device, so paper-sized models can be counted without allocating weights.
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
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
        adapter += p.numel() if id(p) in adapter_ids else 0
    return {
        "trainable": trainable,
        "total": total,
        "adapter": adapter,
        "base": total - adapter,
        "trainable_percent": 100.0 * trainable / total if total else 0.0,
    }
