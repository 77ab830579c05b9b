"""Adapter files on disk: ``adapter_config.json`` + ``adapter_model.safetensors`` (never pickle)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from factorlab.errors import AdapterLoadError, AdapterSaveError, translated
from factorlab.files import parse, read_text
from factorlab.runtime import write_json

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 10_000_000  # PEFT's configs are a few kB; a per-module rank_pattern stays far below this


def write_adapter_folder(
    path: str | os.PathLike,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    # Loading refuses NaN/inf, so such a file would be unloadable; say so now and write nothing.
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise AdapterSaveError(
            f"not saving to {path}: {len(bad)} tensor(s) hold NaN or inf ({bad[:3]}); training diverged "
            "(lower the learning rate) or the weights were overwritten. Nothing was written."
        )
    if path.exists() and not path.is_dir():
        raise AdapterSaveError(
            f"cannot save an adapter to {path}: it is a file, and an adapter is a folder; pass a folder path."
        )
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if (path / name).is_dir():
            raise AdapterSaveError(
                f"cannot save to {path}: {path / name} is a folder; remove it or save elsewhere."
            )
    # Own, contiguous CPU copies: safetensors refuses shared or strided storage, and values stay exact.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    tmp = path / f".{WEIGHTS_NAME}.tmp"
    with translated(f"saving an adapter to {path}", AdapterSaveError):
        path.mkdir(parents=True, exist_ok=True)
        try:
            save_file(tensors, str(tmp), metadata={"format": "pt", **metadata})
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path / WEIGHTS_NAME)
        write_json(path / CONFIG_NAME, config)
    return path


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise AdapterLoadError(f"{path} is not a folder; pass the folder that holds {CONFIG_NAME}.")
    file = path / CONFIG_NAME
    if not file.exists():
        present = sorted(p.name for p in path.iterdir())[:10]
        raise AdapterLoadError(
            f"{path} has no {CONFIG_NAME} (it holds {present}); is this an adapter folder?"
        )
    what = f"adapter folder {path}"
    data = parse(
        read_text(file, what, MAX_CONFIG_BYTES, AdapterLoadError), "json", f"{file}", AdapterLoadError
    )
    if not isinstance(data, dict):
        raise AdapterLoadError(f"{file} should hold a JSON object, found {type(data).__name__}.")
    return data


def read_adapter_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(path)
    file = path / WEIGHTS_NAME
    if file.is_dir():
        raise AdapterLoadError(f"{file} is a folder, not a weights file; the adapter folder is damaged.")
    if file.exists() and not file.is_file():  # a pipe or device: reading it could wait forever
        raise AdapterLoadError(f"{file} is not a regular file (a pipe, socket or device); re-save it.")
    if not file.exists():
        pickled = [p.name for p in path.glob("*.bin")]
        hint = (
            (
                f" It holds {pickled}: pickle files are not loaded (they can run code); convert them to "
                "safetensors first."
            )
            if pickled
            else ""
        )
        raise AdapterLoadError(f"{path} has no {WEIGHTS_NAME}.{hint}")
    try:
        return load_file(str(file))
    except Exception as err:  # safetensors raises its own error type for bad headers and short files
        raise AdapterLoadError(
            f"{file} is corrupt or truncated ({type(err).__name__}: {err}); re-save or re-copy the adapter."
        ) from None
