"""Injection cells that share a base model, trained as one model (factorlab.layers.packed): LoRA cells
of any ranks, or Compacter++ cells.

Each cell keeps what it has alone: its world and data order, its adapter's initialisation (drawn as
``fine_tune`` draws it: the cell's seed, then the method on a copy of the base), its learning rate and
its optimizer state (Adam is elementwise, so one Adam over a group's stacked weights is each cell's own
Adam). What changes is the arithmetic's grouping: every step the base runs once over all cells' rows,
and the loss is the sum of each cell's own mean loss, so each adapter's gradient is its cell's alone.
Cells are grouped by (rank, learning rate, steps): a group trains, and stops, together.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
from torch import nn

from factorlab.core.surgery import replace_submodule
from factorlab.errors import ConfigError, TrainingDivergedError
from factorlab.inject.backends import Backend
from factorlab.inject.spectrum import dense_singular_values, lora_singular_values
from factorlab.inject.train import FineTuneSettings, batches, prepare
from factorlab.inject.world import World
from factorlab.layers.bottleneck import BottleneckAdapterLayer
from factorlab.layers.frozen import transposed_frozen_weights
from factorlab.layers.modules_to_save import ModulesToSave
from factorlab.layers.packed import (
    BOTTLENECK_PARAMETERS,
    PackedBottleneck,
    PackedCopies,
    PackedLoRALinear,
    RowPlan,
)
from factorlab.training import logits_at, packs_sequences


@dataclass
class Member:
    """One cell of a pack."""

    world: World
    settings: FineTuneSettings


PACKED_METHODS = ("lora", "compacter++")


def packable(settings: FineTuneSettings) -> bool:
    """Cells that can share a pack: LoRA or Compacter++ in float32 on one process (the rest train
    alone); a pack holds one method."""
    return settings.method in PACKED_METHODS and settings.precision == "float32" and not settings.fsdp


PACKED_LAYERS = (PackedLoRALinear, PackedBottleneck, PackedCopies)


class Pack(nn.Module):
    """The base model with each adapted module carrying one adapter per member: LoRA on every linear
    layer (the head aside, as ``prepare`` adapts them), or Compacter++'s bottleneck adapters and trained
    norms. ``select(k)`` makes the model cell k's alone (for its evaluation)."""

    def __init__(self, backend: Backend, members: list[Member]):
        super().__init__()
        methods = {m.settings.method for m in members}
        if len(methods) != 1 or not all(packable(m.settings) for m in members):
            raise ConfigError(
                f"a pack holds cells of one method among {PACKED_METHODS} in float32 on one process; got "
                f"{sorted(methods)}. Train the others alone (--pack 1)."
            )
        self.method = methods.pop()
        self.members = members
        keys = []
        for m in members:
            lr, epochs, batch = m.settings.resolved(backend)
            keys.append((m.settings.r if self.method == "lora" else None, lr, epochs, batch))
        self.groups = [[k for k, key in enumerate(keys) if key == g] for g in dict.fromkeys(keys)]
        self.lrs = [keys[cells[0]][1] for cells in self.groups]
        model = copy.deepcopy(backend.model)
        for p in model.parameters():
            p.requires_grad_(False)
        self.rules = nn.ParameterList()  # Compacter: per group, each cell's rule shared by its layers
        initial = [_initial_weights(backend, m.settings) for m in members]
        for name, (kind, _) in initial[0]["modules"].items():
            module = model.get_submodule(name)
            values = [init["modules"][name][1] for init in initial]
            if kind == "lora":
                layer = PackedLoRALinear(module, self.groups, values)
            elif kind == "bottleneck":
                act = initial[0]["activations"][name]
                layer = PackedBottleneck(module, self.groups, self.rules, values, act)
            else:
                layer = PackedCopies(module, self.groups, values)
            replace_submodule(model, name, layer)
        if self.method == "compacter++":
            for cells in self.groups:
                self.rules.append(nn.Parameter(torch.stack([initial[k]["rule"] for k in cells])))
        self.model = model
        self.layers = [m for m in model.modules() if isinstance(m, PACKED_LAYERS)]

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

    def set_plan(self, plan: RowPlan | None) -> None:
        for layer in self.layers:
            layer.plan = plan

    def group_parameters(self, g: int) -> list[nn.Parameter]:
        """Every trained weight of group g's cells (stacked: one tensor holds the group's cells)."""
        params = [self.rules[g]] if self.method == "compacter++" else []
        for layer in self.layers:
            params += layer.group_parameters(g)
        return params

    def factors(self, cell: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """Cell ``cell``'s trained LoRA factors (A, B, scaling) by module name."""
        out = {}
        for name, layer in self.model.named_modules():
            if isinstance(layer, PackedLoRALinear):
                a, b, scaling = layer.factors(cell)
                out[name] = (a.detach(), b.detach(), scaling)
        return out

    def weights(self, cell: int) -> dict[str, torch.Tensor]:
        """Every trained weight of cell ``cell`` by "<module>.<name>": LoRA's A and B; Compacter's
        ``rule``, each adapter's BOTTLENECK_PARAMETERS and each norm's own parameters."""
        out = {}
        if self.method == "compacter++":
            g, i = self.layers[0].where[cell]
            out["rule"] = self.rules[g][i].detach()
        for name, layer in self.model.named_modules():
            if isinstance(layer, PackedLoRALinear):
                a, b, _ = layer.factors(cell)
                out |= {f"{name}.A": a.detach(), f"{name}.B": b.detach()}
            elif isinstance(layer, PackedBottleneck):
                g, i = layer.where[cell]
                out |= {f"{name}.{p}": getattr(layer, p)[g][i].detach() for p in BOTTLENECK_PARAMETERS}
            elif isinstance(layer, PackedCopies):
                out |= {f"{name}.{p}": v.detach() for p, v in layer.state(cell).items()}
        return out

    def spectra(self, cell: int) -> list[tuple[str, torch.Tensor]]:
        """(weight name, singular values) of cell ``cell``'s update, as factorlab.inject.spectrum
        names them alone: LoRA's from its factors, Compacter's from its materialised PHM matrices."""
        if self.method == "lora":
            return [(name, lora_singular_values(a, b, s)) for name, (a, b, s) in self.factors(cell).items()]
        out = []
        with torch.no_grad():
            for name, layer in self.model.named_modules():
                if isinstance(layer, PackedBottleneck):
                    down, up = layer.matrices(cell)
                    out.append((f"{name}.adapter_down.adapter", dense_singular_values(down)))
                    out.append((f"{name}.adapter_up.adapter", dense_singular_values(up)))
        return out


def _initial_weights(backend: Backend, settings: FineTuneSettings) -> dict:
    """The cell's adapter initialisation, drawn exactly as ``fine_tune`` draws it alone:
    {"modules": {name: (kind, initial values)}, "rule": Compacter's shared rule, "activations"}."""
    torch.manual_seed(settings.seed)
    alone = prepare(backend.model, settings.method, settings.r, settings.lora_alpha)
    modules: dict[str, tuple] = {}
    out: dict = {"modules": modules, "activations": {}}
    for name, layer in alone.adapter_layers():
        if settings.method == "lora":
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            modules[name] = ("lora", (a.detach().clone(), b.detach().clone(), layer.scaling["default"]))
        elif isinstance(layer, BottleneckAdapterLayer):
            down, up = layer.adapter_down["default"], layer.adapter_up["default"]
            for phm in (down, up):
                shape_ok = not phm.rule.factorized and phm.fast.factorized and phm.bias is not None
                if phm._shared_rule is None or not shape_ok:
                    raise ConfigError(
                        f"{name}: packing needs Compacter++ as inject prepares it (one shared rule, "
                        "rank-r fast weights, biases); train this cell alone (--pack 1)."
                    )
            out["rule"] = down.rule().detach().clone()
            values = {
                "down_s": down.fast.s, "down_t": down.fast.t, "down_bias": down.bias,
                "up_s": up.fast.s, "up_t": up.fast.t, "up_bias": up.bias,
            }  # fmt: skip
            modules[name] = ("bottleneck", {k: v.detach().clone() for k, v in values.items()})
            out["activations"][name] = copy.deepcopy(layer.adapter_act["default"])
        elif isinstance(layer, ModulesToSave):
            trained = layer.modules_to_save["default"]
            modules[name] = ("copies", {k: v.detach().clone() for k, v in trained.named_parameters()})
        else:
            raise ConfigError(f"{name}: a {type(layer).__name__} cannot be packed; train these cells alone.")
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
        torch.optim.Adam(pack.group_parameters(g), lr=lr, fused=True) for g, lr in enumerate(pack.lrs)
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
    pack.set_plan(None)
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
    pack.set_plan(RowPlan.of(active, pack.groups, device=device))
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
