"""A trainable tied embedding's gradient accumulated in one buffer that lives across steps.

When a language model's input embedding and output head share one weight (V, d) and that weight
trains (full fine-tuning), autograd builds its gradient from two dense (V, d) tensors a step: the
head's ``g^T x`` and the embedding's zero-filled scatter of a few dozen token rows, then adds them
into a third. On CPU each is a fresh allocation of V x d floats (113 MB for SmolLM2) that the
allocator maps and the kernel faults in page by page, every step. Inside
``tied_embedding_gradient(model)`` both uses of the weight write its gradient themselves:

    head       grad  = g^T x            (V, d), written into the buffer (the first contribution)
    embedding  grad[u] += sum of the token rows of id u     (only the ids of the batch)

so the (V, d) gradient is one buffer reused every step. Its values are those autograd gives: the
token rows of one id are summed in order first, then added to the head's part, as autograd's
zero-filled scatter followed by the sum does (bit-equal in tests/test_tied_gradient.py with AVX-512,
AVX2 and SSE kernels; a full fine-tuning run of SmolLM2 ends with the same weights).
Pure torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


class _TiedGradient:
    """Where the head and the embedding put the shared weight's gradient."""

    def __init__(self, weight: nn.Parameter):
        self.weight = weight
        self.buffer: torch.Tensor | None = None

    def add(self, write: Callable[[torch.Tensor], object], accumulate: Callable[[torch.Tensor], object]):
        """``write(out)`` fills a fresh gradient; ``accumulate(grad)`` adds to an existing one."""
        if self.weight.grad is not None:
            accumulate(self.weight.grad)
            return
        if self.buffer is None or self.buffer.shape != self.weight.shape:
            self.buffer = torch.empty_like(self.weight)
        write(self.buffer)
        self.weight.grad = self.buffer


class _TiedHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, tied):  # x (..., d), weight (V, d)
        ctx.save_for_backward(x, weight)
        ctx.tied = tied
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad):  # grad (..., V)
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (N, V)
        rows = x.reshape(-1, x.shape[-1])  # (N, d)
        ctx.tied.add(lambda out: torch.mm(g.t(), rows, out=out), lambda acc: acc.addmm_(g.t(), rows))
        grad_x = (grad @ weight) if ctx.needs_input_grad[0] else None
        return grad_x, None, None  # the weight's gradient is written above, not returned


class _TiedEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, tied, padding_idx):  # ids (...), weight (V, d)
        ctx.save_for_backward(ids)
        ctx.tied, ctx.padding_idx = tied, padding_idx
        return F.embedding(ids, weight)  # padding_idx acts only on the gradient, handled below

    @staticmethod
    def backward(ctx, grad):  # grad (..., d)
        (ids,) = ctx.saved_tensors
        flat = ids.reshape(-1)
        rows = grad.reshape(-1, grad.shape[-1])  # (N, d)
        if ctx.padding_idx is not None:  # the padding row gets no gradient, as in F.embedding
            keep = flat != ctx.padding_idx
            flat, rows = flat[keep], rows[keep]
        unique, inverse = torch.unique(flat, return_inverse=True)
        # each id's rows summed in token order first, then added once: autograd's order of additions
        summed = rows.new_zeros(len(unique), rows.shape[1]).index_add_(0, inverse, rows)  # (U, d)

        def write(out: torch.Tensor) -> None:
            out.zero_()
            out.index_add_(0, unique, summed)

        ctx.tied.add(write, lambda acc: acc.index_add_(0, unique, summed))
        return None, None, None, None


def _tied_pair(model: nn.Module) -> tuple[nn.Embedding, nn.Linear] | None:
    get_input = getattr(model, "get_input_embeddings", None)
    get_output = getattr(model, "get_output_embeddings", None)
    if not (callable(get_input) and callable(get_output)):
        return None
    embedding, head = get_input(), get_output()
    if type(embedding) is not nn.Embedding or type(head) is not nn.Linear:
        return None
    weight = embedding.weight
    plain_embedding = embedding.max_norm is None and not embedding.scale_grad_by_freq and not embedding.sparse
    if (
        head.weight is not weight
        or head.bias is not None
        or not weight.requires_grad
        or weight.device.type != "cpu"
        or not plain_embedding
        or "forward" in vars(embedding)
        or "forward" in vars(head)
    ):
        return None
    return embedding, head


@contextmanager
def tied_embedding_gradient(model: nn.Module) -> Iterator[bool]:
    """Within the block, a trainable CPU weight shared by ``model``'s input embedding and output head
    (Hugging Face's ``get_input_embeddings`` / ``get_output_embeddings``) gets its gradient in one
    reused buffer (module docstring); yields whether the model has such a weight.

    The buffer is reused: a gradient tensor kept from one step (after ``zero_grad(set_to_none=True)``)
    is overwritten by the next; clone it to keep it. Backward hooks registered on that weight do not
    run inside the block, and the gradient bypasses
    autograd's accumulation, so do not use it under DistributedDataParallel (which reduces gradients
    from those hooks). Other weights, and a frozen or untied embedding, are left to autograd."""
    pair = _tied_pair(model)
    if pair is None:
        yield False
        return
    embedding, head = pair
    weight = embedding.weight
    tied = _TiedGradient(weight)
    head.forward = lambda x: _TiedHead.apply(x, weight, tied)
    embedding.forward = lambda ids: _TiedEmbedding.apply(ids, weight, tied, embedding.padding_idx)
    try:
        yield True
    finally:
        del head.forward
        del embedding.forward
