"""Training checkpoints that resume to the same final weights: trainable parameters and the
optimizer state in safetensors (no pickle), the step and optimizer settings in JSON. A checkpoint
is written to a temporary folder and renamed into place, so an interrupted save never leaves a
half-written checkpoint behind."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

STATE = "training_state.safetensors"
META = "training_state.json"


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    folder: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    params = _trainable(model)
    index = {id(p): i for i, p in enumerate(params.values())}
    tensors = {f"param/{n}": p.detach().cpu().contiguous().clone() for n, p in params.items()}
    opt_state = optimizer.state_dict()
    positions = [index[id(p)] for group in optimizer.param_groups for p in group["params"]]
    scalars: dict[str, Any] = {}
    for slot, state in opt_state["state"].items():
        param_index = positions[slot]
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim/{param_index}/{key}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars[f"{param_index}/{key}"] = value
    meta = {
        "step": step,
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt_state["param_groups"]],
        "optim_scalars": scalars,
        "params": list(params),
        "extra": extra or {},
    }
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / STATE))
    (tmp / META).write_text(json.dumps(meta))
    old = folder.with_name(f"{folder.name}.old{os.getpid()}")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def load_checkpoint(
    folder: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict | None:
    """Restore parameters and optimizer state; returns the saved metadata, or None if there is none."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / META).exists() or not (folder / STATE).exists():
        return None
    meta = json.loads((folder / META).read_text())
    tensors = load_file(str(folder / STATE))
    params = _trainable(model)
    if list(params) != meta["params"]:
        raise ValueError(f"{folder} was saved for other trainable parameters; delete it to start over.")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param/{n}"])
    index = {id(p): i for i, p in enumerate(params.values())}
    positions = [index[id(p)] for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for slot, param_index in enumerate(positions):
        entry = {
            key.split("/")[-1]: t for key, t in tensors.items() if key.startswith(f"optim/{param_index}/")
        }
        entry |= {
            key.split("/")[-1]: v
            for key, v in meta["optim_scalars"].items()
            if key.startswith(f"{param_index}/")
        }
        if entry:
            state[slot] = entry
    current = optimizer.state_dict()["param_groups"]
    groups = [{**saved, "params": now["params"]} for saved, now in zip(meta["param_groups"], current)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return meta
