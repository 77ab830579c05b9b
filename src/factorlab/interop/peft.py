"""PEFT interop for LoRA by name: ``save_as_peft`` writes a folder ``peft.PeftModel.from_pretrained``
loads, ``load_peft_lora`` reads a folder PEFT wrote; ``get_peft_model_state_dict`` /
``set_peft_model_state_dict`` are PEFT's calls of those names for an AdaptedModel.
``AdaptedModel.save_pretrained`` / ``from_pretrained`` do the same for LoRA; the file format itself
lives in ``factorlab.peft_format``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from factorlab.adapter_files import read_adapter_config
from factorlab.core.adapted import AdaptedModel
from factorlab.errors import AdapterLoadError, ConfigError
from factorlab.methods.lora.config import LoraConfig
from factorlab.peft_format import PeftLora, read_peft_lora, write_peft_lora  # noqa: F401  (public here too)


def save_as_peft(adapted: AdaptedModel, path: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write LoRA adapter ``adapter_name`` (default: the active one) into ``path`` in PEFT's format.

    The same folder ``save_pretrained`` writes for a LoRA adapter; this one writes any adapter
    into ``path`` itself (not ``path/<name>``) and refuses methods PEFT does not have."""
    name = adapter_name or adapted.active_adapter
    if name not in adapted.adapter_configs:
        raise ConfigError(f"no adapter named {name!r}; adapters: {sorted(adapted.adapter_configs)}.")
    config = adapted.adapter_configs[name]
    if not isinstance(config, LoraConfig):
        raise ConfigError(
            f"PEFT has no {config.method!r} method; only LoRA adapters can be saved in PEFT format."
        )
    return adapted.write_adapter(name, path)


def load_peft_lora(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False
) -> AdaptedModel:
    """Read a PEFT LoRA folder (LoRA, DoRA, bias, modules_to_save) into factorlab; the result gives
    the same outputs as PEFT's model. ``AdaptedModel.from_pretrained`` reads the same folders."""
    peft_type = read_adapter_config(path).get("peft_type")
    if peft_type != "LORA":
        what = f"a PEFT {peft_type} adapter" if peft_type else "not a PEFT adapter (no peft_type)"
        raise AdapterLoadError(
            f"{path} holds {what}; factorlab reads PEFT LoRA adapters (peft_type 'LORA') only."
        )
    return AdaptedModel.from_pretrained(model, path, adapter_name, is_trainable)


def get_peft_model_state_dict(
    model: AdaptedModel,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, torch.Tensor]:
    """PEFT's ``get_peft_model_state_dict`` for an AdaptedModel: one adapter's tensors under the keys
    of its saved file (``base_model.model.<module>.lora_A.weight``: the adapter name left out), the
    keys PEFT's function gives a PEFT model. ``state_dict`` (e.g. gathered from a sharded model, keyed
    as ``model.state_dict()``) supplies the values instead of the live tensors.

    (``peft.get_peft_model_state_dict`` itself walks PEFT's own layer classes, so on a factorlab model
    it cannot find the adapters; this is the same call for factorlab's.)"""
    model = _adapted(model, unwrap_compiled)
    if adapter_name not in model.adapter_configs:
        raise ConfigError(f"no adapter named {adapter_name!r}; adapters: {sorted(model.adapter_configs)}.")
    if save_embedding_layers not in ("auto", False):
        raise ConfigError(
            "save_embedding_layers=True: factorlab keeps the embeddings an adapter trains in its state; add "
            "modules_to_save=['embed_tokens', 'lm_head'] to the config to train and save them."
        )
    tensors = model.adapter_state_dict(adapter_name)
    if state_dict is None:
        return tensors
    by_identity = {(v.data_ptr(), tuple(v.shape)): k for k, v in model.state_dict(keep_vars=True).items()}
    out = {}
    for key, tensor in tensors.items():
        model_key = by_identity.get((tensor.data_ptr(), tuple(tensor.shape)))
        if model_key is None or model_key not in state_dict:
            raise AdapterLoadError(
                f"state_dict has no entry for {key} (model key {model_key}); pass this model's state_dict()."
            )
        out[key] = state_dict[model_key]
    return out


def set_peft_model_state_dict(
    model: AdaptedModel,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
):
    """PEFT's ``set_peft_model_state_dict`` for an AdaptedModel: load tensors keyed as
    :func:`get_peft_model_state_dict` gives them (and as PEFT's files hold them) into adapter
    ``adapter_name``, exactly, with the checks of loading a file (every tensor present, of its shape
    and finite; otherwise ``AdapterLoadError`` and nothing changes). Returns PEFT's (missing, unexpected)
    pair, both empty."""
    from torch.nn.modules.module import _IncompatibleKeys

    model = _adapted(model, False)
    if adapter_name not in model.adapter_configs:
        raise ConfigError(f"no adapter named {adapter_name!r}; adapters: {sorted(model.adapter_configs)}.")
    if ignore_mismatched_sizes:
        raise ConfigError("ignore_mismatched_sizes=True would drop weights; factorlab loads all or nothing.")
    if not isinstance(peft_model_state_dict, dict) or not all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in peft_model_state_dict.items()
    ):
        raise AdapterLoadError("set_peft_model_state_dict takes a dict of key -> tensor.")
    backup = {k: v.detach().clone() for k, v in model.adapter_state_dict(adapter_name).items()}
    try:
        model.load_adapter_tensors(adapter_name, peft_model_state_dict, "state dict")
    except BaseException:
        model.load_adapter_tensors(adapter_name, backup, "backup")
        raise
    return _IncompatibleKeys([], [])


def _adapted(model, unwrap_compiled: bool) -> AdaptedModel:
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)  # DistributedDataParallel
    if not isinstance(model, AdaptedModel):
        raise ConfigError(
            f"expected a factorlab AdaptedModel, got {type(model).__name__}; for a PEFT model use peft's own "
            "get_peft_model_state_dict."
        )
    return model
