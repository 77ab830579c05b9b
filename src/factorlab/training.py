"""The pieces every factorlab training loop shares: a data-parallel-safe language-model loss and
checkpointed resumption. Used by the knowledge-injection and LoRA-Mixer recipes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from factorlab.distributed import all_reduce_sum, world_size
from factorlab.errors import TrainingDivergedError


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
