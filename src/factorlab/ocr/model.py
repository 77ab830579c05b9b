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
# The training step's softmax raises logits more than 50 below their row's max to max - 50 before exp.
# exp(-50) ~ 2e-22 is below float32 resolution next to the max's exp(0) = 1, so the normaliser and every
# probability stay the same to within 2e-22 (the loss uses the exact label logit). Without it, long runs
# whose weights grow (small d_h) spend most of a step in ATen's exp, ~50x slower below -87, and in
# GEMMs on the subnormal probabilities it returns.
LOGIT_FLOOR = -50.0
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
    def loss_and_grads(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One training step's work without autograd: each run's mean cross-entropy (R,) and, in every
        trainable parameter's ``.grad``, the gradient of their sum. Every sequence must end with the
        same token q (the task's EOS); see ``attention_step``, which this runs on whole weights."""
        q = int(tokens[0, 0, -1])
        if not bool((tokens[:, :, -1] == q).all()):
            raise ValueError("loss_and_grads needs every sequence to end with the same (query) token.")
        kq = self.w_kq[:, :, q]
        if self.w_kq.requires_grad:
            kq = kq.clone().requires_grad_(True)
        weights = {"w_o": self.w_o, "w_v": self.w_v} if self.param == "factorized" else {"w_ov": self.w_ov}
        per_run = attention_step(tokens, labels, kq, **weights)
        if self.w_kq.requires_grad:
            self.w_kq.grad = torch.zeros_like(self.w_kq)
            self.w_kq.grad[:, :, q] = kq.grad
        return per_run

    def effective_w_ov(self) -> torch.Tensor:
        """The output-value matrix each run computes with, (R, d, d)."""
        if self.param == "factorized":
            return self.w_o @ self.w_v.transpose(1, 2)
        return self.w_ov


@torch.no_grad()
def attention_step(
    tokens: torch.Tensor,
    labels: torch.Tensor,
    kq: torch.Tensor,
    w_o: torch.Tensor | None = None,
    w_v: torch.Tensor | None = None,
    w_ov: torch.Tensor | None = None,
) -> torch.Tensor:
    """A training step of R runs by hand, on the slices of the weights the data can reach: each run's
    mean cross-entropy (R,), and the gradient of their sum in the ``.grad`` of every weight that
    requires one. The same operations as ``BatchedAttentionOnly.forward`` and its backward, written
    out, so a step is a few dozen kernels and no graph.

    Every sequence ends with the query token q, and its other tokens come from n "input" tokens (the
    task's answers never appear in a sequence); ``tokens`` (R, B, T) hold input numbers 0..n-1 and
    ``labels`` (R, B) vocabulary ids. The weights: ``kq`` (R, n) = W_KQ[:, inputs, q]; factorized
    ``w_v`` (R, n, d_h) = W_V[:, inputs], ``w_o`` (R, d, d_h); combined ``w_ov`` (R, d, n) =
    W_OV[:, :, inputs]. The rest of each weight gets no gradient. With inputs = the whole vocabulary
    these are the whole W_V and W_OV.

        scores a[r,b,t] = kq[r, x_t]                  bag = X^T a  (scatter-add, (R, B, n))
        factorized: h = bag W_V, logits = h W_O^T     combined: logits = bag W_OV^T
        g = (softmax(logits) - onehot(label)) / B     (dL/dlogits)
        dW_O = g^T h, dh = g W_O, dW_V = bag^T dh, dbag = dh W_V^T   (combined: dW_OV = g^T bag,
        dbag = g W_OV); da[r,b,t] = dbag[r,b,x_t]; dkq[r, x_t] += da[r,b,t]

    For large d_h the factorized step goes through the product instead (``through_product``):
    W_OV = W_O W_V^T, logits = bag W_OV^T, dW_OV = g^T bag, dW_O = dW_OV W_V, dW_V = dW_OV^T W_O,
    dbag = g W_OV. The same gradients, associated differently.
    """
    R, B, T = tokens.shape
    n = kq.shape[1]
    flat_tokens = tokens.reshape(R, B * T)
    scores = kq.gather(1, flat_tokens).view(R, B, T)
    bag = torch.zeros(R, B, n, dtype=scores.dtype).scatter_add_(2, tokens, scores)
    product = w_ov is None and through_product(B, w_o.shape[1], n, w_o.shape[2])
    if product:  # W_O W_V^T formed first: fewer FLOPs when d_h is large (see through_product)
        w_ov = torch.bmm(w_o, w_v.transpose(1, 2))  # (R, d, n)
    if w_ov is None:
        h = torch.bmm(bag, w_v)  # (R, B, d_h)
        logits = torch.bmm(h, w_o.transpose(1, 2))
    else:
        logits = torch.bmm(bag, w_ov.transpose(1, 2))
    # Softmax written out (ATen's is slow at this width) and the loss from the log-sum-exp, which
    # stays finite where a probability underflows; g becomes dL/dlogits in place. Logits more than
    # -LOGIT_FLOOR below the row's max are raised to it before exp (see LOGIT_FLOOR).
    label_index = labels.unsqueeze(-1)  # (R, B, 1)
    shifted = logits.sub_(logits.amax(-1, keepdim=True))
    label_logit = shifted.gather(2, label_index)
    g = shifted.clamp_(min=LOGIT_FLOOR).exp_()
    label_exp = g.gather(2, label_index)
    others = g.scatter_(2, label_index, 0.0).sum(-1, keepdim=True)  # the exps of the wrong answers
    total = others + label_exp
    per_run = (total.log() - label_logit).squeeze(-1).mean(1)
    scale = total.mul_(B).reciprocal_()
    g.mul_(scale).scatter_(2, label_index, others.mul_(scale).neg_())  # p_label - 1 = -others / total
    if product:
        d_ov = torch.bmm(g.transpose(1, 2), bag)  # (R, d, n)
        w_o.grad = torch.bmm(d_ov, w_v)
        w_v.grad = torch.bmm(d_ov.transpose(1, 2), w_o)
        dbag = torch.bmm(g, w_ov)
    elif w_ov is None:
        w_o.grad = torch.bmm(g.transpose(1, 2), h)
        dh = torch.bmm(g, w_o)
        w_v.grad = torch.bmm(bag.transpose(1, 2), dh)
        dbag = torch.bmm(dh, w_v.transpose(1, 2))
    else:
        w_ov.grad = torch.bmm(g.transpose(1, 2), bag)
        dbag = torch.bmm(g, w_ov)
    if kq.requires_grad:
        dscores = dbag.gather(2, tokens).view(R, B * T)
        kq.grad = torch.zeros_like(kq).scatter_add_(1, flat_tokens, dscores)
    return per_run


def through_product(batch: int, d: int, n: int, d_h: int) -> bool:
    """Whether a factorized step costs fewer FLOPs through W_O W_V^T (d x n) than through h = bag W_V:
    6 d n (d_h + B) against 6 B d_h (n + d) per run. At the defaults (B = 252, d = 128, n = 88) only
    d_h = 128 goes through the product (38% fewer FLOPs); d_h = 64 is a tie (2% apart), kept on h."""
    return d * n * (d_h + batch) < batch * d_h * (n + d)
