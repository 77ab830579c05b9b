"""Many LoRA adapters trained at once on one frozen base: grid cells that share a base model run as one
model, each cell's adapter acting on its own rows only.

A step's batch holds one row per cell (its texts packed side by side, then padding), so attention stays
within a row as it does alone. The frozen base runs once over every row; the adapters run as one batched
GEMM per group of cells of equal rank:

    x (R, L, in) one row per active cell               y = x W^T + b
    X_g = x[rows_g]                (K_g, L, in)         rows_g: the batch rows of group g's cells
    U_g = s_g * (X_g A_g^T) B_g^T  (K_g, L, out)        A_g (K_g, r_g, in), B_g (K_g, out, r_g)
    y[rows_g] += U_g

No Python loop runs over cells: a group costs two ``bmm`` and one ``index_add_`` whatever its size.
Each cell's factors are slices of its group's tensors, so an elementwise optimizer (Adam) on a group
updates every cell exactly as its own optimizer would. ``only = k`` runs cell k's adapter on every row
(evaluating one cell). Pure torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from factorlab.layers.frozen import transposed_weight


@dataclass
class RowPlan:
    """Which batch row each active cell has: per group, ``rows[g]`` (batch rows) and ``slots[g]`` (the
    cells' places in the group's stacked factors); a group with no active cell has empty tensors."""

    rows: list[torch.Tensor]
    slots: list[torch.Tensor]
    full: bool = False
    """Every cell of the (single) group is active, its rows in order: the one-node fast path applies."""

    @classmethod
    def of(cls, active: list[int], groups: list[list[int]], device=None) -> RowPlan:
        """Active cells (in batch-row order) of cells grouped as ``groups``."""
        row_of = {k: i for i, k in enumerate(active)}
        rows, slots = [], []
        for cells in groups:
            here = [(row_of[k], i) for i, k in enumerate(cells) if k in row_of]
            rows.append(torch.tensor([r for r, _ in here], dtype=torch.long, device=device))
            slots.append(torch.tensor([i for _, i in here], dtype=torch.long, device=device))
        full = len(groups) == 1 and list(active) == list(groups[0])
        return cls(rows, slots, full)


def lora_per_row(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: torch.Tensor, index: torch.Tensor | None
) -> torch.Tensor:
    """LoRA number ``index[n]`` of a stack acts on row n, every row in one batched GEMM pair:

        x (N, L, in), a (K, r, in), b (K, out, r), scaling (K,), index (N,) in [0, K)
        y[n] = scaling[index[n]] * (x[n] A_{index[n]}^T) B_{index[n]}^T        (N, L, out)

    ``index`` None: row n takes LoRA n (N = K), without gathering the factors.

    The one kernel behind packed grid cells (a row per cell) and the LoRA-Mixer's hard routing (a row
    per sample, its task's expert): each row computes only its own adapter, never the others'."""
    if index is not None:
        a, b, scaling = a.index_select(0, index), b.index_select(0, index), scaling.index_select(0, index)
    h = torch.bmm(x.to(a.dtype), a.transpose(1, 2)) * scaling[:, None, None].to(a.dtype)  # (N, L, r)
    return torch.bmm(h, b.transpose(1, 2))


class _PackedLoRA(torch.autograd.Function):
    """``x W^T + b + s * (x A^T) B^T`` per row group in one autograd node, for the common step: one
    group, every cell active, rows in group order (fewer operations than the general path's gather and
    scatter; the same arithmetic):

        out = x W^T + b                 x (K, L, in): one GEMM over all K*L rows
        h   = s * bmm(x, A^T)           (K, L, r)
        out += bmm(h, B^T)
        dL/dB = bmm(g^T, h),  dL/dh = s * bmm(g, B),  dL/dA = bmm(dL/dh^T, x),  dL/dx = g W + bmm(dL/dh, A)
    """

    @staticmethod
    def forward(ctx, x, weight, weight_t, bias, a, b, scaling):  # scaling: (K,) tensor
        rows = x.reshape(-1, x.shape[-1])
        out = torch.addmm(bias, rows, weight_t) if bias is not None else rows @ weight_t
        out = out.view(*x.shape[:-1], weight_t.shape[1])
        h = torch.bmm(x, a.transpose(1, 2)).mul_(scaling[:, None, None])
        out.baddbmm_(h, b.transpose(1, 2))
        ctx.save_for_backward(x, weight, a, b, h, scaling)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, a, b, h, scaling = ctx.saved_tensors
        # Products whose result ends in the small rank are computed transposed: CPU batched GEMMs
        # run them ~4x slower with an output of r columns than of r rows (bench/grid_pack_speed.py)
        grad_h_t = torch.bmm(b.transpose(1, 2), grad.transpose(1, 2)).mul_(
            scaling[:, None, None]
        )  # (K, r, L)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (
                (grad.reshape(-1, grad.shape[-1]) @ weight).view_as(x).baddbmm_(grad_h_t.transpose(1, 2), a)
            )
        grad_a = torch.bmm(grad_h_t, x) if ctx.needs_input_grad[4] else None  # (K, r, in)
        grad_b = None
        if ctx.needs_input_grad[5]:
            grad_b = torch.bmm(h.transpose(1, 2), grad).transpose(1, 2).contiguous()  # (K, out, r)
        return grad_x, None, None, None, grad_a, grad_b, None


class PackedLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus one LoRA adapter per cell, cells grouped by rank (module docstring).

    ``groups``: per group, the cells' indices; ``factors``: per cell, (A (r, in), B (out, r), scaling),
    taken as initial values. The pack sets ``plan`` (a RowPlan) before each training step, or ``only``."""

    def __init__(
        self,
        base_layer: nn.Linear,
        groups: list[list[int]],
        factors: list[tuple[torch.Tensor, torch.Tensor, float]],
    ):
        super().__init__()
        self.base_layer = base_layer
        self.groups = groups
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        scalings = []
        for cells in groups:
            self.A.append(nn.Parameter(torch.stack([factors[k][0].detach() for k in cells]).float()))
            self.B.append(nn.Parameter(torch.stack([factors[k][1].detach() for k in cells]).float()))
            scalings.append(torch.tensor([float(factors[k][2]) for k in cells]))
        for g, scaling in enumerate(scalings):
            self.register_buffer(f"scaling_{g}", scaling, persistent=False)
        self.where = {k: (g, i) for g, cells in enumerate(groups) for i, k in enumerate(cells)}
        self.plan: RowPlan | None = None
        self.only: int | None = None

    def group_parameters(self, g: int) -> list[nn.Parameter]:
        return [self.A[g], self.B[g]]

    def factors(self, cell: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Cell ``cell``'s (A (r, in), B (out, r), scaling) as trained."""
        g, i = self.where[cell]
        return self.A[g][i], self.B[g][i], float(getattr(self, f"scaling_{g}")[i])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.plan
        if self.only is None and plan is not None and plan.full and x.dtype == self.A[0].dtype:
            return self._one_group(x)
        out = self.base_layer(x)
        if self.only is not None:
            a, b, scaling = self.factors(self.only)
            return out + (scaling * (x.to(a.dtype) @ a.T) @ b.T).to(out.dtype)
        if plan is None or x.dim() != 3:
            raise RuntimeError("a packed LoRA layer runs on (rows, length, in) with a RowPlan, or one cell.")
        delta = torch.zeros(out.shape, dtype=self.A[0].dtype, device=out.device)
        for g, (rows, slots) in enumerate(zip(plan.rows, plan.slots)):  # a group per rank: a handful
            if not len(rows):
                continue
            scaling = getattr(self, f"scaling_{g}")
            whole = len(slots) == self.A[g].shape[0]  # slots ascend, so a whole group is in order
            update = lora_per_row(
                x.index_select(0, rows), self.A[g], self.B[g], scaling, None if whole else slots
            )
            delta.index_add_(0, rows, update)  # (K_g, L, out)
        return out + delta.to(out.dtype)

    def _one_group(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        weight_t = transposed_weight(base, x)
        if weight_t is None:
            weight_t = base.weight.detach().T
        return _PackedLoRA.apply(x, base.weight, weight_t, base.bias, self.A[0], self.B[0], self.scaling_0)


# ---- Compacter++ cells ------------------------------------------------------------------------------
#
# A Compacter++ cell adds a PHM bottleneck adapter after each block's FFN and trains every LayerNorm
# (factorlab.methods.compacter). Packed, each adapter's PHM matrices are materialised per cell once a
# step (small: bottleneck x hidden) and applied to the cell's rows as batched GEMMs; each norm keeps one
# copy of its parameters per cell, applied to that cell's rows by one vmapped call.


def phm_weights(rule: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The PHM matrices of a stack of K cells, W_k = sum_i kron(A_ki, s_ki t_ki^T):

    rule (K, n, n, n), s (K, n, out/n, r), t (K, n, in/n, r)  ->  W (K, out, in)"""
    fast = s @ t.transpose(-1, -2)  # (K, n, out/n, in/n): B_ki
    k, n, p, q = fast.shape
    # kron(A, B)[a p + i, b q + j] = A[a, b] B[i, j]
    return torch.einsum("kiab,kipq->kapbq", rule, fast).reshape(k, n * p, n * q)


BOTTLENECK_PARAMETERS = ("down_s", "down_t", "down_bias", "up_s", "up_t", "up_bias")


class PackedBottleneck(nn.Module):
    """A frozen projection, then on each row its own cell's Compacter adapter:

        h = base(x)                                           (R, L, d)
        D_k = phm_weights(A_k, down_s_k, down_t_k)             (b, d)  per cell, its rule A_k shared
        U_k = phm_weights(A_k, up_s_k, up_t_k)                 (d, b)  by all its layers
        y[row of k] = h + act(h D_k^T + down_bias_k) U_k^T + up_bias_k

    ``rules``: per group, the cells' rules (K_g, n, n, n), owned by the pack (one per cell for every
    layer, as Compacter shares it); ``cells``: per cell, its initial values of BOTTLENECK_PARAMETERS."""

    def __init__(
        self,
        base_layer: nn.Module,
        groups: list[list[int]],
        rules: nn.ParameterList,
        cells: list[dict[str, torch.Tensor]],
        act: nn.Module,
    ):
        super().__init__()
        self.base_layer = base_layer
        self.groups = groups
        object.__setattr__(self, "rules", rules)  # referenced, not registered: the pack owns them
        self.act = act
        for name in BOTTLENECK_PARAMETERS:
            stacks = [torch.stack([cells[k][name].detach() for k in group]) for group in groups]
            setattr(self, name, nn.ParameterList(nn.Parameter(s) for s in stacks))
        self.where = {k: (g, i) for g, cells_ in enumerate(groups) for i, k in enumerate(cells_)}
        self.plan: RowPlan | None = None
        self.only: int | None = None

    def group_parameters(self, g: int) -> list[nn.Parameter]:
        return [getattr(self, name)[g] for name in BOTTLENECK_PARAMETERS]

    def weights(self, g: int, slots: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """(D (K, b, d), down bias (K, b), U (K, d, b), up bias (K, d)) of group g's cells ``slots``
        (None: all, in order)."""

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t if slots is None else t.index_select(0, slots)

        rule = pick(self.rules[g])
        down = phm_weights(rule, pick(self.down_s[g]), pick(self.down_t[g]))
        up = phm_weights(rule, pick(self.up_s[g]), pick(self.up_t[g]))
        return down, pick(self.down_bias[g]), up, pick(self.up_bias[g])

    def matrices(self, cell: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cell ``cell``'s materialised down (b, d) and up (d, b) PHM matrices."""
        g, i = self.where[cell]
        down, _, up, _ = self.weights(g, torch.tensor([i], device=self.down_s[g].device))
        return down[0], up[0]

    def _adapter(self, h: torch.Tensor, down, down_bias, up, up_bias) -> torch.Tensor:
        """act(h D^T + c_d) U^T + c_u per row: h (K, L, d), D (K, b, d), U (K, d, b)."""
        u = self.act(torch.baddbmm(down_bias[:, None, :], h, down.transpose(1, 2)))
        return torch.baddbmm(up_bias[:, None, :], u, up.transpose(1, 2))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        h = self.base_layer(x, *args, **kwargs)
        dtype = self.down_bias[0].dtype
        if self.only is not None:
            g, i = self.where[self.only]
            weights = self.weights(g, torch.tensor([i], device=h.device))
            flat = h.reshape(1, -1, h.shape[-1]).to(dtype)
            return h + self._adapter(flat, *weights).view(h.shape).to(h.dtype)
        plan = self.plan
        if plan is None or h.dim() != 3:
            raise RuntimeError("a packed adapter runs on (rows, length, d) with a RowPlan, or one cell.")
        if plan.full:
            return h + self._adapter(h.to(dtype), *self.weights(0, None)).to(h.dtype)
        delta = torch.zeros(h.shape, dtype=dtype, device=h.device)
        for g, (rows, slots) in enumerate(zip(plan.rows, plan.slots)):
            if len(rows):
                rows_h = h.index_select(0, rows).to(dtype)
                delta.index_add_(0, rows, self._adapter(rows_h, *self.weights(g, slots)))
        return h + delta.to(h.dtype)


class PackedCopies(nn.Module):
    """A module trained per cell (Compacter's LayerNorms / RMSNorms): cell k's copy of its parameters
    acts on cell k's rows, each group's rows in one vmapped call of the module itself (so any norm
    class computes exactly its own formula).

    ``states``: per cell, its initial parameters by name (the module's own parameter names)."""

    def __init__(self, module: nn.Module, groups: list[list[int]], states: list[dict[str, torch.Tensor]]):
        super().__init__()
        self.module = module
        self.groups = groups
        self.names = [n for n, _ in module.named_parameters()]
        self.stacks = nn.ModuleList()
        for group in groups:
            stack = nn.ParameterDict()
            for name in self.names:
                key = name.replace(".", "__")
                stack[key] = nn.Parameter(torch.stack([states[k][name].detach() for k in group]))
            self.stacks.append(stack)
        self.where = {k: (g, i) for g, cells in enumerate(groups) for i, k in enumerate(cells)}
        self.plan: RowPlan | None = None
        self.only: int | None = None

    def group_parameters(self, g: int) -> list[nn.Parameter]:
        return list(self.stacks[g].values())

    def state(self, cell: int) -> dict[str, torch.Tensor]:
        g, i = self.where[cell]
        return {name: self.stacks[g][name.replace(".", "__")][i] for name in self.names}

    def _rows(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        def one(p: dict[str, torch.Tensor], row: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(self.module, p, (row,))

        return torch.func.vmap(one)(params, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.only is not None:
            return torch.func.functional_call(self.module, self.state(self.only), (x,))
        plan = self.plan
        if plan is None or x.dim() != 3:
            raise RuntimeError("a packed module runs on (rows, length, d) with a RowPlan, or one cell.")
        if plan.full:
            return self._rows({n: self.stacks[0][n.replace(".", "__")] for n in self.names}, x)
        out = torch.empty_like(x)
        for g, (rows, slots) in enumerate(zip(plan.rows, plan.slots)):
            if len(rows):
                params = {n: self.stacks[g][n.replace(".", "__")].index_select(0, slots) for n in self.names}
                out.index_copy_(0, rows, self._rows(params, x.index_select(0, rows)))
        return out
