"""The common shape of every adapter layer: a base module plus any number of named adapters.

Pure torch (no transformers import). A method's layer subclasses ``AdapterLayer``, keeps each
adapter's weights in ``nn.ModuleDict``s keyed by adapter name (listed in ``adapter_weights``), and
implements ``forward``. Saving strips the adapter name from the keys, as PEFT does, so a layer's
saved tensors look like ``lora_A.weight``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from factorlab.errors import AdapterLoadError, ConfigError


def copy_state_exact(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy ``tensors`` into the tensors of ``expected`` (views of live weights), bit for bit.

    Every key must be present, none extra, every shape equal, every tensor floating point and finite
    once cast to the weight's dtype (1e39 stored as float64 would become inf in float32); otherwise
    nothing is copied and the error (prefixed with ``where``) says what differs.
    """
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise AdapterLoadError(
            f"{where}: the adapter file's tensors do not match (missing {missing or 'none'}, "
            f"unexpected {extra or 'none'})."
        )
    for key, target in expected.items():
        if tensors[key].shape != target.shape:
            raise AdapterLoadError(
                f"{where}.{key}: the file holds shape {tuple(tensors[key].shape)} but this model's adapter "
                f"expects {tuple(target.shape)}; was the adapter saved with another rank or for another "
                "model size? Load it with the config it was saved with."
            )
    cast = {}
    for key, target in expected.items():
        tensor = tensors[key]
        if not tensor.is_floating_point():
            raise AdapterLoadError(
                f"{where}.{key}: the file stores dtype {tensor.dtype}, but adapter weights are floating "
                "point; the file is corrupt or not a factorlab/PEFT adapter."
            )
        cast[key] = tensor.to(device=target.device, dtype=target.dtype)
        if not torch.isfinite(cast[key]).all():
            raise AdapterLoadError(
                f"{where}.{key}: NaN or inf values (after casting {tensor.dtype} to {target.dtype}); "
                "the adapter is corrupt or was saved from a diverged run."
            )
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(cast[key])


class AdapterLayer(nn.Module):
    """Base module + named adapters. Subclasses set ``adapter_weights`` and ``adapter_extras``."""

    adapter_weights: tuple[str, ...] = ()  # ModuleDicts holding each adapter's trainable weights
    adapter_extras: tuple[str, ...] = ()  # other per-adapter containers (dropout modules, scalings)

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    # Model code reads these directly (T5 checks ``wo.weight.dtype``); they belong to the base layer.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def adapter_names(self) -> list[str]:
        names: list[str] = []
        for attr in self.adapter_weights:
            names += [n for n in getattr(self, attr) if n not in names]
        return names

    def set_adapter(self, names: Iterable[str]) -> None:
        """Make exactly these adapters active (those this layer does not hold are ignored)."""
        self.active_adapters = [n for n in names if n in self.adapter_names]

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ConfigError(
                f"adapter {name!r} is merged into the base weights; call unmerge_adapter() before deleting."
            )
        for attr in self.adapter_weights + self.adapter_extras:
            container = getattr(self, attr)
            if name in container:
                del container[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        for attr in self.adapter_weights:
            container = getattr(self, attr)
            if name in container:
                yield from container[name].parameters()

    def trainable_adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        """The parameters of adapter ``name`` that train when it is active (all, unless a method says)."""
        return self.adapter_parameters(name)

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """This adapter's tensors, keyed without the adapter name (``lora_A.weight``)."""
        out = {}
        for attr in self.adapter_weights:
            container = getattr(self, attr)
            if name in container:
                for key, tensor in container[name].state_dict().items():
                    out[f"{attr}.{key}"] = tensor
        return out

    def load_adapter_state_dict(self, name: str, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Copy ``tensors`` (keys as from ``adapter_state_dict``) into adapter ``name``, exactly."""
        copy_state_exact(self.adapter_state_dict(name), tensors, where)

    # Merging is method-specific; methods that cannot merge keep these defaults.
    can_merge = False

    def merge(self, names: Iterable[str] | None = None) -> None:
        raise NotImplementedError(f"{type(self).__name__} adapters cannot be merged into the base weights.")

    def unmerge(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} adapters cannot be merged into the base weights.")
