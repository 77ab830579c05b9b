"""The pieces every factorlab training loop shares: a data-parallel-safe language-model loss and
checkpointed resumption. Used by the knowledge-injection and LoRA-Mixer recipes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from factorlab.checkpoint import load_checkpoint, save_checkpoint
from factorlab.distributed import all_reduce_sum, init_from_env, is_main, world_size
from factorlab.errors import TrainingDivergedError

# step -> (this rank's inputs, labels, extra forward kwargs)
BatchFn = Callable[[int], tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, Any]]]


def lm_loss(net: nn.Module, model: nn.Module, inputs: dict, labels: torch.Tensor, **forward_kwargs):
    """(loss to backpropagate, loss to log) for next-token prediction on ``labels`` (-100 = ignore).

    The loss is the sum over this rank's predicted tokens divided by the token count of the whole
    global batch, times the number of ranks (DistributedDataParallel averages gradients over
    ranks): every rank's gradient then adds up to the global mean, so N processes follow the same
    loss curve as one process with the same global batch. Auxiliary losses the model exposes
    (LoRA-Mixer's routing loss) are added to the first.
    """
    logits = net(**inputs, **forward_kwargs).logits[:, :-1]
    targets = labels[:, 1:]
    loss_sum = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum"
    )
    tokens = all_reduce_sum((targets != -100).sum()).clamp_min(1)
    loss = loss_sum * world_size() / tokens
    aux = getattr(model, "last_aux_loss", None)
    if torch.is_tensor(aux) and aux.requires_grad:
        loss = loss + aux
    if not torch.isfinite(loss):
        raise TrainingDivergedError("non-finite training loss; lower the learning rate.")
    return loss, (all_reduce_sum(loss_sum.detach()) / tokens).item()


def run_training(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: int,
    batch_for_step: BatchFn,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 50,
    progress: Callable[[int], None] | None = None,
    stop_after: int | None = None,
    context: str = "",
) -> list[float]:
    """The loop behind every recipe that trains a language model; returns the logged losses.

    Runs unchanged under torchrun / accelerate launch (``batch_for_step`` gives this rank's shard;
    ``lm_loss`` normalises by the global token count). With ``checkpoint_dir`` it saves every
    ``checkpoint_every`` steps (rank 0 only) and resumes from the last checkpoint; batches must be a
    pure function of the step, so a resumed run ends with the same weights as an uninterrupted one.
    ``stop_after`` stops early (to test resuming); ``context`` names the run in errors.
    """
    distributed = init_from_env()
    losses: list[float] = []
    start = 0
    if checkpoint_dir is not None:
        meta = load_checkpoint(checkpoint_dir, model, optimizer)
        if meta is not None:
            start, losses = meta["step"], list(meta["extra"]["losses"])
    net = DistributedDataParallel(model) if distributed else model
    model.train()
    for step in range(start, steps):
        inputs, labels, forward_kwargs = batch_for_step(step)
        try:
            loss, logged = lm_loss(net, model, inputs, labels, **forward_kwargs)
        except TrainingDivergedError:
            where = f" ({context})" if context else ""
            raise TrainingDivergedError(
                f"non-finite loss at step {step}{where}; lower the learning rate."
            ) from None
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(logged)
        if checkpoint_dir is not None and (step + 1) % checkpoint_every == 0 and is_main():
            save_checkpoint(checkpoint_dir, model, optimizer, step + 1, {"losses": losses})
        if progress is not None:
            progress(step + 1)
        if stop_after is not None and step + 1 >= stop_after:
            break
    model.eval()
    return losses
