"""PHM layers (parameterized hypercomplex multiplication), the building block of Compacter.

    y = W x + b,   W = sum_{i=1..n} A_i ⊗ B_i  in R^{out x in}

    A_i  (n, n)           the "slow" rule; Compacter shares one rule across every layer of a model
    B_i  (out/n, in/n)    the "fast" weights; Compacter factorizes them as B_i = s_i t_i^T,
                          s_i (out/n, r), t_i (in/n, r), rank r = 1 by default

The forward never forms W. With x split into n blocks x_j of size in/n, output block p is

    y_p = sum_i sum_j A_i[p, j] s_i t_i^T x_j

The rule is folded into the factor on the smaller side (s for a down-projection, t for an
up-projection), so a token costs n r max(in, out) + n^2 r min(in, out) multiply-adds instead of the
in * out of the dense matmul that the original code and AdapterHub run after materialising W.
``PHMLinear.weight`` materialises W for reference and export.

Pure torch, no transformers import. Conventions: torch's (out, in) weight layout; initialisation
names are AdapterHub's.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from factorlab.errors import ConfigError

RULE_INITS = ("normal", "uniform")
FAST_INITS = ("glorot-uniform", "glorot-normal", "normal")


def _divisors(value: int) -> list[int]:
    return [k for k in range(1, value + 1) if value % k == 0]


def check_phm_dim(phm_dim: int, dims: dict[str, int]) -> None:
    """phm_dim must divide every named dimension; the error lists the values that would work."""
    if not isinstance(phm_dim, int) or phm_dim < 1:
        raise ConfigError(f"phm_dim must be a positive integer, got {phm_dim!r}.")
    bad = {name: d for name, d in dims.items() if d % phm_dim}
    if bad:
        common = sorted(set.intersection(*(set(_divisors(d)) for d in dims.values())))
        shown = ", ".join(f"{name}={d}" for name, d in bad.items())
        raise ConfigError(
            f"phm_dim={phm_dim} does not divide {shown}; the Kronecker structure needs n to divide every "
            f"dimension ({', '.join(f'{k}={v}' for k, v in dims.items())}). Values that work: {common}."
        )


class PHMRule(nn.Module):
    """The n rule matrices A_i, stacked (n, n, n); optionally rank-one A_i = a_i b_i^T.

    ``init``: "normal" draws N(0, init_range^2), "uniform" U(-init_range, init_range); the paper's
    Compacter uses normal with 1e-4, so a fresh adapter starts near the identity map.
    ``learn=False`` stores the rule as a buffer: saved and loaded, but no optimiser can change it.
    """

    def __init__(
        self,
        n: int,
        factorized: bool = False,
        init: str = "normal",
        init_range: float = 1e-4,
        learn: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if init not in RULE_INITS:
            raise ConfigError(f"phm_c_init must be one of {RULE_INITS}, got {init!r}.")
        self.n, self.factorized = n, factorized
        shapes = {"A_left": (n, n, 1), "A_right": (n, 1, n)} if factorized else {"A": (n, n, n)}
        for name, shape in shapes.items():
            tensor = torch.empty(shape, device=device, dtype=dtype)
            if init == "normal":
                nn.init.normal_(tensor, std=init_range)
            else:
                nn.init.uniform_(tensor, -init_range, init_range)
            if learn:
                self.register_parameter(name, nn.Parameter(tensor))
            else:
                self.register_buffer(name, tensor)

    def forward(self) -> torch.Tensor:
        """(n, n, n): A[i] is the i-th rule matrix."""
        return self.A_left @ self.A_right if self.factorized else self.A


class PHMFastWeights(nn.Module):
    """The n fast matrices B_i (out/n, in/n): factorized s_i t_i^T of rank ``rank``, or full (rank None).

    ``init`` (AdapterHub's ``hypercomplex_nonlinearity``): "glorot-uniform" / "glorot-normal" per
    matrix with gain sqrt(2) as in the original Compacter code, or "normal" N(0, init_range^2).
    """

    def __init__(
        self,
        n: int,
        out_per_axis: int,
        in_per_axis: int,
        rank: int | None = 1,
        init: str = "glorot-uniform",
        init_range: float = 1e-4,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if init not in FAST_INITS:
            raise ConfigError(f"hypercomplex_nonlinearity must be one of {FAST_INITS}, got {init!r}.")
        if rank is not None and (not isinstance(rank, int) or rank < 1):
            raise ConfigError(f"phm_rank must be a positive integer, got {rank!r}.")
        self.n, self.out_per_axis, self.in_per_axis, self.rank = n, out_per_axis, in_per_axis, rank
        factory = {"device": device, "dtype": dtype}
        if rank is None:
            self.B = nn.Parameter(torch.empty(n, out_per_axis, in_per_axis, **factory))
            matrices = [self.B]
        else:
            self.s = nn.Parameter(torch.empty(n, out_per_axis, rank, **factory))
            self.t = nn.Parameter(torch.empty(n, in_per_axis, rank, **factory))
            matrices = [self.s, self.t]
        with torch.no_grad():
            for m in matrices:
                for i in range(n):
                    if init == "glorot-uniform":
                        nn.init.xavier_uniform_(m[i], gain=math.sqrt(2))
                    elif init == "glorot-normal":
                        nn.init.xavier_normal_(m[i], gain=math.sqrt(2))
                    else:
                        nn.init.normal_(m[i], std=init_range)

    @property
    def factorized(self) -> bool:
        return self.rank is not None

    def matrices(self) -> torch.Tensor:
        """(n, out/n, in/n): B_i, materialised (reference and export only)."""
        return self.s @ self.t.transpose(1, 2) if self.factorized else self.B


class PHMLinear(nn.Module):
    """y = (sum_i A_i ⊗ B_i) x + b without forming the (out, in) matrix.

    Args:
        in_features, out_features: layer sizes; ``phm_dim`` (n) must divide both.
        phm_dim: number n of Kronecker terms.
        phm_rank: rank r of each factorized B_i = s_i t_i^T; None for full B_i.
        bias: add a bias (initialised to zero).
        rule: a PHMRule shared with other layers (owned and saved elsewhere); None creates this
            layer's own rule.
        fast: PHMFastWeights shared with other layers; None creates this layer's own.
        rule_init, rule_init_range, learn_rule: options of an own rule (see PHMRule).
        fast_init, fast_init_range: options of own fast weights (see PHMFastWeights).
        factorized_rule: own rule with rank-one A_i.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        phm_dim: int,
        phm_rank: int | None = 1,
        bias: bool = True,
        rule: PHMRule | None = None,
        fast: PHMFastWeights | None = None,
        rule_init: str = "normal",
        rule_init_range: float = 1e-4,
        learn_rule: bool = True,
        factorized_rule: bool = False,
        fast_init: str = "glorot-uniform",
        fast_init_range: float = 1e-4,
        device=None,
        dtype=None,
    ):
        super().__init__()
        check_phm_dim(phm_dim, {"in_features": in_features, "out_features": out_features})
        self.in_features, self.out_features, self.phm_dim = in_features, out_features, phm_dim
        n = phm_dim
        factory = {"device": device, "dtype": dtype}
        # Shared modules are referenced, not registered: their owner saves them once.
        if rule is None:
            self.own_rule = PHMRule(n, factorized_rule, rule_init, rule_init_range, learn_rule, **factory)
        elif rule.n != n:
            raise ConfigError(f"the shared rule has n={rule.n} but this layer has phm_dim={n}.")
        object.__setattr__(self, "_shared_rule", rule)
        if fast is None:
            self.own_fast = PHMFastWeights(
                n, out_features // n, in_features // n, phm_rank, fast_init, fast_init_range, **factory
            )
        elif (fast.n, fast.out_per_axis, fast.in_per_axis) != (n, out_features // n, in_features // n):
            raise ConfigError(
                f"the shared fast weights are for a {fast.n * fast.in_per_axis} -> "
                f"{fast.n * fast.out_per_axis} layer, not {in_features} -> {out_features}; shared_W_phm "
                "needs every adapter to have the same sizes."
            )
        object.__setattr__(self, "_shared_fast", fast)
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None

    @property
    def rule(self) -> PHMRule:
        return self._shared_rule if self._shared_rule is not None else self.own_rule

    @property
    def fast(self) -> PHMFastWeights:
        return self._shared_fast if self._shared_fast is not None else self.own_fast

    @property
    def weight(self) -> torch.Tensor:
        """The materialised (out, in) matrix sum_i kron(A_i, B_i)."""
        a, b = self.rule(), self.fast.matrices()
        return sum(torch.kron(a[i], b[i]) for i in range(self.phm_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, lead = self.phm_dim, x.shape[:-1]
        d_in, d_out = self.in_features // n, self.out_features // n
        a = self.rule().to(x.dtype)  # (n_i, n_p, n_j): A_i[p, j]
        blocks = x.reshape(-1, n, d_in)  # x_j: (N, n_j, in/n), a view
        fast = self.fast
        if fast.factorized and d_out <= d_in:
            # Down-projection: one GEMM over the (large) input computes t_i^T x_j for every i, j; the
            # rule and s are folded into one small (n*n*r, out) matrix, applied with the bias fused.
            r = fast.rank
            tx = blocks @ fast.t.permute(1, 0, 2).reshape(d_in, n * r)  # (N, n_j, n_i * r)
            fold = torch.einsum("ipj,ikr->jirpk", a, fast.s).reshape(n * n * r, n * d_out)
            y = tx.reshape(-1, n * n * r) @ fold
            y = y + self.bias if self.bias is not None else y
        elif fast.factorized:
            # Up-projection: the rule and t are folded into one small (in, n*n*r) matrix; one GEMM to the
            # (large) output then applies s_i per output block p.
            r = fast.rank
            fold = torch.einsum("ipj,idr->jdpir", a, fast.t).reshape(n * d_in, n * n * r)
            mixed = (blocks.reshape(-1, n * d_in) @ fold).view(-1, n, n * r)  # (N, n_p, n_i * r)
            y = self._output_gemm(mixed, fast.s.permute(0, 2, 1).reshape(n * r, d_out))
        elif d_in <= d_out:
            # mix first (the smaller side): v[:, p, i] = sum_j A_i[p, j] x_j, then y_p = sum_i B_i v[:, p, i]
            v = torch.einsum("ipj,njd->npid", a, blocks).reshape(-1, n, n * d_in)
            y = self._output_gemm(v, fast.B.permute(0, 2, 1).reshape(n * d_in, d_out))
        else:
            # B_i x_j for all i at once, then mix: y_p = sum_{i,j} A_i[p, j] B_i x_j
            bx = blocks @ fast.B.permute(2, 0, 1).reshape(d_in, n * d_out)  # (N, n_j, n_i * out/n)
            y = torch.einsum("ipj,njik->npk", a, bx.view(-1, n, n, d_out))
            if self.bias is not None:
                y = y + self.bias.view(n, d_out)
        return y.reshape(*lead, self.out_features)

    def _output_gemm(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """y[:, p] = h[:, p] @ w + bias_p, with the bias folded into the GEMM.

        The bias differs per output block p, so it rides along as n one-hot columns of h and n extra
        rows of w: the output (the large tensor of an up-projection) is written and read once,
        instead of once more for a separate bias add and once more for the bias gradient.
        """
        if self.bias is None:
            return h @ w
        n = self.phm_dim
        one_hot = torch.eye(n, dtype=h.dtype, device=h.device).expand(h.shape[0], n, n)
        return torch.cat([h, one_hot], dim=-1) @ torch.cat([w, self.bias.view(n, -1)])

    def extra_repr(self) -> str:
        shared = [k for k, v in (("rule", self._shared_rule), ("fast", self._shared_fast)) if v is not None]
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, phm_dim={self.phm_dim}, "
            f"rank={self.fast.rank}, shared={shared or 'none'}"
        )
