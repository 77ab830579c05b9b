"""LoRA injection cells that share a base model, trained as one model (factorlab.layers.packed).

Each cell keeps what it has alone: its world and data order, its adapter's initialisation (drawn as
``fine_tune`` draws it: the cell's seed, then LoRA on every linear layer of a copy of the base), its
learning rate and its optimizer state (Adam is elementwise, so one Adam over a group's stacked factors
is each cell's own Adam). What changes is the arithmetic's grouping: every step the base runs once
over all cells' rows, and the loss is the sum of each cell's own mean loss, so each adapter's gradient
is its cell's alone. Cells are grouped by (rank, learning rate, steps): a group trains, and stops,
together.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
from torch import nn

from factorlab.core.surgery import replace_submodule
from factorlab.errors import TrainingDivergedError
from factorlab.inject.backends import Backend
from factorlab.inject.train import FineTuneSettings, batches, prepare
from factorlab.inject.world import World
from factorlab.layers.frozen import transposed_frozen_weights
from factorlab.layers.packed import PackedLoRALinear, RowPlan
from factorlab.training import logits_at, packs_sequences


@dataclass
class Member:
    """One cell of a pack."""

    world: World
    settings: FineTuneSettings


def packable(settings: FineTuneSettings) -> bool:
    """Cells that can share a pack: LoRA in float32 on one process (the rest train alone)."""
    return settings.method == "lora" and settings.precision == "float32" and not settings.fsdp


class Pack(nn.Module):
    """The base model with every linear layer (the head aside, as ``prepare`` adapts them) carrying one
    LoRA adapter per member. ``select(k)`` makes the model cell k's alone (for its evaluation)."""

    def __init__(self, backend: Backend, members: list[Member]):
        super().__init__()
        self.members = members
        keys = []
        for m in members:
            lr, epochs, batch = m.settings.resolved(backend)
            keys.append((m.settings.r, lr, epochs, batch))
        self.groups = [[k for k, key in enumerate(keys) if key == g] for g in dict.fromkeys(keys)]
        self.lrs = [keys[cells[0]][1] for cells in self.groups]
        factors = [_initial_factors(backend, m.settings) for m in members]
        model = copy.deepcopy(backend.model)
        for p in model.parameters():
            p.requires_grad_(False)
        for name in factors[0]:
            layer = PackedLoRALinear(model.get_submodule(name), self.groups, [f[name] for f in factors])
            replace_submodule(model, name, layer)
        self.model = model
        self.layers = [m for m in model.modules() if isinstance(m, PackedLoRALinear)]

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    @property
    def config(self):
        return self.model.config

    def select(self, cell: int | None) -> None:
        for layer in self.layers:
            layer.only = cell

    def factors(self, cell: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """Cell ``cell``'s trained LoRA factors (A, B, scaling) by module name."""
        out = {}
        for name, layer in self.model.named_modules():
            if isinstance(layer, PackedLoRALinear):
                a, b, scaling = layer.factors(cell)
                out[name] = (a.detach(), b.detach(), scaling)
        return out


def _initial_factors(backend: Backend, settings: FineTuneSettings) -> dict[str, tuple]:
    """The cell's LoRA initialisation, drawn exactly as ``fine_tune`` draws it alone."""
    torch.manual_seed(settings.seed)
    alone = prepare(backend.model, "lora", settings.r, settings.lora_alpha)
    out = {}
    for name, layer in alone.adapter_layers():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        out[name] = (a.detach().clone(), b.detach().clone(), layer.scaling["default"])
    return out


def fine_tune_packed(
    backend: Backend,
    members: list[Member],
    progress: Callable[[int], None] | None = None,
    on_finished: Callable[[int, Pack, list[float]], None] | None = None,
    watch: Callable[[int, int, Pack], None] | None = None,
    watch_steps: list[Collection[int]] | None = None,
) -> tuple[Pack, list[list[float]]]:
    """Train every member's LoRA adapter together; returns the pack and each member's losses.
    ``on_finished(k, pack, losses)`` runs as member k takes its last step, and ``watch(k, step, pack)``
    after each step of ``watch_steps[k]`` (steps done): the pack in eval mode with cell k selected,
    gradients off; training resumes after it."""
    pack = Pack(backend, members)
    device = next(backend.model.parameters()).device
    packed_rows = packs_sequences(backend.model, backend.model.get_input_embeddings().num_embeddings)
    plans = [batches(backend, m.world, m.settings, packed_rows, device) for m in members]
    steps = [n for _, n in plans]
    optimizers = [
        torch.optim.Adam(
            [layer.A[g] for layer in pack.layers] + [layer.B[g] for layer in pack.layers], lr=lr, fused=True
        )
        for g, lr in enumerate(pack.lrs)
    ]
    losses: list[list[float]] = [[] for _ in members]
    with transposed_frozen_weights(pack.model):
        for step in range(max(steps)):
            pack.train()
            active = [k for k in range(len(members)) if step < steps[k]]
            loss, per_cell = _step_loss(pack, [plans[k][0](step) for k in active], active)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for g, opt in enumerate(optimizers):
                if any(k in active for k in pack.groups[g]):
                    opt.step()
            for k, value in zip(active, per_cell):
                if not math.isfinite(value):
                    raise TrainingDivergedError(
                        f"non-finite loss at step {step} (cell {k}); lower the learning rate."
                    )
                losses[k].append(value)
            if progress is not None:
                progress(step + 1)
            for k in active:
                if watch is not None and watch_steps is not None and step + 1 in watch_steps[k]:
                    _finish(pack, k, step + 1, lambda k_, pack_, step_: watch(k_, step_, pack_))
                if step + 1 == steps[k] and on_finished is not None:
                    _finish(pack, k, losses[k], on_finished)
    pack.eval()
    for layer in pack.layers:
        layer.plan = None
    return pack, losses


def _finish(pack: Pack, k: int, argument, call: Callable) -> None:
    """``call(k, pack, argument)`` with cell k selected, in eval mode, without gradients."""
    pack.eval()
    pack.select(k)
    try:
        with torch.no_grad():
            call(k, pack, argument)
    finally:
        pack.select(None)


def _step_loss(pack: Pack, batches_: list, active: list[int]) -> tuple[torch.Tensor, list[float]]:
    """One forward of every active cell's batch, a row each: (sum of the cells' mean losses, each cell's
    mean loss). A cell's row is its packed texts, then padding that forms a text of its own (positions
    from 0, no labels), so no cell's text ever attends to another's."""
    inputs = [b[0] for b in batches_]
    labels = [b[1] for b in batches_]
    length = max(int(x["input_ids"].shape[1]) for x in inputs)
    device = inputs[0]["input_ids"].device
    ids = torch.zeros(len(active), length, dtype=torch.long, device=device)
    positions = torch.zeros_like(ids)
    target = torch.full_like(ids, -100)
    for i, (x, y) in enumerate(zip(inputs, labels)):  # per cell once a step, not per module
        n = x["input_ids"].shape[1]
        ids[i, :n], positions[i, :n], target[i, :n] = x["input_ids"][0], x["position_ids"][0], y[0]
        positions[i, n:] = torch.arange(length - n, device=device)
    plan = RowPlan.of(active, pack.groups, device=device)
    for layer in pack.layers:
        layer.plan = plan
    targets = target[:, 1:]
    predicts = targets != -100
    keep = torch.zeros_like(target, dtype=torch.bool)
    keep[:, :-1] = predicts
    logits = logits_at(pack, pack.model, keep, input_ids=ids, position_ids=positions, use_cache=False)
    token_loss = -torch.log_softmax(logits.float(), dim=-1).gather(1, targets[predicts][:, None]).squeeze(1)
    row = torch.arange(len(active), device=device)[:, None].expand_as(predicts)[predicts]
    sums = torch.zeros(len(active), device=device).index_add(0, row, token_loss)
    means = sums / predicts.sum(1).clamp_min(1)
    return means.sum(), means.detach().tolist()
