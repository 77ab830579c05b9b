"""Frozen linear layers read row-major in both GEMMs while training on CPU.

A frozen ``nn.Linear`` (the base layer under LoRA or Compacter, a tied output head) costs two GEMMs
a training step: the forward ``x @ W.T`` and the input gradient ``grad @ W``. On CPU the first reads
``W`` transposed, which MKL runs markedly slower at the few rows a fine-tuning batch has (64 rows,
AVX-512, one thread: ~120 GFLOP/s against ~160 for the same product with ``W^T`` contiguous;
bench/inject_cell_speed.py). Inside ``transposed_frozen_weights(model)`` each such layer multiplies
by a contiguous copy of ``W^T`` in the forward and by ``W`` in the backward:

    forward   y = x W^T + b          x (M, in), W^T copy (in, out)
    backward  dL/dx = dL/dy W        W (out, in)

and a LoRA layer on such a base runs as one autograd node (``lora_on_frozen``):

    h = s x A^T                      (M, r)
    y = x W^T + b + h B^T            (M, out)
    dL/dB = g^T h,  dL/dh = g B,  dL/dA = s (dL/dh)^T x,  dL/dx = g W + s (dL/dh) A

The copy costs one extra copy of those weights while the block runs; results equal ``F.linear``'s
(and LoRA's module-by-module path) up to float rounding. Pure torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _base_product(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None):
    """``x W^T + b`` as (output (..., out), the same memory as (M, out)). The output is allocated
    whole and the GEMM writes into it: a custom Function returning a view of its own result would
    forbid callers from adding to it in place (LoRA-Mixer and X-LoRA layers do)."""
    rows = x.reshape(-1, x.shape[-1])  # (M, in)
    out = x.new_empty(*x.shape[:-1], weight_t.shape[1])
    flat = out.view(-1, weight_t.shape[1])
    if bias is None:
        torch.mm(rows, weight_t, out=flat)
    else:
        torch.addmm(bias, rows, weight_t, out=flat)
    return out, flat, rows


class _FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, weight_t, bias):  # x (..., in), weight (out, in), weight_t (in, out)
        ctx.save_for_backward(weight)
        return _base_product(x, weight_t, bias)[0]

    @staticmethod
    def backward(ctx, grad):  # grad (..., out)
        (weight,) = ctx.saved_tensors
        return grad @ weight if ctx.needs_input_grad[0] else None, None, None, None


class _LoRAOnFrozen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, weight_t, bias, lora_a, lora_b, scaling: float):
        out, flat, rows = _base_product(x, weight_t, bias)  # (..., out), (M, out), (M, in)
        h = torch.mm(rows, lora_a.t()).mul_(scaling)  # (M, r)
        flat.addmm_(h, lora_b.t())  # in place: the update accumulated into the base GEMM's output
        ctx.save_for_backward(rows, weight, lora_a, lora_b, h)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx, grad):  # grad (..., out)
        rows, weight, lora_a, lora_b, h = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (M, out)
        grad_h = torch.mm(g, lora_b).mul_(ctx.scaling)  # (M, r): dL/d(x A^T)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g, weight).addmm_(grad_h, lora_a).view(*grad.shape[:-1], rows.shape[1])
        grad_a = torch.mm(grad_h.t(), rows) if ctx.needs_input_grad[4] else None  # (r, in)
        grad_b = torch.mm(g.t(), h) if ctx.needs_input_grad[5] else None  # (out, r)
        return grad_x, None, None, None, grad_a, grad_b, None


class _TransposedForward:
    """The forward a frozen ``nn.Linear`` has inside ``transposed_frozen_weights``."""

    def __init__(self, module: nn.Linear, original, copies: dict):
        self.module, self.original, self.copies = module, original, copies

    def weight_t(self, x: torch.Tensor) -> torch.Tensor | None:
        """The contiguous ``W^T`` for input ``x``, or None where the plain path must run (the layer
        trains again, or ``x`` has another dtype or device)."""
        weight, bias = self.module.weight, self.module.bias
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            return None
        if x.dtype != weight.dtype or x.device != weight.device:
            return None
        # the entry holds the weight itself, so no other tensor can take its id while cached; its
        # storage and version: an in-place change or a new ``.data`` (as merging does) makes a new copy
        state = (weight.data_ptr(), weight._version, weight.shape)
        cached = self.copies.get(id(weight))
        if cached is None or cached[1] != state:
            cached = self.copies[id(weight)] = (weight, state, weight.detach().T.contiguous())
        return cached[2]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight_t = self.weight_t(x)
        if weight_t is None:
            return self.original(x)
        return _FrozenLinear.apply(x, self.module.weight, weight_t, self.module.bias)


def transposed_weight(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``layer``'s contiguous ``W^T`` for input ``x`` inside ``transposed_frozen_weights``, else None."""
    forward = vars(layer).get("forward")
    return forward.weight_t(x) if isinstance(forward, _TransposedForward) else None


def lora_on_frozen(
    x: torch.Tensor,
    base: nn.Linear,
    weight_t: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """``base(x) + scaling * x A^T B^T`` as one autograd node; ``weight_t`` from ``transposed_weight``."""
    return _LoRAOnFrozen.apply(x, base.weight, weight_t, base.bias, lora_a, lora_b, scaling)


@contextmanager
def transposed_frozen_weights(model: nn.Module) -> Iterator[int]:
    """Within the block, every ``nn.Linear`` of ``model`` with a frozen float32 CPU weight runs
    through a transposed copy of its weight (module docstring); yields how many layers that covers.
    Modules, state dicts and parameters are untouched; the copies are dropped on exit."""
    copies: dict[int, tuple] = {}
    patched = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (
            type(module) is nn.Linear
            and "forward" not in vars(module)
            and weight.device.type == "cpu"
            and weight.dtype == torch.float32
            and not weight.requires_grad
        ):
            module.forward = _TransposedForward(module, module.forward, copies)
            patched.append(module)
    try:
        yield len(patched)
    finally:
        for module in patched:
            del module.forward
        copies.clear()
