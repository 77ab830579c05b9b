"""Adapters on disk and in state dicts: ``save_pretrained`` / ``load_adapter`` (PEFT's folder format for
methods PEFT has, factorlab's own for the others), Trainer checkpoints, and every check a load makes
before anything changes (architecture, targeting, module layout, each tensor's presence, dtype, shape
and finiteness). ``AdapterFiles`` is mixed into ``AdaptedModel``; it reads the model's adapters through
the Method contract only.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from factorlab.adapter_files import read_adapter_config, read_adapter_tensors, write_adapter_folder
from factorlab.core.method import METHODS, config_from_dict, get_method, method_for_peft_type
from factorlab.core.targeting import model_family, resolve_targets
from factorlab.errors import AdapterLoadError, ConfigError, TargetError
from factorlab.layers.base import copy_state_exact
from factorlab.layers.modules_to_save import ModulesToSave
from factorlab.peft_format import KEY_PREFIX, PEFT_EMBEDDING_NAMES, check_save_keywords, task_type_of
from factorlab.version import __version__ as _VERSION

SHARED_PREFIX = "factorlab_shared."  # weights shared by all layers of an adapter (Method.build_shared)
TARGETING_FIELDS = ("target_modules", "target_roles", "exclude_modules", "layers_to_transform")
SAVE_ONLY_KEYS = (
    "factorlab_version",
    "base_model_class",
    "model_type",
    "base_model_name_or_path",
    "targets",
    "targeting",
    "format",
)
CONFIGS_KEY = "factorlab_adapter_configs"  # in state_dict(): what from_pretrained needs from a checkpoint
MODEL_PREFIX = "base_model.model."  # the given model's keys inside an AdaptedModel's state dict


class AdapterFiles:
    """Saving and loading, for ``AdaptedModel`` (its state and adapters are the model's)."""

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        out = {}
        for name, layer in self.adapter_layers():
            for key, tensor in layer.adapter_state_dict(adapter_name).items():
                out[f"{KEY_PREFIX}{name}.{key}"] = tensor
        if adapter_name in self.shared_adapter_weights:
            for key, tensor in self.shared_adapter_weights[adapter_name].state_dict().items():
                out[f"{SHARED_PREFIX}{key}"] = tensor
        params = dict(self.get_base_model().named_parameters(remove_duplicate=False))
        for name in self.adapter_in_place.get(adapter_name, ()):
            out[f"{KEY_PREFIX}{name}"] = params[name].detach()
        return out

    def _describe_base(self, adapter_name: str) -> dict[str, Any]:
        config = getattr(self.get_base_model(), "config", None)
        return {
            "base_model_class": type(self.get_base_model()).__name__,
            "model_type": getattr(config, "model_type", None),
            "base_model_name_or_path": getattr(config, "_name_or_path", None) or None,
            "targets": {
                name: _weight_shape(self.get_base_model().get_submodule(name).base_layer)
                for name in self.adapter_targets[adapter_name]
            },
        }

    def state_dict(self, *args: Any, destination=None, prefix: str = "", keep_vars: bool = False):
        """The adapters' weights only (every adapter, modules_to_save copies, shared weights), under
        their full-model keys, as a PEFT checkpoint holds them.

        Why not the whole model: ``transformers.Trainer`` checkpoints ``model.state_dict()``; the base
        weights are frozen and already on disk, and a tied-embedding model's state dict cannot be
        written as safetensors at all. The full weights are ``model.get_base_model().state_dict()`` (or
        ``merge_and_unload().state_dict()``).

        The last entry, ``factorlab_adapter_configs`` (the adapters' configs as UTF-8 JSON bytes), makes
        a Trainer checkpoint (which holds only this state dict) a folder ``from_pretrained`` can open.
        """
        if self.__dict__.get("_whole_state_dict", False):  # factorlab.fsdp.whole_state_dict
            return super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        full = super().state_dict(*args, prefix="", keep_vars=keep_vars)
        layers = tuple(f"{MODEL_PREFIX}{name}." for name, _ in self.adapter_layers())

        in_place = {f"{MODEL_PREFIX}{n}" for names in self.adapter_in_place.values() for n in names}

        def is_adapter(key: str) -> bool:
            if key.startswith("shared_adapter_weights.") or key in in_place:
                return True
            return any(key.startswith(p) and not key.startswith(p + "base_layer.") for p in layers)

        out = destination if destination is not None else type(full)()
        seen: set[tuple] = set()  # a tied tensor once (BERT's decoder.bias is predictions.bias): safetensors
        for key, value in full.items():
            identity = (value.data_ptr(), value.storage_offset(), tuple(value.shape))
            if is_adapter(key) and identity not in seen:
                seen.add(identity)
                out[prefix + key] = value
        if self.adapter_configs:
            out[prefix + CONFIGS_KEY] = self._configs_tensor()
        return out

    def _configs_tensor(self) -> torch.Tensor:
        data = {
            "factorlab_version": _VERSION,
            "active": list(self._active),
            "adapters": {name: config.to_dict() for name, config in self.adapter_configs.items()},
        }
        return torch.frombuffer(bytearray(json.dumps(data).encode()), dtype=torch.uint8)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a ``state_dict()`` of this model: the adapters' weights (a full-model state dict also
        loads, base weights included). Missing keys are the adapter keys it lacks; non-finite values
        and keys this model does not have are refused (``strict``) instead of loaded."""
        from torch.nn.modules.module import _IncompatibleKeys

        if self.__dict__.get("_whole_state_dict", False):  # factorlab.fsdp.whole_state_dict
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        if not isinstance(state_dict, Mapping) or not all(torch.is_tensor(v) for v in state_dict.values()):
            raise AdapterLoadError("load_state_dict takes a mapping of parameter names to tensors.")
        current = super().state_dict()  # the whole model's tensors, read once
        known = set(current)
        state_dict = _current_keys(state_dict, known)
        state_dict.pop(CONFIGS_KEY, None)  # the configs travel for from_pretrained; the adapters exist here
        own = set(self.state_dict()) - {CONFIGS_KEY}
        missing = sorted(own - set(state_dict))
        unexpected = sorted(set(state_dict) - known)
        if strict and (missing or unexpected):
            raise AdapterLoadError(
                f"state dict does not fit this model: {len(missing)} adapter keys missing (e.g. "
                f"{missing[:3]}), {len(unexpected)} unknown keys (e.g. {unexpected[:3]}); it was saved from "
                "another model or adapter config."
            )
        shapes = [k for k in set(state_dict) & set(current) if state_dict[k].shape != current[k].shape]
        if shapes:
            k = sorted(shapes)[0]
            raise AdapterLoadError(
                f"state dict does not fit this model: {k} has shape {tuple(state_dict[k].shape)}, the "
                f"model's {tuple(current[k].shape)} ({len(shapes)} tensors differ); saved with another "
                "config or model."
            )
        bad = [k for k in own & set(state_dict) if state_dict[k].is_floating_point()]
        bad = [k for k in bad if not torch.isfinite(state_dict[k]).all()]
        if bad:
            raise AdapterLoadError(f"state dict holds NaN or inf in {bad[:3]}; the checkpoint is corrupt.")
        super().load_state_dict(
            {k: v for k, v in state_dict.items() if k in known}, strict=False, assign=assign
        )
        return _IncompatibleKeys(missing, unexpected)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: bool | str = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Write each adapter to ``save_directory`` ("default") or ``save_directory/<name>`` (others), as
        PEFT does, with PEFT's keywords: ``is_main_process=False`` writes nothing (other ranks of a
        distributed run); files are safetensors whatever ``safe_serialization`` says (factorlab never
        writes pickles); embeddings are saved when an adapter trains them (``modules_to_save``), so
        ``save_embedding_layers`` may be "auto" or False."""
        path = save_directory
        self._require("save_pretrained")
        check_save_keywords(save_embedding_layers, path_initial_model_for_weight_conversion, kwargs)
        if not isinstance(selected_adapters, (list, tuple, type(None))):
            raise ConfigError(
                f"selected_adapters must be a list of adapter names, got {selected_adapters!r}."
            )
        if not safe_serialization:
            warnings.warn(
                "safe_serialization=False: factorlab writes safetensors only (pickles run code on load).",
                stacklevel=2,
            )
        if not is_main_process:
            return
        for name in selected_adapters or list(self.adapter_configs):
            if name not in self.adapter_configs:
                raise ConfigError(f"no adapter named {name!r}; adapters: {sorted(self.adapter_configs)}.")
            self.write_adapter(name, Path(path) if name == "default" else Path(path) / name)

    def adapter_key_map(self, name: str) -> dict[str, str]:
        """Each key of adapter ``name``'s saved file -> the key of the same tensor in torch's state dict
        of this module tree (``factorlab.fsdp`` writes a sharded model's adapter from gathered tensors)."""
        self._whole_state_dict = True
        try:
            where = {(v.data_ptr(), tuple(v.shape)): k for k, v in self.state_dict().items()}
        finally:
            self._whole_state_dict = False
        return {k: where[(v.data_ptr(), tuple(v.shape))] for k, v in self.adapter_state_dict(name).items()}

    def write_adapter(
        self, name: str, folder: str | os.PathLike, tensors: dict[str, torch.Tensor] | None = None
    ) -> Path:
        """Write adapter ``name`` into ``folder`` itself: PEFT's format for methods PEFT has
        (``Method.peft_type``), factorlab's own for the others."""
        self._require("save_pretrained")
        if name not in self.adapter_configs:
            raise ConfigError(f"no adapter named {name!r}; adapters: {sorted(self.adapter_configs)}.")
        config = self.adapter_configs[name]
        method = get_method(config.method)
        facts = {"method": config.method, "factorlab_version": _VERSION, **self._describe_base(name)}
        if method.peft_type is not None:
            # PEFT's own format: peft.PeftModel.from_pretrained loads the folder as it is; factorlab's
            # facts (for its checks on load) sit under one key PEFT ignores.
            layers = [layer for _, layer in self.adapter_layers() if name in layer.adapter_names]
            targets = [
                n
                for n in self.adapter_targets[name]
                if not isinstance(self.get_base_model().get_submodule(n), ModulesToSave)
            ]
            data = config.to_peft_dict(
                targets,
                task_type_of(self.get_base_model()),
                any(getattr(layer, "fan_in_fan_out", False) for layer in layers),
                self._portable_targeting(config, method, targets),
            )
            data["base_model_name_or_path"] = (
                data["base_model_name_or_path"] or facts["base_model_name_or_path"]
            )
            # the targeting as the user gave it, so a model of another depth is caught on load
            facts["targeting"] = {k: getattr(config, k) for k in TARGETING_FIELDS}
            data["factorlab"] = facts
            metadata = {"format": "pt"}
        else:
            data = config.to_dict()
            data.pop("inference_mode", None)
            data |= facts | {"format": "factorlab: this method has no PEFT equivalent; load with factorlab"}
            metadata = {"factorlab_method": config.method}
        tensors = self.adapter_state_dict(name) if tensors is None else tensors
        return write_adapter_folder(folder, data, tensors, metadata)

    def _portable_targeting(self, config, method, targets: list[str]) -> tuple | None:
        """Targeting in PEFT's terms (names or a regex, and exclusions; no roles, no layer filter, whose
        layer numbering PEFT finds its own way) that picks exactly ``targets`` here, or None."""
        # PEFT saves whole embedding matrices when target_modules names "embed_tokens"/"lm_head" (or a
        # regex matches them): such modules are written by their full names, which it does not check.
        full_names = [n for n in targets if n.rsplit(".", 1)[-1] in PEFT_EMBEDDING_NAMES]
        candidates = []
        as_given = config.target_roles is None and config.layers_to_transform is None and not full_names
        if as_given and config.target_modules not in (None, "all-linear"):
            candidates.append((config.target_modules, config.exclude_modules))
        leaves = sorted({n.rsplit(".", 1)[-1] for n in targets if n not in full_names})
        candidates.append((leaves + full_names, None))
        for target_modules, exclude_modules in candidates:
            try:
                picked = resolve_targets(
                    self.get_base_model(),
                    target_modules,
                    exclude_modules=exclude_modules,
                    accepts=method.accepts,
                    accepted_kinds=method.accepted_kinds,
                )
            except TargetError:
                continue
            if sorted(picked) == sorted(targets):
                return list(target_modules) if isinstance(
                    target_modules, (list, tuple)
                ) else target_modules, (
                    list(exclude_modules) if isinstance(exclude_modules, (list, tuple)) else exclude_modules
                )
        return None

    def _load_trainer_checkpoint(self, path: Path, is_trainable: bool) -> None:
        from safetensors.torch import load_file

        file = path / TRAINER_WEIGHTS
        try:
            tensors = load_file(str(file))
        except Exception as err:  # safetensors' own error type for bad headers and short files
            raise AdapterLoadError(f"{file} is corrupt or truncated ({type(err).__name__}: {err}).") from None
        blob = tensors.pop(CONFIGS_KEY, None)
        if blob is None or blob.dtype != torch.uint8 or blob.dim() != 1 or blob.numel() > 10_000_000:
            raise AdapterLoadError(
                f"{file} holds no factorlab adapter configs ({CONFIGS_KEY}): not a Trainer checkpoint of an "
                "AdaptedModel of factorlab >= 0.2. Adapt the model with its config, then "
                "load_state_dict(safetensors.torch.load_file(...))."
            )
        from factorlab.files import parse

        data = parse(bytes(blob.tolist()).decode("utf-8", "replace"), "json", str(file), AdapterLoadError)
        adapters = data.get("adapters") if isinstance(data, dict) else None
        if not isinstance(adapters, dict) or not adapters:
            raise AdapterLoadError(f"{file}: its {CONFIGS_KEY} entry names no adapters; the file is damaged.")
        for name, fields in adapters.items():
            try:
                config = config_from_dict(fields if isinstance(fields, dict) else {})
            except ConfigError as err:
                raise AdapterLoadError(f"{file}: adapter {name!r}: {err}") from None
            config.inference_mode = not is_trainable
            try:
                self._add_adapter(name, config, loading=True)
            except TargetError as err:
                raise AdapterLoadError(f"{path} does not fit this model: {err}") from None
        self.load_state_dict(tensors)
        active = [n for n in data.get("active", []) if n in self.adapter_configs]
        if active:
            self.set_adapter(active)

    def load_adapter(
        self, path: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False
    ) -> None:
        self._require("load_adapter")
        data = read_adapter_config(path)
        if "peft_type" in data:  # PEFT's format: written by PEFT, or by factorlab for a method PEFT has
            method = method_for_peft_type(data["peft_type"])
            if method is None:
                raise AdapterLoadError(
                    f"{path} holds a PEFT {data['peft_type']} adapter; factorlab reads PEFT "
                    f"{', '.join(m.peft_type for m in _peft_methods())} adapters. Load this one with PEFT."
                )
            facts = data.get("factorlab") if isinstance(data.get("factorlab"), dict) else {}
            fields = {k: v for k, v in data.items() if k != "factorlab"}
            if "fan_in_fan_out" in fields:  # PEFT flips it per module at load time; factorlab detects it
                fields["fan_in_fan_out"] = None
            data = {**facts, **fields, "method": method.name}
        elif "method" not in data:
            raise AdapterLoadError(
                f"{path}/adapter_config.json has neither 'method' (factorlab) nor 'peft_type' (PEFT); it is "
                "not an adapter folder."
            )
        saved_class = data.get("base_model_class")
        here = type(self.get_base_model()).__name__
        if saved_class is not None and saved_class != here:
            raise AdapterLoadError(
                f"{path} was saved for a {saved_class} (model_type {data.get('model_type')!r}); this model "
                f"is a {here} (model_type {model_family(self.get_base_model())!r}). Load it into the "
                "architecture it was trained on."
            )
        try:
            config = config_from_dict({k: v for k, v in data.items() if k not in SAVE_ONLY_KEYS})
        except ConfigError as err:
            raise AdapterLoadError(f"{path}/adapter_config.json: {err}") from None
        config.inference_mode = not is_trainable
        tensors = read_adapter_tensors(path)
        try:
            self._add_adapter(adapter_name, config, loading=True)
        except TargetError as err:
            raise AdapterLoadError(f"{path} does not fit this {here}: {err}") from None
        try:
            self._check_saved_targets(path, adapter_name, data.get("targets"))
            self._check_saved_targeting(path, adapter_name, data.get("targeting"))
            self._load_tensors(adapter_name, tensors, path)
        except BaseException:
            self.delete_adapter(adapter_name)
            raise

    def _check_saved_targeting(self, path, adapter_name: str, targeting: dict | None) -> None:
        """PEFT-format folders name their modules exactly; re-resolve the targeting the adapter was made
        with, so an adapter from a shallower model does not silently leave layers bare."""
        if not isinstance(targeting, dict) or set(targeting) != set(TARGETING_FIELDS):
            return
        method = get_method(self.adapter_configs[adapter_name].method)
        loaded = {n for n in self.adapter_targets[adapter_name]
                  if not isinstance(self.get_base_model().get_submodule(n), ModulesToSave)}  # fmt: skip
        try:
            wanted = set(
                resolve_targets(
                    self.get_base_model(),
                    **targeting,
                    default_roles=method.default_roles(model_family(self.get_base_model())),
                    accepts=method.accepts,
                    accepted_kinds=method.accepted_kinds,
                )
            )
        except (TargetError, TypeError):
            return  # the file's own names decided; nothing more to compare
        if wanted != loaded:
            raise AdapterLoadError(
                f"{path} adapts {len(loaded)} modules, but its targeting {targeting} picks {len(wanted)} "
                f"here (e.g. {sorted(wanted - loaded)[:3]}). The model has another depth or layout than the "
                "one the adapter was saved from."
            )

    def _check_saved_targets(self, path, adapter_name: str, saved: dict[str, list[int]] | None) -> None:
        if saved is None:
            return
        now = self._describe_base(adapter_name)["targets"]
        if set(saved) != set(now):
            only_saved = sorted(set(saved) - set(now))[:3]
            only_here = sorted(set(now) - set(saved))[:3]
            raise AdapterLoadError(
                f"{path} adapts {len(saved)} modules, this model resolves {len(now)} for the same config "
                f"(only in the file: {only_saved}; only here: {only_here}). The model has another depth or "
                "layout than the one the adapter was saved from."
            )
        wrong = [(n, saved[n], now[n]) for n in saved if list(saved[n]) != list(now[n])]
        if wrong:
            n, a, b = wrong[0]
            raise AdapterLoadError(
                f"{path}: module {n} had weight shape {a} when saved but has {b} here ({len(wrong)} modules "
                "differ); the adapter belongs to a model of another size."
            )

    def load_adapter_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Load one adapter's tensors, keyed as in its saved file; every check of loading a file applies
        (``where`` names the source in messages)."""
        self._load_tensors(adapter_name, tensors, where)

    def _load_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor], path) -> None:
        for key, tensor in tensors.items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise AdapterLoadError(
                    f"{path}: tensor {key} holds NaN or inf values; the adapter is corrupt."
                )
        claimed: set[str] = set()
        in_place = {f"{KEY_PREFIX}{n}": n for n in self.adapter_in_place.get(adapter_name, ())}
        claimed |= {k for k in tensors if k in in_place}
        if adapter_name in self.shared_adapter_weights:
            shared = self.shared_adapter_weights[adapter_name]
            own = {k[len(SHARED_PREFIX) :]: v for k, v in tensors.items() if k.startswith(SHARED_PREFIX)}
            claimed |= {SHARED_PREFIX + k for k in own}
            copy_state_exact(shared.state_dict(), own, f"{path}: shared weights")
        layers = [(n, layer) for n, layer in self.adapter_layers() if adapter_name in layer.adapter_names]
        bare = [
            n
            for n, layer in layers
            if layer.adapter_state_dict(adapter_name)
            and not any(k.startswith(f"{KEY_PREFIX}{n}.") for k in tensors)
        ]
        if bare:
            raise AdapterLoadError(
                f"{path} holds no tensors for {len(bare)} of the {len(layers)} modules its targeting picks "
                f"in this model (e.g. {bare[:3]}): the model has another depth or layout than the one the "
                "adapter was saved from."
            )
        for name, layer in layers:
            prefix = f"{KEY_PREFIX}{name}."
            own = {
                k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix) and k not in in_place
            }
            claimed |= {prefix + k for k in own}
            layer.load_adapter_state_dict(adapter_name, own, where=f"{path}: {name}")
        extra = sorted(set(tensors) - claimed)
        if extra:
            raise AdapterLoadError(
                f"{path}/adapter_model.safetensors holds {len(extra)} tensors that belong to no adapter "
                f"layer of this model (e.g. {extra[:3]}); it was saved from a different model or config."
            )
        if in_place:  # last: base weights change only once everything else has loaded
            params = dict(self.get_base_model().named_parameters(remove_duplicate=False))
            with torch.no_grad():
                copy_state_exact(
                    {n: params[n].detach() for n in in_place.values()},
                    {in_place[k]: v for k, v in tensors.items() if k in in_place},
                    f"{path}: trained base parameters",
                )


TRAINER_WEIGHTS = "model.safetensors"  # what transformers.Trainer writes for a model it does not know


def is_trainer_checkpoint(path: str | os.PathLike) -> bool:
    """A folder with Trainer's weights file and no adapter config: a ``checkpoint-N/`` of an AdaptedModel."""
    path = Path(path)
    return (path / TRAINER_WEIGHTS).is_file() and not (path / "adapter_config.json").exists()


def _current_keys(state_dict: Mapping[str, torch.Tensor], known: set[str]) -> dict[str, torch.Tensor]:
    """Checkpoints written before AdaptedModel.base_model followed PEFT's layout (factorlab <= 0.1.0
    Trainer checkpoints) name the model's tensors ``base_model.<module>``; they load as
    ``base_model.model.<module>``."""
    out = {}
    for key, value in state_dict.items():
        moved = MODEL_PREFIX + key[len("base_model.") :] if key.startswith("base_model.") else key
        out[moved if key not in known and moved in known else key] = value
    return out


def _weight_shape(module: nn.Module) -> list[int]:
    weight = getattr(module, "weight", None)
    return list(weight.shape) if weight is not None else []


def _peft_methods() -> list:
    return [m for m in METHODS.values() if m.peft_type is not None]
