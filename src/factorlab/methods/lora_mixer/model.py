"""How LoRA-Mixer is injected, trained in stages, and inspected."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path

import torch
from torch import nn

from factorlab.core.method import Method
from factorlab.errors import ConfigError, TargetError
from factorlab.layers.lora import adapter_dtype
from factorlab.layers.mixer import (
    ROUTINGS,
    ExpertBank,
    LoRAMixerLinear,
    RoutingState,
    gate_balance_loss,
    init_router,
    routing_aux_loss,
    routing_label_loss,
)
from factorlab.layers.shapes import is_conv1d, layer_index, linear_dims
from factorlab.methods.lora_mixer.config import LoraMixerConfig
from factorlab.validation import short

STAGES = ("experts", "router", "all")


class MixerShared(nn.Module):
    """What all mixer layers of one adapter share: routers (layer / shared granularity) and the
    routing context. Also computes the adapter's auxiliary loss."""

    def __init__(self, config: LoraMixerConfig):
        super().__init__()
        self.routers = nn.ModuleDict()
        self.routing = RoutingState(
            config.num_experts,
            config.routing,
            config.top_k,
            config.temperature,
            pooling=config.router_pooling,
        )
        self.expert_names = config.expert_names()
        self.coefs = (
            config.balance_coef,
            config.specialization_coef,
            config.preservation_coef,
            config.route_label_coef,
            config.gate_balance_coef,
        )
        self.train_router = True
        # PEFT experts read once per adapt() by build_shared, for every layer of this adapter; read
        # afresh on the next adapt(), so a folder changed in between is never served from memory.
        self.plugged: dict[str, object] = {}

    def trainable_parameters(self):
        """The shared routers, while the routers train (the method's ``shared_trainable_parameters``)."""
        return self.routers.parameters() if self.train_router else iter(())

    # -- called by AdaptedModel around every forward / generate ---------------------------------
    def begin_forward(
        self,
        task_ids: torch.Tensor | None,
        record: bool,
        task_labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> None:
        two_d = torch.is_tensor(attention_mask) and attention_mask.dim() == 2
        self.routing.token_mask = attention_mask if two_d else None
        self.routing.task_labels = (
            self._check_ids(task_labels, "task_labels") if task_labels is not None else None
        )
        if task_ids is not None:
            task_ids = self._check_ids(task_ids, "task_ids")
        self.routing.task_ids = task_ids
        self.routing.record = record or task_labels is not None
        self.routing.clear()

    def _check_ids(self, task_ids, what: str) -> torch.Tensor:
        if not torch.is_tensor(task_ids):
            items = list(task_ids) if isinstance(task_ids, (list, tuple)) else None
            if items is None or not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
                raise ConfigError(
                    f"{what} must be a 1-D integer tensor or a list of ints (one id per sample), got "
                    f"{short(task_ids)}; e.g. torch.tensor([0, 2])."
                )
            try:
                task_ids = torch.tensor(items, dtype=torch.long)
            except (OverflowError, RuntimeError, ValueError):
                raise ConfigError(f"{what}: {short(items)} holds ids too large for int64.") from None
        if task_ids.dtype not in (torch.int64, torch.int32) or task_ids.dim() != 1:
            raise ConfigError(
                f"{what} must be a 1-D integer tensor (one id per sample), got "
                f"{task_ids.dtype} of shape {tuple(task_ids.shape)}."
            )
        E = self.routing.num_experts
        bad = task_ids[(task_ids < 0) | (task_ids >= E)]
        if len(bad):
            raise ConfigError(
                f"task id {int(bad[0])} is outside 0..{E - 1} ({what}); this adapter's experts are "
                f"{dict(enumerate(self.expert_names))}."
            )
        return task_ids.long()

    def end_forward(self) -> None:
        self.routing.task_ids = None  # labels stay until the next call: extra_loss reads them

    def extra_loss(self, layers: list[LoRAMixerLinear], adapter_name: str) -> torch.Tensor:
        balance, specialization, preservation, route_label, gate_balance = self.coefs
        loss = routing_aux_loss(self.routing, balance, specialization)
        if gate_balance > 0:
            loss = loss + gate_balance * gate_balance_loss(self.routing)
        if route_label > 0:
            loss = loss + route_label * routing_label_loss(self.routing)
        if preservation > 0:
            loss = loss + preservation * sum(layer.experts[adapter_name].preservation() for layer in layers)
        return loss


def _peft(path: str):
    from factorlab.peft_format import read_peft_lora

    return read_peft_lora(path)


@dataclass
class _RecordedExpert:
    """A plugged expert whose PEFT folder is gone, rebuilt from its recorded per-module table; the
    adapter file being loaded supplies the weights."""

    ranks: dict[str, int]
    scalings: dict[str, float]
    weights: dict = dataclass_field(default_factory=dict)

    def scaling(self, module: str) -> float:
        return self.scalings[module]


def _expert_source(spec, loading: bool):
    """The PEFT expert's weights and shapes: from its folder, or (while an adapter file is being
    loaded) from the table recorded when it was plugged."""
    if Path(spec.source, "adapter_model.safetensors").exists():
        return _peft(spec.source)
    if spec.modules is not None and loading:
        return _RecordedExpert(
            {m: int(r) for m, (r, _) in spec.modules.items()},
            {m: float(c) for m, (_, c) in spec.modules.items()},
        )
    raise ConfigError(
        f"expert {spec.name!r}: its PEFT folder {spec.source} is missing. Plugging needs the folder; a "
        "saved mixer loads without it (AdaptedModel.from_pretrained) when it was saved by this version."
    )


def _matches(name: str, patterns: list[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def build_shared(
    base: nn.Module, config: LoraMixerConfig, targets: dict[str, nn.Module], loading: bool
) -> MixerShared:
    shared = MixerShared(config)
    E = config.num_experts
    names = list(targets)
    widths = {name: (linear_dims(module)[0], module.weight) for name, module in targets.items()}
    groups: dict[str, list[str]] = {}
    if config.router_granularity == "layer":
        for name in names:
            groups.setdefault(str(layer_index(name)), []).append(name)
    elif config.router_granularity == "shared":
        groups["all"] = list(names)
    for key, members in groups.items():
        sizes = {widths[n][0] for n in members}
        if len(sizes) > 1:
            raise ConfigError(
                f"router_granularity={config.router_granularity!r} shares one router among projections with "
                f"different input widths {sorted(sizes)} ({members[:3]}...); use "
                "router_granularity='projection'."
            )
        weight = widths[members[0]][1]
        router = nn.Linear(sizes.pop(), E, device=weight.device, dtype=adapter_dtype(weight))
        init_router(router)
        shared.routers[key] = router
    # An expert that adapts nothing would still take routing weight: an expert in name only.
    for spec in config.expert_specs():
        if (
            spec.source is None
            and spec.target_modules is not None
            and not any(_matches(n, spec.target_modules) for n in names)
        ):
            raise TargetError(
                f"expert {spec.name!r}: its target_modules {short(spec.target_modules)} match none of "
                f"this mixer's {len(names)} projections (e.g. {names[:3]}); name some of them (a name or "
                "the end of one after a dot), or drop target_modules to adapt them all."
            )
    # Check every PEFT expert against the model before anything is injected.
    for spec in config.expert_specs():
        if spec.source is not None:
            lora = shared.plugged[spec.name] = _expert_source(spec, loading)
            modules = lora.ranks
            outside = sorted(set(modules) - set(widths))
            if outside:
                raise ConfigError(
                    f"expert {spec.name!r} ({spec.source}) adapts {len(outside)} module(s) that this mixer "
                    f"does not target (e.g. {outside[:3]}); they would be dropped. Either the adapter comes "
                    "from a model with other modules (another depth), or target_modules must include them."
                )
            for module, (a, b) in lora.weights.items():
                in_f, out_f = linear_dims(targets[module])
                if a.shape[1] != in_f or b.shape[0] != out_f:
                    raise ConfigError(
                        f"expert {spec.name!r} ({spec.source}) has LoRA shapes A {tuple(a.shape)}, B "
                        f"{tuple(b.shape)} at {module}, which is a {in_f} -> {out_f} projection here: the "
                        "adapter was trained for a different model."
                    )
    return shared


def build_mixer_layer(
    target: nn.Module,
    config: LoraMixerConfig,
    adapter_name: str,
    module_name: str,
    existing: LoRAMixerLinear | None,
    shared: MixerShared | None = None,
) -> LoRAMixerLinear:
    layer = existing if existing is not None else LoRAMixerLinear(target, fan_in_fan_out=is_conv1d(target))
    ranks, scalings, sources = [], [], []
    for spec in config.expert_specs():
        if spec.source is not None:
            lora = shared.plugged[spec.name]
            present = module_name in lora.ranks
            ranks.append(lora.ranks[module_name] if present else 0)
            scalings.append(lora.scaling(module_name) if present else 0.0)
            sources.append(lora.weights.pop(module_name, None))  # copied into the bank: no second copy kept
        else:
            present = spec.target_modules is None or _matches(module_name, spec.target_modules)
            ranks.append(spec.r if present else 0)
            scalings.append(spec.lora_alpha / (math.sqrt(spec.r) if spec.use_rslora else spec.r))
            sources.append(None)
    weight = target.weight
    bank = ExpertBank(
        layer.in_features,
        layer.out_features,
        ranks,
        scalings,
        config.init_lora_weights,
        device=weight.device,
        dtype=adapter_dtype(weight),
    )
    for e, ab in enumerate(sources):
        if ab is not None:  # PEFT's A (r, in), B (out, r); for Conv1D "in" is weight.shape[0], as here
            bank.set_expert(e, *ab)
    if config.router_granularity == "projection":
        router = None
    else:
        key = "all" if config.router_granularity == "shared" else str(layer_index(module_name))
        router = shared.routers[key]
    layer.update_layer(adapter_name, bank, shared.routing, router)
    if config.freeze_experts:
        layer.trainable_parts[adapter_name] = {"router"}
    return layer


def default_mixer_roles(family: str | None) -> tuple[str, ...]:
    if family in ("mamba", "falcon_mamba"):
        return ("ssm_in", "ssm_out")
    return ("attn_q", "attn_k", "attn_v", "attn_out")


@contextlib.contextmanager
def mixer_forward(adapted, adapter_name: str, kwargs: dict, record: bool):
    """Around one forward / generate: hard-route by ``task_ids`` if given, record routing when asked,
    and yield the routing loss of this call (computed when called, once)."""
    shared = adapted.shared_adapter_weights[adapter_name]
    shared.begin_forward(
        kwargs.pop("task_ids", None), record, kwargs.pop("task_labels", None), kwargs.get("attention_mask")
    )
    try:
        yield lambda: shared.extra_loss(mixer_layers(adapted, adapter_name), adapter_name)
    finally:
        shared.end_forward()


LORA_MIXER = Method(
    "lora_mixer",
    LoraMixerConfig,
    LoRAMixerLinear,
    build_mixer_layer,
    default_mixer_roles,
    label="LoRA-Mixer",
    build_shared=build_shared,
    shared_trainable_parameters=MixerShared.trainable_parameters,
    not_combinable_hint="a LoRA-Mixer routes between its own experts: put them in one LoraMixerConfig "
    "(from_peft_adapters() plugs existing LoRA folders in)",
    forward_keywords=("task_ids", "task_labels"),
    forward_context=mixer_forward,
    param_kinds=((".experts.", "LoRA-Mixer experts (A, B)"), ("router", "LoRA-Mixer routers")),
)


# ---- stages and inspection ------------------------------------------------------------------------


def mixer_layers(adapted, adapter_name: str | None = None) -> list[LoRAMixerLinear]:
    name = adapter_name or adapted.active_adapter
    return [
        m for _, m in adapted.adapter_layers() if isinstance(m, LoRAMixerLinear) and name in m.adapter_names
    ]


def _mixer_adapter(adapted, adapter_name: str | None) -> str:
    """The adapter a mixer function acts on (default: the active one), refused unless it is a mixer."""
    name = adapter_name or adapted.active_adapter
    shared = dict(adapted.shared_adapter_weights.items())  # nn.ModuleDict has no .get
    if not isinstance(shared.get(name), MixerShared):
        mixers = sorted(n for n, s in shared.items() if isinstance(s, MixerShared))
        raise ConfigError(
            f"adapter {name!r} is not a LoRA-Mixer adapter; this model's mixer adapters: {mixers}."
        )
    return name


def set_stage(adapted, stage: str, adapter_name: str | None = None) -> None:
    """Choose what trains: "experts" (stage 1, hard routing), "router" (stage 2 / plug-and-play),
    or "all" (stage 2 with lightly tuned experts; theta_0 for the preservation penalty is taken now)."""
    if stage not in STAGES:
        raise ConfigError(f"stage must be one of {STAGES}, got {stage!r}.")
    name = _mixer_adapter(adapted, adapter_name)
    parts = {"experts": {"experts"}, "router": {"router"}, "all": {"experts", "router"}}[stage]
    for layer in mixer_layers(adapted, name):
        layer.trainable_parts[name] = set(parts)
        if stage == "all":
            layer.experts[name].snapshot()
    adapted.shared_adapter_weights[name].train_router = "router" in parts
    adapted.refresh_trainable()


def set_routing(
    adapted,
    routing: str,
    adapter_name: str | None = None,
    top_k: int | None = None,
    temperature: float | None = None,
) -> None:
    """Choose how the mixer routes from now on: "soft", "topk", "hard" (needs task_ids), "uniform"
    (the average-of-experts baseline) or "arrow" (training-free, from the experts' own weights);
    optionally a new top_k or router temperature."""
    if routing not in ROUTINGS:
        raise ConfigError(f"routing must be one of {ROUTINGS}, got {routing!r}.")
    name = _mixer_adapter(adapted, adapter_name)
    state = adapted.shared_adapter_weights[name].routing
    if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k <= state.num_experts):
        raise ConfigError(f"top_k must be an integer in 1..{state.num_experts}, got {top_k!r}.")
    if temperature is not None and not (
        isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0
    ):
        raise ConfigError(f"temperature must be a finite number > 0, got {temperature!r}.")
    state.routing = routing
    state.top_k = top_k if top_k is not None else state.top_k
    state.temperature = float(temperature) if temperature is not None else state.temperature


@torch.no_grad()
def routing_weights_per_sample(adapted, batch: dict, adapter_name: str | None = None) -> torch.Tensor:
    """Mean routing weight per expert for each sample of ``batch`` (averaged over its real tokens, where
    ``batch["attention_mask"]`` is 1, and over projections), (batch, E). Uses the adapter's routing (no
    task ids)."""
    name = _mixer_adapter(adapted, adapter_name)
    shared = adapted.shared_adapter_weights[name]
    shared.begin_forward(None, record=True)
    try:
        adapted.get_base_model()(**batch)
    finally:
        shared.end_forward()
    mask = batch.get("attention_mask")
    per_call = []
    for _probs, weights, tokens in shared.routing.records:
        weights = weights.view(-1, tokens, weights.shape[-1])
        if torch.is_tensor(mask) and mask.shape == weights.shape[:2]:
            real = mask.to(weights.dtype).unsqueeze(-1)  # padding would pull samples to its route
            per_call.append((weights * real).sum(1) / real.sum(1).clamp_min(1))
        else:
            per_call.append(weights.mean(1))
    shared.routing.clear()
    return torch.stack(per_call).mean(0)


def export_expert_as_peft(adapted, expert: int, path, adapter_name: str | None = None):
    """Write expert ``expert`` alone as a standard PEFT LoRA folder (deployable without factorlab)."""
    from factorlab.peft_format import write_peft_lora

    name = _mixer_adapter(adapted, adapter_name)
    config = adapted.adapter_configs[name]
    if isinstance(expert, bool) or not isinstance(expert, int) or not 0 <= expert < config.num_experts:
        raise ConfigError(
            f"expert must be an index in 0..{config.num_experts - 1} (the adapter's experts: "
            f"{config.expert_names()}), got {expert!r}."
        )
    modules = {}
    for module, layer in adapted.adapter_layers():
        if not isinstance(layer, LoRAMixerLinear) or name not in layer.adapter_names:
            continue
        bank = layer.experts[name]
        r = int(bank.rank_mask[expert].sum().item())
        if r == 0:
            continue
        # alpha such that alpha / r reproduces the expert's scaling (rsLoRA folded into alpha)
        alpha = float(bank.scaling[expert]) * r
        modules[module] = (
            bank.A[expert, :r].detach(),
            bank.B[expert, :, :r].detach(),
            alpha,
            layer.fan_in_fan_out,
        )
    if not modules:
        raise ConfigError(f"expert {expert} adapts no projection.")
    return write_peft_lora(path, modules, adapted.get_base_model())
