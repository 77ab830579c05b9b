"""Fully sharded data parallelism (FSDP2, ``torch.distributed.fsdp.fully_shard``) for the training loops.

DistributedDataParallel replicates the model: full fine-tuning of a 7B model with Adam needs ~112 GB a
process in float32. Under FSDP each of N processes holds 1/N of every parameter, gradient and optimizer
moment; a decoder block's parameters are gathered for its forward and backward only.

* One FSDP unit per decoder block plus the root (the embeddings, the final norm, the head and what an
  adapter shares across layers). Frozen base weights and trainable adapters are sharded together.
* Parameters are sharded in float32 (the master copy; FSDP all-gathers a unit in one dtype), and a
  16-bit ``precision`` becomes FSDP's ``MixedPrecisionPolicy``: the gathered copy is cast for compute,
  gradients are reduced in float32.
* Checkpoints are sharded (``torch.distributed.checkpoint``): each rank writes its own shards of the
  trainable parameters and of the optimizer state, with the step and the losses, so a run killed midway
  resumes to the same final weights as an uninterrupted one.
* At the end the full trainable state is gathered to rank 0 (``full_trainable_state``), which writes
  the adapter in PEFT's format (or, for full fine-tuning, a ``save_pretrained`` folder).

It runs on CPU with gloo (a CPU device mesh) as on GPUs with NCCL; the tests use 2 CPU processes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from factorlab.errors import ConfigError
from factorlab.layers.shapes import LAYER_PATTERNS
from factorlab.precision import check_precision

META = "fsdp_state.json"


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model``: the longest ModuleList named like a block list."""
    best: list[nn.Module] = []
    for name, module in model.named_modules():
        named_like_blocks = isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in LAYER_PATTERNS
        if named_like_blocks and len(module) > len(best):
            best = list(module)
    return best


def shard(model: nn.Module, precision: str = "float32") -> nn.Module:
    """Apply FSDP2 to ``model`` in place (every decoder block, then the root); returns it. Call after
    ``torch.distributed`` is initialised and before the optimizer is built (its parameters become
    sharded DTensors)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("FSDP needs a process group: launch with torchrun or accelerate launch.")
    dtype = check_precision(precision)
    blocks = decoder_blocks(model)
    if not blocks:
        raise ConfigError(
            f"FSDP shards one unit per decoder block, and {type(model).__name__} has no block list "
            f"(a ModuleList named one of {LAYER_PATTERNS}); use DistributedDataParallel (drop --fsdp)."
        )
    stored = {p.dtype for p in model.parameters()}
    if stored != {torch.float32}:
        raise ConfigError(
            f"FSDP shards float32 master weights and computes in the chosen precision; the model holds "
            f"{sorted(str(d) for d in stored)}. Keep its weights float32 (the precision is applied by FSDP)."
        )
    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = (
        MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        if dtype != torch.float32
        else None
    )
    kwargs: dict[str, Any] = {"mesh": mesh}
    if policy is not None:
        kwargs["mp_policy"] = policy
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def local_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this rank holds of the parameters and of the optimizer state (a sharded DTensor counts its
    local shard; a plain tensor counts whole)."""

    def size(t: torch.Tensor) -> int:
        local = t.to_local() if hasattr(t, "to_local") else t
        return local.numel() * local.element_size()

    params = sum(size(p) for p in model.parameters())
    state = 0
    if optimizer is not None:
        for entry in optimizer.state.values():
            state += sum(size(v) for v in entry.values() if torch.is_tensor(v) and v.dim() > 0)
    return {"parameters": params, "optimizer": state}


@contextmanager
def whole_state_dict(model: nn.Module) -> Iterator[None]:
    """Inside the block, an AdaptedModel's ``state_dict`` is torch's (every tensor of the module tree),
    which ``torch.distributed.checkpoint`` maps parameter by parameter."""
    flag = hasattr(model, "_whole_state_dict")
    if flag:
        model._whole_state_dict = True
    try:
        yield
    finally:
        if flag:
            model._whole_state_dict = False


def _options(full: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # strict=False: the frozen weights are neither saved nor loaded (dcp.load itself fails on any
    # trainable tensor the checkpoint lacks)
    return StateDictOptions(ignore_frozen_params=True, full_state_dict=full, cpu_offload=full, strict=False)


def save_sharded(
    folder: str | os.PathLike, model: nn.Module, optimizer, step: int, losses: list[float]
) -> None:
    """A sharded checkpoint of the trainable parameters and the optimizer state (every rank writes its
    shards), written to a temporary folder and renamed into place by rank 0."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder = Path(folder)
    tmp = folder.with_name(f"{folder.name}.tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    with whole_state_dict(model):
        model_state, optim_state = get_state_dict(model, optimizer, options=_options())
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        (tmp / META).write_text(json.dumps({"step": step, "losses": losses}))
        old = folder.with_name(f"{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_sharded(folder: str | os.PathLike, model: nn.Module, optimizer) -> dict[str, Any] | None:
    """Restore a ``save_sharded`` checkpoint into the sharded model and optimizer; its metadata, or None
    when there is none."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = Path(folder)
    if not (folder / META).is_file():
        return None
    with whole_state_dict(model):
        model_state, optim_state = get_state_dict(model, optimizer, options=_options())
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(folder))
        set_state_dict(
            model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=_options(),
        )
    return json.loads((folder / META).read_text())


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor, whole, on rank 0's CPU (other ranks get an empty dict); keys as the
    module tree names them. A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    with whole_state_dict(model):
        return get_model_state_dict(model, options=_options(full=True))


def remember_adapter_keys(model: nn.Module) -> None:
    """Before sharding: how each adapter's file keys map to the module tree's (``write_sharded``)."""
    if hasattr(model, "adapter_key_map"):
        model._fsdp_key_maps = {name: model.adapter_key_map(name) for name in model.adapter_configs}


def write_sharded(model: nn.Module, folder: str | os.PathLike) -> Path | None:
    """Write a sharded model's training result from its gathered tensors, on rank 0: an AdaptedModel's
    adapters as ``save_pretrained`` writes them (PEFT's format for LoRA), a fully fine-tuned model as a
    ``from_pretrained`` folder (config.json + model.safetensors). A collective: every rank calls it."""
    import torch.distributed as dist

    full = full_trainable_state(model)
    if dist.get_rank() != 0:
        return None
    folder = Path(folder)
    maps = getattr(model, "_fsdp_key_maps", None)
    if maps is not None:
        for name, keys in maps.items():
            tensors = {file_key: full[module_key] for file_key, module_key in keys.items()}
            model.write_adapter(name, folder if name == "default" else folder / name, tensors)
        return folder
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = getattr(model, "config", None)
    if getattr(config, "tie_word_embeddings", False):  # one copy of a tied weight; loading ties it again
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = [n for n, m in model.named_modules() if m is head]
        for n in names:
            full.pop(f"{n}.weight", None)
    save_file(
        {k: v.contiguous() for k, v in full.items()}, str(folder / "model.safetensors"), {"format": "pt"}
    )
    if config is not None:
        config.save_pretrained(folder)
    return folder
