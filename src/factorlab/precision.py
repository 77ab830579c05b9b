"""Training precision: float32, bfloat16 or float16, as PEFT and torch's AMP practice it.

* Frozen base weights are stored in the chosen dtype (half the memory of float32), adapter weights
  stay float32 (PEFT's ``autocast_adapter_dtype``): a 16-bit adapter would round away Adam's small
  updates. Everything trainable is float32, whatever the base.
* Full fine-tuning keeps float32 master weights and computes in the chosen dtype under autocast
  (mixed precision). Pure bf16 weights with Adam would stall: an update below 2^-8 of a weight's size
  (bf16's 8-bit mantissa) rounds to no change at all, and fine-tuning updates are mostly that small.
  This costs 16 bytes a parameter (weights, gradients, two Adam moments, all float32), which FSDP
  shards over the GPUs (``factorlab.fsdp``).
* The forward runs under ``torch.autocast``; the loss (``factorlab.training.lm_loss``) and the
  evaluation's rank metrics are computed from float32 logits.
* float16 needs a gradient scaler (its range ends at 65504 and gradients underflow); bfloat16 has
  float32's range and does not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from factorlab.errors import ConfigError

PRECISIONS = ("float32", "bfloat16", "float16")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_precision(precision: str) -> torch.dtype:
    if precision not in DTYPES:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    return DTYPES[precision]


def store_base(model: nn.Module, precision: str) -> nn.Module:
    """Cast ``model``'s weights to ``precision`` before adapters are added (they are built in float32
    on a 16-bit base; see ``keep_trainable_float32``). float32 leaves the model as it is."""
    dtype = check_precision(precision)
    if dtype is not torch.float32:
        model.to(dtype)
    return model


def keep_trainable_float32(model: nn.Module) -> nn.Module:
    """Every trainable parameter in float32 (trained copies of 16-bit modules, e.g. Compacter's layer
    norms, would otherwise train in 16 bits); frozen ones keep their dtype."""
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The forward's context: autocast to ``precision`` on ``device``'s type, or nothing for float32."""
    dtype = check_precision(precision)
    if dtype is torch.float32:
        return contextlib.nullcontext()
    kind = torch.device(device).type
    return torch.autocast(device_type=kind, dtype=dtype)


def grad_scaler(precision: str, device: torch.device | str) -> torch.amp.GradScaler | None:
    """A gradient scaler for float16 (None otherwise)."""
    if check_precision(precision) is not torch.float16:
        return None
    return torch.amp.GradScaler(torch.device(device).type)


@contextlib.contextmanager
def evaluating(precision: str, device: torch.device | str) -> Iterator[None]:
    """Evaluation forwards under the training precision's autocast (the metrics read float32 logits)."""
    with autocast(precision, device):
        yield


@contextlib.contextmanager
def float32_head(model: nn.Module) -> Iterator[None]:
    """Inside the block, ``model``'s output head computes its logits in float32 (its input and weight
    upcast, autocast off), so metrics that compare logits (candidate ranks) are not decided by 16-bit
    rounding. A float32 head, or a model without one, is left alone."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    if not isinstance(head, nn.Linear) or weight is None or weight.dtype == torch.float32:
        yield
        return

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            bias = head.bias.float() if head.bias is not None else None
            return nn.functional.linear(x.float(), head.weight.float(), bias)

    head.forward = forward
    try:
        yield
    finally:
        del head.forward
