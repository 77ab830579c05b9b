"""One-layer, one-head, attention-only transformers for the OCR task, R of them trained as one.

Per run (shapes without the leading run dimension R), as in the paper and its code:

    X          (T, d)   one-hot tokens; embedding and unembedding are the identity, d = vocab size
    a = X W_KQ x_T  (T,) LINEAR attention scores of the last (EOS) token; no softmax, causal, so
                        the last token attends to every position; W_K is fixed to I, so W_KQ = W_Q
    factorized:  logits = W_O W_V^T X^T a     W_O, W_V in R^{d x d_h}
    combined:    logits = W_OV X^T a          W_OV in R^{d x d}

There is no positional encoding, MLP, residual or LayerNorm. Both parametrisations express the
same functions (for d_h = d); they differ only in what gradient descent prefers.

Because X is one-hot, ``x_T W`` is a row lookup and ``X^T a`` a scatter-add of scores into token
slots, so the batched forward costs O(B T + B d d_h) per run instead of O(B T d^2).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from factorlab.errors import ConfigError
from factorlab.runtime import generator

PARAMETRIZATIONS = ("factorized", "combined")
INITS = ("default", "identity")


class BatchedAttentionOnly(nn.Module):
    """R independent attention-only models with identical shapes, one per seed.

    Args:
        vocab_size: d, the one-hot width.
        param: "factorized" (W_O W_V^T) or "combined" (W_OV).
        d_h: inner dimension of the factorized output-value product (ignored when combined).
        seeds: one seed per run; each run's initial weights depend on its seed only.
        init: "default" (every weight N(0, 1/d)) or "identity" (the paper's small init:
            W_KQ = W_O = 1e-4 * ones, W_V = 1e-4 * I when d_h = d, else 1e-4 * ones).
        attention_tokens: if given, attention is FIXED (W_KQ frozen) so that the last token gives
            score 1 to these token ids and 0 to every other token, as in the paper's Theorem 1.
    """

    def __init__(
        self,
        vocab_size: int,
        param: str,
        d_h: int,
        seeds: list[int],
        init: str = "default",
        attention_tokens: torch.Tensor | None = None,
    ):
        super().__init__()
        if param not in PARAMETRIZATIONS:
            raise ConfigError(f"param must be one of {PARAMETRIZATIONS}, got {param!r}.")
        if init not in INITS:
            raise ConfigError(f"init must be one of {INITS}, got {init!r}.")
        if d_h < 1:
            raise ConfigError(f"d_h must be >= 1 (the inner dimension of W_O W_V^T), got {d_h}.")
        self.vocab_size, self.param, self.d_h, self.init = vocab_size, param, d_h, init
        self.seeds = list(seeds)
        d, R = vocab_size, len(self.seeds)
        std = 1 / math.sqrt(d)

        def draw(shape: tuple[int, ...], stream: str) -> torch.Tensor:
            return torch.stack([torch.randn(shape, generator=generator(s, stream)) * std for s in self.seeds])

        if attention_tokens is not None:
            w_kq = torch.zeros(R, d, d)
            w_kq[:, attention_tokens, :] = 1.0  # score_t = W_KQ[tok_t, tok_T] = 1 on those tokens
            self.register_buffer("w_kq", w_kq)
        elif init == "default":
            self.w_kq = nn.Parameter(draw((d, d), "init/w_kq"))
        else:
            self.w_kq = nn.Parameter(torch.full((R, d, d), 1e-4))

        if param == "factorized":
            if init == "default":
                self.w_o = nn.Parameter(draw((d, d_h), "init/w_o"))
                self.w_v = nn.Parameter(draw((d, d_h), "init/w_v"))
            else:
                self.w_o = nn.Parameter(torch.full((R, d, d_h), 1e-4))
                w_v = torch.eye(d) if d_h == d else torch.ones(d, d_h)
                self.w_v = nn.Parameter(1e-4 * w_v.expand(R, d, d_h).clone())
        elif init == "default":
            self.w_ov = nn.Parameter(draw((d, d), "init/w_ov"))
        else:
            self.w_ov = nn.Parameter(torch.full((R, d, d), 1e-4))

    @property
    def num_runs(self) -> int:
        return len(self.seeds)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (R, B, T) -> logits (R, B, d) at the last position."""
        R, B, _ = tokens.shape
        runs = torch.arange(R).unsqueeze(1)
        query = self.w_kq.transpose(1, 2)[runs, tokens[:, :, -1]]  # (R, B, d): W_KQ x_T
        scores = query.gather(2, tokens)  # (R, B, T): a_t = x_t^T W_KQ x_T
        bag = torch.zeros(R, B, self.vocab_size, dtype=scores.dtype).scatter_add(2, tokens, scores)  # X^T a
        if self.param == "factorized":
            return torch.bmm(torch.bmm(bag, self.w_v), self.w_o.transpose(1, 2))  # W_O W_V^T X^T a
        return torch.bmm(bag, self.w_ov.transpose(1, 2))  # W_OV X^T a

    @torch.no_grad()
    def loss_and_grads(
        self, tokens: torch.Tensor, labels: torch.Tensor, kq_column: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One training step's work without autograd: each run's mean cross-entropy (R,) and, in every
        trainable parameter's ``.grad``, the gradient of their sum. The same operations as ``forward``
        and its backward, written out, so a step is a few dozen kernels and no graph.

            scores a[r,b,t] = W_KQ[r, x_t, x_T]          bag = X^T a  (scatter-add, (R, B, d))
            factorized: h = bag W_V, logits = h W_O^T     combined: logits = bag W_OV^T
            g = (softmax(logits) - onehot(label)) / B     (dL/dlogits)
            dW_O = g^T h, dh = g W_O, dW_V = bag^T dh, dbag = dh W_V^T   (combined: dW_OV = g^T bag,
            dbag = g W_OV); da[r,b,t] = dbag[r,b,x_t]; dW_KQ[r, x_t, x_T] += da[r,b,t]

        ``kq_column`` (R, d): when every sequence ends with the same token q (the task's EOS), a step
        reads and differentiates only the column W_KQ[:, :, q]. Pass a leaf tensor holding that column:
        the scores come from it and its ``.grad`` receives dW_KQ[:, :, q]; ``w_kq`` itself is neither
        read nor given a gradient (the rest of dW_KQ is zero). The caller checks the last tokens.
        """
        R, B, T = tokens.shape
        d = self.vocab_size
        if kq_column is not None:
            flat_tokens = tokens.reshape(R, B * T)
            scores = kq_column.gather(1, flat_tokens).view(R, B, T)
        else:
            last = tokens[:, :, -1:]  # (R, B, 1)
            kq_index = torch.arange(R).view(R, 1, 1) * (d * d) + tokens * d + last  # flat W_KQ[r, x_t, x_T]
            scores = self.w_kq.reshape(-1)[kq_index]  # (R, B, T)
        bag = torch.zeros(R, B, d, dtype=scores.dtype).scatter_add_(2, tokens, scores)
        if self.param == "factorized":
            h = torch.bmm(bag, self.w_v)  # (R, B, d_h)
            logits = torch.bmm(h, self.w_o.transpose(1, 2))
        else:
            logits = torch.bmm(bag, self.w_ov.transpose(1, 2))
        # Softmax written out (ATen's is slow at this width) and the loss from the log-sum-exp, which
        # stays finite where a probability underflows; g becomes dL/dlogits in place.
        label_index = labels.unsqueeze(-1)  # (R, B, 1)
        shifted = logits.sub_(logits.amax(-1, keepdim=True))
        label_logit = shifted.gather(2, label_index)
        g = shifted.exp_()
        total = g.sum(-1, keepdim=True)
        per_run = (total.log() - label_logit).squeeze(-1).mean(1)
        g.mul_(total.mul_(B).reciprocal_())
        g.scatter_add_(2, label_index, torch.full((R, B, 1), -1.0 / B, dtype=g.dtype))
        if self.param == "factorized":
            self.w_o.grad = torch.bmm(g.transpose(1, 2), h)
            dh = torch.bmm(g, self.w_o)
            self.w_v.grad = torch.bmm(bag.transpose(1, 2), dh)
            dbag = torch.bmm(dh, self.w_v.transpose(1, 2))
        else:
            self.w_ov.grad = torch.bmm(g.transpose(1, 2), bag)
            dbag = torch.bmm(g, self.w_ov)
        if kq_column is not None:
            dscores = dbag.gather(2, tokens).view(R, B * T)
            kq_column.grad = torch.zeros_like(kq_column).scatter_add_(1, flat_tokens, dscores)
        elif self.w_kq.requires_grad:
            dscores = dbag.gather(2, tokens)
            grad = torch.zeros(R * d * d, dtype=dscores.dtype).index_add_(
                0, kq_index.flatten(), dscores.flatten()
            )
            self.w_kq.grad = grad.view(R, d, d)
        return per_run

    def effective_w_ov(self) -> torch.Tensor:
        """The output-value matrix each run computes with, (R, d, d)."""
        if self.param == "factorized":
            return self.w_o @ self.w_v.transpose(1, 2)
        return self.w_ov
