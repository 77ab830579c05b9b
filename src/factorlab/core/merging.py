"""Merging adapters into the base weights and taking them out again, for ``AdaptedModel``:
``merge_adapter`` / ``unmerge_adapter`` (reversible), ``merge_and_unload`` and ``unload`` (the plain base
model back). Whether a layer can merge is its own (``AdapterLayer.can_merge``); what is refused here is
what would change more than the adapted module (a weight tied to another module)."""

from __future__ import annotations

import warnings

from torch import nn

from factorlab.core.surgery import replace_submodule
from factorlab.errors import ConfigError, FactorlabError
from factorlab.layers.base import AdapterLayer
from factorlab.layers.modules_to_save import ModulesToSave


class Merging:
    """The merging half of ``AdaptedModel`` (its adapters and state are the model's)."""

    def _check_mergeable(self, unloading: bool = False) -> list[tuple[str, AdapterLayer]]:
        """The layers to merge. A trained copy (modules_to_save) of a module whose weight is tied to
        another's (a tied embedding and head) would change both when written into the shared tensor:
        ``merge_and_unload`` unties them first, with a warning, as PEFT does; ``merge_adapter`` (which
        must be undone exactly) refuses."""
        layers = list(self.adapter_layers())
        cannot = sorted({type(layer).__name__ for _, layer in layers if not layer.can_merge})
        if cannot:
            raise FactorlabError(
                f"{', '.join(cannot)} adapters cannot be merged into the base weights (they are not a linear "
                "update of one weight); keep the AdaptedModel, or call unload() to drop the adapters."
            )
        aliases: dict[int, list[str]] = {}
        for n, p in self.get_base_model().named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), []).append(n)
        for name, layer in layers:
            weight = getattr(layer.base_layer, "weight", None)
            if not isinstance(layer, ModulesToSave) and weight is not None and len(aliases[id(weight)]) > 1:
                tied = [n for n in aliases[id(weight)] if not n.startswith(name)]
                raise ConfigError(
                    f"the weight of {name} is tied to {tied}; merging its adapter would change those too "
                    "(e.g. the output head). Keep the AdaptedModel, or untie the weights before adapting."
                )
        copies = [
            (name, layer)
            for name, layer in layers
            if isinstance(layer, ModulesToSave) and layer.active_adapters
        ]
        for name, layer in copies:
            tied = {
                own: [n for n in aliases[id(p)] if not n.startswith(name + ".")]
                for own, p in layer.base_layer.named_parameters(recurse=False)
                if len(aliases[id(p)]) > 1
            }
            tied = {own: others for own, others in tied.items() if others}
            if tied and not unloading:
                raise ConfigError(
                    f"{name} is trained as a copy (modules_to_save) and its weights are tied to "
                    f"{sorted(n for others in tied.values() for n in others)}; merging would change those "
                    "too. Use merge_and_unload(), which unties them first (as PEFT does), or do not merge."
                )
            for own, others in tied.items():
                shared = getattr(layer.base_layer, own)
                setattr(
                    layer.base_layer,
                    own,
                    nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad),
                )
                _untie_in_config(self.get_base_model())
                warnings.warn(
                    f"merge_and_unload: {name}.{own} was tied to {others}; it is untied (its own copy, "
                    "config.tie_word_embeddings = False) so the trained copy merged into it leaves those as "
                    "they were, as PEFT does.",
                    stacklevel=3,
                )
        return layers

    def merge_adapter(self) -> None:
        self._require("merge_adapter")
        try:
            for _, layer in self._check_mergeable():
                layer.merge()
        finally:
            self._merged = any(layer.merged_adapters for _, layer in self.adapter_layers())

    def unmerge_adapter(self) -> None:
        self._require("unmerge_adapter")
        for _, layer in self.adapter_layers():
            if layer.merged_adapters:
                layer.unmerge()
        self._merged = False

    def merge_and_unload(self) -> nn.Module:
        """Fold the active adapter into the base weights and return the plain base model."""
        self._require("merge_and_unload")
        for _, layer in self._check_mergeable(unloading=True):
            layer.merge()
        return self.unload()

    def unload(self) -> nn.Module:
        """Remove every adapter layer (merged updates stay in the weights) and return the base model."""
        self._require("unload")
        for name, layer in list(self.adapter_layers()):
            replace_submodule(self.get_base_model(), name, layer.base_layer)
        self._restore_requires_grad()
        self.shared_adapter_weights = nn.ModuleDict()
        self.adapter_configs.clear()
        self.adapter_targets.clear()
        self.adapter_in_place.clear()
        self.active_adapter, self._active = None, []
        self._unloaded = True
        return self.get_base_model()


def _untie_in_config(model: nn.Module) -> None:
    """After untying, a save/load round trip must not tie the weights again."""
    config = getattr(model, "config", None)
    for cfg in {id(c): c for c in (config, getattr(config, "get_text_config", lambda: None)())}.values():
        if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
