"""The pieces every factorlab training loop shares: a data-parallel-safe language-model loss and
checkpointed resumption. Used by the knowledge-injection and LoRA-Mixer recipes."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from factorlab.checkpoint import load_checkpoint, save_checkpoint
from factorlab.distributed import all_reduce_sum, init_from_env, is_main, world_size
from factorlab.errors import ConfigError, TrainingDivergedError
from factorlab.layers.frozen import transposed_frozen_weights
from factorlab.layers.tied import tied_embedding_gradient
from factorlab.precision import autocast, check_precision, grad_scaler, keep_trainable_float32


class _SummedCrossEntropy(torch.autograd.Function):
    """``F.cross_entropy(logits, targets, reduction="sum")`` with the gradient written in one tensor:
    g (softmax - onehot) from the saved log-probabilities, instead of a zero-filled one-hot gradient
    passed through log-softmax's backward (two fewer passes over (tokens x vocabulary) a step)."""

    @staticmethod
    def forward(ctx, logits, targets):  # logits (N, V), targets (N,)
        log_probs = torch.log_softmax(logits, dim=-1)
        ctx.save_for_backward(log_probs, targets)
        return -log_probs.gather(1, targets[:, None]).sum()

    @staticmethod
    def backward(ctx, grad):  # grad: a scalar
        log_probs, targets = ctx.saved_tensors
        grad_logits = torch.exp(log_probs).mul_(grad)
        grad_logits[torch.arange(len(targets), device=targets.device), targets] -= grad
        return grad_logits, None


@dataclass(frozen=True)
class LoopOptions:
    """How a training loop runs, beside what it trains: numerics and memory (``run_training``)."""

    precision: str = "float32"
    """"float32", "bfloat16" or "float16" (factorlab.precision)."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward: less memory, the same gradients."""

    def __post_init__(self) -> None:
        check_precision(self.precision)


DEFAULT_LOOP = LoopOptions()

# step -> (this rank's inputs, labels, extra forward kwargs)
BatchFn = Callable[[int], tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, Any]]]


def lm_loss(
    net: nn.Module,
    model: nn.Module,
    inputs: dict,
    labels: torch.Tensor,
    defer: bool = False,
    **forward_kwargs,
):
    """(loss to backpropagate, loss to log) for next-token prediction on ``labels`` (-100 = ignore).

    The loss is the sum over this rank's predicted tokens divided by the token count of the whole
    global batch, times the number of ranks (DistributedDataParallel averages gradients over
    ranks): every rank's gradient then adds up to the global mean, so N processes follow the same
    loss curve as one process with the same global batch. Auxiliary losses the model exposes
    (LoRA-Mixer's routing loss) are added to the first. The output head runs only where a label is
    predicted (``logits_at``).

    ``defer`` (GPUs): nothing waits for the device. The head runs on every position with -100 left to
    the cross-entropy (selecting positions by a mask would read its count back to the host), the loss
    to log is returned as a device scalar, and its finiteness is checked by the caller later
    (``run_training`` checks every few steps).
    """
    targets = labels[:, 1:]
    predicts = targets != -100  # (B, L - 1): positions whose next token is a label
    if defer:
        logits = net(**inputs, **forward_kwargs).logits[:, :-1]
        loss_sum = nn.functional.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
        )
    else:
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = predicts
        logits = logits_at(net, model, keep, **inputs, **forward_kwargs)
        loss_sum = _SummedCrossEntropy.apply(logits.float(), targets[predicts])
    tokens = all_reduce_sum(predicts.sum()).clamp_min(1)
    loss = loss_sum * world_size() / tokens
    aux = getattr(model, "last_aux_loss", None)
    if torch.is_tensor(aux) and aux.requires_grad:
        loss = loss + aux
    logged = all_reduce_sum(loss_sum.detach()) / tokens
    if defer:
        return loss, logged
    if not torch.isfinite(loss):
        raise TrainingDivergedError("non-finite training loss; lower the learning rate.")
    return loss, logged.item()


def logits_at(net: nn.Module, model: nn.Module, keep: torch.Tensor, **inputs) -> torch.Tensor:
    """Logits of ``net(**inputs)`` at the positions where ``keep`` (batch, length) is True, as
    (kept positions, vocabulary) in row-major order.

    The output head runs only on those positions when ``model`` names its head (Hugging Face models
    do): on short texts the head (vocabulary x hidden) is a large share of the model, and padding or
    a text's last token would pay for it without contributing to the loss.
    """
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module):
        return net(**inputs).logits[keep]
    handle = head.register_forward_pre_hook(lambda _, args: (args[0][keep], *args[1:]))
    try:
        logits = net(**inputs).logits
    except (IndexError, RuntimeError):
        logits = None  # the model feeds its head another shape, or reshapes the logits
    finally:
        handle.remove()
    if logits is None or logits.shape[:-1] != (int(keep.sum()),):
        return net(**inputs).logits[keep]  # correct, at the price of the whole head
    return logits


def pack(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A right-padded batch as one row without padding: (inputs, labels) for ``lm_loss``.

    ``position_ids`` restart at 0 for every text and there is no attention mask, which Hugging Face
    models read as packed sequences (each text attends only to itself). Labels are the tokens
    themselves, or ``labels`` (same shape as ``input_ids``, -100 = no label) packed alike; a text's
    first token is never a label, so no text learns to predict the next one's start. Use
    ``packs_sequences`` to check that a model keeps packed texts apart before relying on this.
    """
    lengths = attention_mask.sum(1).tolist()
    ids = torch.cat([row[:n] for row, n in zip(input_ids, lengths)])
    positions = torch.cat([torch.arange(n) for n in lengths])
    targets = ids if labels is None else torch.cat([row[:n] for row, n in zip(labels, lengths)])
    labels = targets.masked_fill(positions == 0, -100)
    inputs = {"input_ids": ids[None], "position_ids": positions[None], "use_cache": False}
    return inputs, labels[None]


def to_device(inputs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """``inputs`` with every tensor on ``device`` (other values as they are). To a GPU through pinned
    memory without waiting: a copy from pageable memory would first wait for the device's queue."""
    device = torch.device(device)
    if device.type != "cuda":
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    return {
        k: v.pin_memory().to(device, non_blocking=True) if torch.is_tensor(v) else v
        for k, v in inputs.items()
    }


def packs_sequences(model: nn.Module, vocab_size: int) -> bool:
    """Whether ``model`` keeps packed texts apart: logits of two packed texts equal their padded ones."""
    ids = torch.randint(vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            padded = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            inputs, _ = pack(ids, mask)
            packed = model(**to_device(inputs, device)).logits[0]
    except (TypeError, ValueError, RuntimeError):
        return False  # the model takes no position_ids, or no packed input
    finally:
        model.train(was_training)
    expected = torch.cat([padded[0], padded[1, :4]])
    return bool(torch.allclose(packed, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max())))


OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def run_training(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | OptimizerFactory,
    steps: int,
    batch_for_step: BatchFn,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 50,
    progress: Callable[[int], None] | None = None,
    stop_after: int | None = None,
    context: str = "",
    precision: str = "float32",
    gradient_checkpointing: bool = False,
    fsdp: bool = False,
) -> list[float]:
    """The loop behind every recipe that trains a language model; returns the logged losses.

    Runs unchanged under torchrun / accelerate launch (``batch_for_step`` gives this rank's shard;
    ``lm_loss`` normalises by the global token count). With ``checkpoint_dir`` it saves every
    ``checkpoint_every`` steps (rank 0 only) and resumes from the last checkpoint; batches must be a
    pure function of the step, so a resumed run ends with the same weights as an uninterrupted one.
    ``stop_after`` stops early (to test resuming); ``context`` names the run in errors.

    ``precision`` ("float32", "bfloat16", "float16"): the forward under autocast, float16 with a
    gradient scaler (``factorlab.precision``; the model's weights are already stored as that module
    says). ``gradient_checkpointing``: each decoder block's activations are recomputed in the backward
    instead of kept (non-reentrant checkpoints, so frozen inputs pass gradients to the adapters).

    ``fsdp`` (under torchrun / accelerate launch): the model is sharded with FSDP2 in place
    (``factorlab.fsdp``: float32 master weights, ``precision`` as FSDP's mixed precision), the optimizer
    is built afterwards from ``optimizer`` (then a function of the trainable parameters), checkpoints
    are sharded and every rank writes its own; ``factorlab.fsdp.write_sharded`` writes the result.
    """
    check_precision(precision)
    if precision != "float32" and not fsdp:
        keep_trainable_float32(model)  # before the optimizer's state exists: trained weights stay float32
    distributed = init_from_env()
    model.train()
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if fsdp:
        return _run_sharded(
            model, optimizer, steps, batch_for_step, checkpoint_dir, checkpoint_every, progress,
            stop_after, context, precision, distributed,
        )  # fmt: skip
    if not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer([p for p in model.parameters() if p.requires_grad])
    losses: list[float] = []
    start = 0
    if checkpoint_dir is not None:
        meta = load_checkpoint(checkpoint_dir, model, optimizer)
        if meta is not None:
            start, losses = meta["step"], list(meta["extra"]["losses"])
    net = DistributedDataParallel(model) if distributed else model
    device = next(model.parameters()).device
    scaler = grad_scaler(precision, device)
    log = LossLog(losses, defer=device.type == "cuda", context=context)
    # frozen weights read row-major in both GEMMs (factorlab.layers.frozen); one copy while training.
    # A trainable tied embedding's (vocabulary x hidden) gradient reuses one buffer instead of three
    # fresh ones a step (factorlab.layers.tied); not under DDP, whose gradient hooks it would bypass.
    # Both fast paths assume float32 weights and no recomputation; with another precision or
    # checkpointing the plain path runs.
    plain = precision != "float32" or gradient_checkpointing
    tied = nullcontext() if distributed or plain else tied_embedding_gradient(model)
    frozen = nullcontext() if plain else transposed_frozen_weights(model)
    with frozen, tied:
        for step in range(start, steps):
            inputs, labels, forward_kwargs = batch_for_step(step)
            try:
                with autocast(precision, device):
                    loss, logged = lm_loss(net, model, inputs, labels, defer=log.defer, **forward_kwargs)
            except TrainingDivergedError:
                log.add(step, float("nan"))  # raises, naming the step
            log.add(step, logged)
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            if checkpoint_dir is not None and (step + 1) % checkpoint_every == 0 and is_main():
                save_checkpoint(checkpoint_dir, model, optimizer, step + 1, {"losses": log.flush()})
            if progress is not None:
                progress(step + 1)
            if stop_after is not None and step + 1 >= stop_after:
                break
    log.flush()
    model.eval()
    if gradient_checkpointing:
        disable_gradient_checkpointing(model)
    return losses


class LossLog:
    """The logged losses. On a GPU (``defer``) each step's loss stays on the device and is read back
    every ``every`` steps in one transfer, so no step waits for the device; a non-finite loss is then
    found at that read, at most ``every`` steps late, before any checkpoint or result is written
    (``flush`` runs first). On the CPU each loss is checked as it comes."""

    def __init__(self, losses: list[float], defer: bool, context: str = "", every: int = 16):
        self.losses, self.defer, self.context, self.every = losses, defer, context, every
        self.pending: list[tuple[int, torch.Tensor]] = []

    def add(self, step: int, logged: float | torch.Tensor) -> None:
        if not self.defer:
            self._check(step, float(logged))
            self.losses.append(float(logged))
            return
        self.pending.append((step, logged))
        if len(self.pending) >= self.every:
            self.flush()

    def flush(self) -> list[float]:
        if self.pending:
            values = torch.stack([v for _, v in self.pending]).tolist()  # one read-back for all of them
            for (step, _), value in zip(self.pending, values):
                self._check(step, value)
            self.losses += values
            self.pending.clear()
        return self.losses

    def _check(self, step: int, value: float) -> None:
        if not math.isfinite(value):
            where = f" ({self.context})" if self.context else ""
            raise TrainingDivergedError(f"non-finite loss at step {step}{where}; lower the learning rate.")


def _run_sharded(
    model, make_optimizer, steps, batch_for_step, checkpoint_dir, checkpoint_every, progress, stop_after,
    context, precision, distributed,
) -> list[float]:  # fmt: skip
    """``run_training`` under FSDP2 (see there)."""
    from factorlab import fsdp

    if not distributed:
        raise ConfigError("--fsdp shards over processes: launch with torchrun or accelerate launch.")
    if precision == "float16":
        raise ConfigError("--fsdp trains in float32 or bfloat16 (float16 needs a sharded gradient scaler).")
    if isinstance(make_optimizer, torch.optim.Optimizer):
        raise ConfigError(
            "under FSDP the optimizer is built after sharding: pass a function of the parameters, e.g. "
            "lambda params: torch.optim.Adam(params, lr=1e-4)."
        )
    fsdp.remember_adapter_keys(model)
    fsdp.shard(model, precision)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
    losses: list[float] = []
    start = 0
    if checkpoint_dir is not None:
        meta = fsdp.load_sharded(checkpoint_dir, model, optimizer)
        if meta is not None:
            start, losses = meta["step"], list(meta["losses"])
    for step in range(start, steps):
        inputs, labels, forward_kwargs = batch_for_step(step)
        try:
            loss, logged = lm_loss(model, model, inputs, labels, **forward_kwargs)
        except TrainingDivergedError:
            where = f" ({context})" if context else ""
            raise TrainingDivergedError(
                f"non-finite loss at step {step}{where}; lower the learning rate."
            ) from None
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(logged)
        if checkpoint_dir is not None and (step + 1) % checkpoint_every == 0:
            fsdp.save_sharded(checkpoint_dir, model, optimizer, step + 1, losses)
        if progress is not None:
            progress(step + 1)
        if stop_after is not None and step + 1 >= stop_after:
            break
    model.eval()
    return losses


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward. Hugging Face models checkpoint their own
    blocks; the non-reentrant form lets gradients reach adapters whose block inputs do not require
    grad (the frozen embedding's output), which the reentrant one silently drops (PEFT's
    ``enable_input_require_grads`` workaround)."""
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if not callable(enable) or not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"{type(model).__name__} has no gradient checkpointing (a Hugging Face model with "
            "supports_gradient_checkpointing); train without it."
        )
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def disable_gradient_checkpointing(model: nn.Module) -> None:
    disable = getattr(model, "gradient_checkpointing_disable", None)
    if callable(disable):
        disable()
