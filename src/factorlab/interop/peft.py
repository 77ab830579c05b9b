"""PEFT interop for LoRA by name: ``save_as_peft`` writes a folder ``peft.PeftModel.from_pretrained``
loads, ``load_peft_lora`` reads a folder PEFT wrote. ``AdaptedModel.save_pretrained`` /
``from_pretrained`` do the same for LoRA; the file format itself lives in ``factorlab.peft_format``.
"""

from __future__ import annotations

import os
from pathlib import Path

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
