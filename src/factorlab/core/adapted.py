"""Model surgery: ``adapt(model, config)`` and the ``AdaptedModel`` it returns.

The AdaptedModel owns the base model, replaces each target module with an adapter layer (the
original module lives on as ``<target>.base_layer``), freezes the base weights, and forwards
everything else — ``forward``, ``generate``, ``config``, any attribute — to the base model, so
``transformers.Trainer`` and ``generate()`` with a KV cache work unchanged.

Every change is transactional: if injecting or loading fails, the model is left exactly as it
was (modules and ``requires_grad`` flags), and the error says why.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import inspect
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from factorlab.core.merging import Merging
from factorlab.core.method import (
    METHODS,
    AdapterConfig,
    forward_keywords,
    get_method,
    label,
    no_forward_state,
)
from factorlab.core.persistence import AdapterFiles, is_trainer_checkpoint
from factorlab.core.surgery import (
    check_adapter_name,
    modules_to_save,
    refuse_adapted,
    replace_submodule,
    warn_untrained_head,
)
from factorlab.core.targeting import check_called_as_modules, model_family, resolve_targets, unwrapped
from factorlab.errors import ConfigError, TargetError
from factorlab.layers.base import AdapterLayer
from factorlab.layers.modules_to_save import ModulesToSave


class AdapterState(str, enum.Enum):
    """Where an AdaptedModel is in its life (``AdaptedModel.state``); each operation names the states
    it applies in (``_ALLOWED``), and any other state is a ``ConfigError`` that says what to call."""

    EMPTY = "empty"  # wraps the base model but holds no adapter (all were deleted)
    READY = "ready"  # adapters injected, none merged: train, switch, save, merge
    MERGED = "merged"  # the active adapter's update is folded into the base weights: run, save, unmerge
    UNLOADED = "unloaded"  # unload()/merge_and_unload() handed the base model back: nothing more to do


_E, _R, _M = AdapterState.EMPTY, AdapterState.READY, AdapterState.MERGED
_ALLOWED: dict[str, set[AdapterState]] = {
    "forward": {_E, _R, _M},
    "generate": {_E, _R, _M},
    "add_adapter": {_E, _R, _M},
    "load_adapter": {_E, _R, _M},
    "set_adapter": {_R, _M},  # while merged only to the merged adapter itself (checked in set_adapter)
    "delete_adapter": {_R, _M},  # while merged not the merged adapter (checked by the layers)
    "disable_adapters": {_E, _R},
    "merge_adapter": {_R, _M},
    "unmerge_adapter": {_E, _R, _M},
    "merge_and_unload": {_R, _M},
    "unload": {_E, _R, _M},
    "save_pretrained": {_R, _M},
}
_FIX = {
    AdapterState.EMPTY: "this model holds no adapters (all were deleted); add_adapter() one first.",
    AdapterState.MERGED: "adapters are merged into the base weights; call unmerge_adapter() first.",
    AdapterState.UNLOADED: (
        "this AdaptedModel was unloaded: unload()/merge_and_unload() returned the base model, which no "
        "longer holds adapter layers; use that model, or factorlab.adapt() it again."
    ),
}


class TunerModel(nn.Module):
    """What ``AdaptedModel.base_model`` is, as in PEFT (``PeftModel.base_model`` is a tuner whose
    ``.model`` is the Hugging Face model): code written against PEFT's layout, e.g.
    ``model.base_model.model.model.layers``, runs unchanged, and state-dict keys read
    ``base_model.model.<module>...`` as in PEFT's files. Attributes and calls go to the model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)


class AdaptedModel(AdapterFiles, Merging, nn.Module):
    """A base model with named adapters injected. Create it with ``factorlab.adapt``."""

    def __init__(self, base_model: nn.Module):
        super().__init__()
        self.base_model = TunerModel(base_model)  # PEFT's layout: base_model.model is the given model
        self.adapter_configs: dict[str, AdapterConfig] = {}
        self.adapter_targets: dict[str, list[str]] = {}  # adapter layers, then modules_to_save
        self.adapter_in_place: dict[str, list[str]] = {}  # base parameters trained in place (PEFT's bias)
        self.active_adapter: str | None = None  # the first active adapter (PEFT's name)
        self._active: list[str] = []  # all active adapters; several only for methods that combine
        self.shared_adapter_weights = nn.ModuleDict()  # per adapter: weights all its layers share
        self._original_requires_grad = {n: p.requires_grad for n, p in base_model.named_parameters()}
        self._whole_state_dict = False  # True inside factorlab.fsdp.whole_state_dict

        self._install_forward()

    def _install_forward(self) -> None:
        """Expose the base model's forward signature: Trainer drops dataset columns that the
        signature of model.forward does not name."""

        def forward(*args, **kwargs):
            return type(self).forward(self, *args, **kwargs)

        base_forward = self.get_base_model().forward
        functools.update_wrapper(forward, base_forward)
        signature = inspect.signature(base_forward)
        params = list(signature.parameters.values())
        extra = [  # the per-call keywords of every method (Method.forward_keywords), so Trainer keeps them
            inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=None)
            for key in forward_keywords()
            if key not in signature.parameters
        ]
        cut = next((i for i, p in enumerate(params) if p.kind == inspect.Parameter.VAR_KEYWORD), len(params))
        forward.__signature__ = signature.replace(parameters=[*params[:cut], *extra, *params[cut:]])
        object.__setattr__(self, "forward", forward)

    # The forward above closes over this instance: a copy (deepcopy, pickle) must get its own, or it
    # would run, and train, the original's weights.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("forward", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._install_forward()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)  # as PeftModel: .model is the given model

    # ---- running ------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        """The base model's forward. Per-call keywords of the active adapter's method
        (``Method.forward_keywords``) go to its ``forward_context``.

        A method's auxiliary loss (from its ``forward_context``) is added to ``outputs.loss`` in training
        mode, once; it is also kept as ``self.last_aux_loss`` for loops that compute their own loss.
        """
        state = self._require("forward")
        training = state is AdapterState.MERGED and self.training and torch.is_grad_enabled()
        if training and any(p.requires_grad for p in self.parameters()):
            raise ConfigError(
                "training with a merged adapter would update weights the forward no longer reads (the "
                "update is folded into the base weights); call unmerge_adapter() first, or model.eval()."
            )
        self.last_aux_loss = None
        with self._method_context(kwargs, record=self.training) as aux_loss:
            outputs = self.get_base_model()(*args, **kwargs)
        if self.training and aux_loss is not None:
            self.last_aux_loss = aux = aux_loss()
            if getattr(outputs, "loss", None) is not None:
                outputs.loss = outputs.loss + aux
        return outputs

    def generate(self, *args, **kwargs):
        self._require("generate")
        with self._method_context(kwargs, record=False):
            return self.get_base_model().generate(*args, **kwargs)

    def _method_context(self, kwargs: dict, record: bool):
        name = self.active_adapter
        method = get_method(self.adapter_configs[name].method) if name is not None else None
        context = (
            method.forward_context if method is not None and method.forward_context else no_forward_state
        )
        return context(self, name, kwargs, record)

    def get_base_model(self) -> nn.Module:
        """The model handed to ``adapt`` (holding the adapter layers), as PEFT's ``get_base_model``."""
        return self.base_model.model

    # ---- state --------------------------------------------------------------------------------
    @property
    def state(self) -> AdapterState:
        if self.__dict__.get("_unloaded", False):
            return AdapterState.UNLOADED
        if not self.adapter_configs:
            return AdapterState.EMPTY
        if self.__dict__.get("_merged", False):  # a flag, not a walk over the layers: forward reads it
            return AdapterState.MERGED
        return AdapterState.READY

    def _require(self, operation: str) -> AdapterState:
        state = self.state
        if state not in _ALLOWED[operation]:
            raise ConfigError(f"{operation}() does not apply now: {_FIX[state]}")
        return state

    # ---- adapters -----------------------------------------------------------------------------
    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        for name, module in self.get_base_model().named_modules():
            if isinstance(module, AdapterLayer):
                yield name, module

    def add_adapter(self, adapter_name: str, config: AdapterConfig) -> None:
        """Inject a new adapter. The first adapter becomes active; later ones wait for set_adapter."""
        self._add_adapter(adapter_name, config, loading=False)

    def _add_adapter(self, adapter_name: str, config: AdapterConfig, loading: bool) -> None:
        """``add_adapter``; ``loading``: its weights are copied in right after (``Method.build_shared``)."""
        self._require("add_adapter")
        if adapter_name in self.adapter_configs:
            raise ConfigError(
                f"adapter {adapter_name!r} already exists; delete_adapter() it or pick another name."
            )
        check_adapter_name(adapter_name)
        method = get_method(config.method)
        base = self.get_base_model()
        names = resolve_targets(
            base,
            config.target_modules,
            config.target_roles,
            config.exclude_modules,
            config.layers_to_transform,
            default_roles=method.default_roles(model_family(base)),
            accepts=method.accepts,
            accepted_kinds=method.accepted_kinds,
        )
        check_called_as_modules(base, names)
        saved = modules_to_save(base, method, config, names)
        if not config.inference_mode:
            warn_untrained_head(base, config, names + saved)
        targets = {n: unwrapped(base.get_submodule(n)) for n in names}
        shared = method.build_shared(base, config, targets, loading) if method.build_shared else None
        swapped: list[tuple[str, nn.Module]] = []
        updated: list[AdapterLayer] = []
        try:
            for name in names + saved:
                module = base.get_submodule(name)
                existing = module if isinstance(module, AdapterLayer) else None
                layer_cls = method.layer_cls if name in names else ModulesToSave
                if existing is not None and not isinstance(existing, layer_cls):
                    raise TargetError(
                        f"{name} already holds a {type(existing).__name__}; one module takes adapters of one "
                        f"kind. Exclude it from this {method.name} adapter (exclude_modules)."
                    )
                target = existing.base_layer if existing is not None else module
                if name in names:
                    layer = method.build_layer(target, config, adapter_name, name, existing, shared)
                else:
                    layer = existing if existing is not None else ModulesToSave(target)
                    layer.update_layer(adapter_name)
                if existing is None:
                    replace_submodule(base, name, layer)
                    swapped.append((name, module))
                else:
                    updated.append(existing)
            # after the surgery: the names are those a state dict (and PEFT's files) will use
            in_place = method.in_place_parameters(base, config, names) if method.in_place_parameters else []
        except BaseException:
            for layer in updated:
                layer.delete_adapter(adapter_name)
            for name, original in swapped:
                replace_submodule(base, name, original)
            raise
        if shared is not None:
            self.shared_adapter_weights[adapter_name] = shared
        self.adapter_configs[adapter_name] = config
        self.adapter_targets[adapter_name] = names + saved
        self.adapter_in_place[adapter_name] = in_place
        if self.active_adapter is None:
            self.set_adapter(adapter_name)
        else:
            self.refresh_trainable()

    @property
    def peft_config(self) -> dict[str, AdapterConfig]:
        """PEFT's name for the adapters' configs, by adapter name."""
        return dict(self.adapter_configs)

    @property
    def active_adapters(self) -> list[str]:
        """The active adapters, in the order set_adapter was given them."""
        return list(self._active)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make ``adapter_name`` the active (and, unless loaded for inference, the trainable) adapter.

        A list activates several at once, their updates summed, as in PEFT; only methods whose updates
        add up (``Method.combinable``) combine, and all of them train unless loaded for inference."""
        names = list(adapter_name) if isinstance(adapter_name, (list, tuple)) else [adapter_name]
        if not names or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"set_adapter takes an adapter name or a list of names, got {adapter_name!r}.")
        self._require("set_adapter")
        unknown = [n for n in names if n not in self.adapter_configs]
        if unknown:
            raise ConfigError(f"no adapter named {unknown[0]!r}; adapters: {sorted(self.adapter_configs)}.")
        if len(names) > 1:
            alone = sorted({self.adapter_configs[n].method for n in names} - _combinable_methods())
            if alone:
                hints = [h for h in (get_method(m).not_combinable_hint for m in alone) if h]
                raise ConfigError(
                    f"set_adapter({names!r}): {', '.join(alone)} adapters do not add up, so they are active "
                    f"one at a time{'; ' + '; '.join(hints) if hints else ''}."
                )
        merged = sorted({a for _, layer in self.adapter_layers() for a in layer.merged_adapters})
        if merged and not set(merged) <= set(names):
            raise ConfigError(
                f"set_adapter({adapter_name!r}): adapter(s) {merged} are merged into the base weights; "
                "switching would apply both. Call unmerge_adapter() first."
            )
        for _, layer in self.adapter_layers():
            layer.set_adapter(names)
        self.active_adapter, self._active = names[0], names
        self.refresh_trainable()

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
    ) -> None:
        """PEFT's combination of adapters into a new one, ``adapter_name`` (not activated), by the
        method's ``combine`` hook, which documents its ``combination_type`` values."""
        self._require("add_adapter")
        if adapter_name in self.adapter_configs:
            raise ConfigError(f"adapter {adapter_name!r} already exists; pick another name.")
        unknown = (
            [a for a in adapters if a not in self.adapter_configs] if isinstance(adapters, list) else adapters
        )
        if unknown or not adapters:
            raise ConfigError(
                f"adapters must be a non-empty list of {sorted(self.adapter_configs)}, got {adapters!r}."
            )
        methods = {get_method(self.adapter_configs[a].method) for a in adapters}
        method = methods.pop() if len(methods) == 1 else None
        if method is None or method.combine is None:
            kinds = sorted({self.adapter_configs[a].method for a in adapters})
            able = sorted(label(m) for m in METHODS.values() if m.combine is not None)
            raise ConfigError(
                f"add_weighted_adapter combines adapters of one method that supports it ({', '.join(able)}); "
                f"got {kinds}."
            )
        method.combine(self, adapters, weights, adapter_name, combination_type, svd_rank)

    def delete_adapter(self, adapter_name: str) -> None:
        self._require("delete_adapter")
        if adapter_name not in self.adapter_configs:
            raise ConfigError(f"no adapter named {adapter_name!r}; adapters: {sorted(self.adapter_configs)}.")
        for name, layer in list(self.adapter_layers()):
            if adapter_name in layer.adapter_names:
                layer.delete_adapter(adapter_name)
                if not layer.adapter_names:
                    replace_submodule(self.get_base_model(), name, layer.base_layer)
        del self.adapter_configs[adapter_name]
        del self.adapter_targets[adapter_name]
        self.adapter_in_place.pop(adapter_name, None)
        if adapter_name in self.shared_adapter_weights:
            del self.shared_adapter_weights[adapter_name]
        if adapter_name in self._active:
            rest = [n for n in self._active if n != adapter_name]
            self.active_adapter, self._active = None, []
            if rest or self.adapter_configs:
                self.set_adapter(rest or next(iter(self.adapter_configs)))
        self.refresh_trainable()

    def refresh_trainable(self) -> None:
        """Set requires_grad from the active adapters (and their stages): adapter weights that train, all
        else frozen. Methods that change what trains (training stages) call it."""
        trainable: set[int] = set()
        for name in self._active:
            if self.adapter_configs[name].inference_mode:
                continue
            for _, layer in self.adapter_layers():
                trainable |= {id(p) for p in layer.trainable_adapter_parameters(name)}
            if name in self.shared_adapter_weights:
                shared = self.shared_adapter_weights[name]
                pick = get_method(self.adapter_configs[name].method).shared_trainable_parameters
                trainable |= {id(p) for p in (pick(shared) if pick is not None else shared.parameters())}
            in_place = set(self.adapter_in_place.get(name, ()))
            trainable |= {
                id(p)
                for n, p in self.get_base_model().named_parameters(remove_duplicate=False)
                if n in in_place
            }
        for p in self.get_base_model().parameters():
            p.requires_grad_(id(p) in trainable)
        for module in self.shared_adapter_weights.values():
            for p in module.parameters():
                p.requires_grad_(id(p) in trainable)

    def _restore_requires_grad(self) -> None:
        for n, p in self.get_base_model().named_parameters():
            if n in self._original_requires_grad:
                p.requires_grad_(self._original_requires_grad[n])

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Run the base model alone inside this block."""
        self._require("disable_adapters")
        layers = [layer for _, layer in self.adapter_layers()]
        previous = [layer.disabled for layer in layers]
        for layer in layers:
            layer.disabled = True
        try:
            yield
        finally:
            for layer, was in zip(layers, previous):
                layer.disabled = was

    disable_adapter = disable_adapters  # PEFT's name

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        path: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
    ) -> AdaptedModel:
        """Wrap ``model`` and load the adapter saved at ``path``, exactly as it was saved: an adapter
        folder (``save_pretrained``, factorlab's or PEFT's), or a ``transformers.Trainer`` checkpoint
        folder (``checkpoint-N/``, whose ``model.safetensors`` holds this model's ``state_dict()``:
        every adapter, each under its own name, ``adapter_name`` aside)."""
        _refuse_adapted(model)
        adapted = cls(model)
        try:
            if is_trainer_checkpoint(path):
                adapted._load_trainer_checkpoint(Path(path), is_trainable)
            else:
                adapted.load_adapter(path, adapter_name, is_trainable)
        except BaseException:
            for name in list(adapted.adapter_configs):
                adapted.delete_adapter(name)
            adapted._restore_requires_grad()
            raise
        return adapted

    # ---- parameters ---------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        from factorlab.core.params import count_parameters

        counts = count_parameters(self)
        return counts["trainable"], counts["total"]

    def print_trainable_parameters(self) -> None:
        """One PEFT-style line, then the trainable parameters by kind (what exactly is counted)."""
        from factorlab.core.params import parameter_report

        print(parameter_report(self))


def _combinable_methods() -> set[str]:
    return {m.name for m in METHODS.values() if m.combinable}


def _refuse_adapted(model: nn.Module) -> None:
    if isinstance(model, AdaptedModel):
        raise ConfigError("this model is already an AdaptedModel; use its add_adapter(name, config) instead.")
    refuse_adapted(model)


def adapt(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> AdaptedModel:
    """Inject adapter ``adapter_name`` described by ``config`` into ``model`` and freeze the base.

    Works on any ``torch.nn.Module``; Hugging Face models also get architecture roles.
    """
    _refuse_adapted(model)
    adapted = AdaptedModel(model)
    try:
        adapted.add_adapter(adapter_name, config)
    except BaseException:
        adapted._restore_requires_grad()
        raise
    return adapted
