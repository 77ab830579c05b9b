"""LoraMixerConfig: routed LoRA experts inside projections (LoRA-Mixer, Li et al., 2025).

Choices the paper leaves open, made here and documented:

* Router granularity (``router_granularity``): "projection" (default) gives every adapted
  projection its own router, fed with that projection's input — the most faithful reading of
  per-projection "serial" routing; "layer" shares one router among the projections of a layer
  (they must have the same input width); "shared" uses one router for the whole model.
* Routing loss: ``balance_coef * sum_i pbar_i fbar_i + specialization_coef * mean token entropy``
  — the entropy is ADDED, so minimising the loss makes routing confident (the paper's printed
  minus sign would maximise entropy, against its stated goal); ``preservation_coef * sum
  ||theta - theta_0||^2`` keeps experts near their stage-1 weights (theta_0 is taken when stage 2
  starts, see ``factorlab.methods.lora_mixer.set_stage``).
* A projection an expert does not adapt (plug-and-play experts with different target modules)
  contributes nothing for that expert; routers still score all experts.
* Passing ``task_ids`` to forward/generate routes hard for that call whatever ``routing`` says.
* Ours, not the paper's: ``route_label_coef * CE(router, task label)``. When task labels exist
  (plug-and-play on labelled data), passing ``task_labels`` (one per sample) to forward adds the
  cross-entropy of each sample's mean router probabilities (over its tokens) to its task's expert,
  averaged over the routed projections; the routing itself stays soft. 0 (default): the paper's
  losses only.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from factorlab.core.method import AdapterConfig
from factorlab.errors import ConfigError
from factorlab.layers.mixer import ROUTINGS
from factorlab.validation import check_fields, check_lora_alpha, check_targeting, short

GRANULARITIES = ("projection", "layer", "shared")
MOLE_GATE_BALANCE = 0.01
"""Weight of MoLE's gate balancing loss in ``LoraMixerConfig.mole`` (the paper states none: ours)."""

# The paper gives no beta. Measured on the quick preset (results/mixer-preservation/, 3 seeds; stage 2
# trains experts at the routers' learning rate): without the penalty the experts drift 158% from their
# stage-1 weights and forget their tasks (oracle accuracy 0.32); beta 0.01 drifts 21% (0.80), 0.1 drifts
# 4% (0.92-1.00); beta 1 keeps the drift at 1.2% and every expert at the accuracy of frozen experts
# (0.997 vs 0.998), with top-k accuracy 0.979 (frozen: 0.974). 1 is the smallest of these that never
# cost an expert its task.
PRESERVATION_COEF = 1.0


@dataclass
class ExpertSpec:
    """One expert: its name, rank and alpha, optionally its own targets or a PEFT folder."""

    name: str
    r: int = 8
    lora_alpha: float = 16
    use_rslora: bool = False
    target_modules: list[str] | None = None
    """Projections this expert adapts (names or suffixes); None: all of the mixer's targets."""
    source: str | None = None
    """A PEFT LoRA folder whose weights (and per-module ranks and alphas) this expert takes."""
    modules: dict[str, list[float]] | None = None
    """For a PEFT expert: {module: [rank, scaling]}, recorded when plugged, so a saved mixer (whose
    file holds the weights) loads even after the PEFT folder moved."""


def _expert_spec(index: int, spec: object) -> ExpertSpec:
    if isinstance(spec, ExpertSpec):
        return spec
    if not isinstance(spec, dict):
        raise ConfigError(
            f"experts[{index}] must be an ExpertSpec or a mapping like {{'name': 'math', 'r': 8}}, "
            f"got {short(spec)}."
        )
    known = [f.name for f in dataclasses.fields(ExpertSpec)]
    unknown = sorted(map(str, set(spec) - set(known)))
    if unknown or "name" not in spec:
        problem = f"has unknown field(s) {unknown}" if unknown else "has no 'name'"
        raise ConfigError(f"experts[{index}] {problem}; an expert spec's fields are {known}.")
    return ExpertSpec(**spec)


def _refuse_duplicate_folders(folders: list[str | os.PathLike]) -> None:
    """One folder (or one weights file under two names) given twice would hand a task another task's
    expert without a word."""
    import hashlib

    seen: dict[str, str] = {}
    for folder in folders:
        path = Path(folder).resolve()
        weights = path / "adapter_model.safetensors"
        key = str(path)
        if weights.is_file():
            digest = hashlib.sha256()
            with open(weights, "rb") as file:
                while block := file.read(1 << 22):
                    digest.update(block)
            key = digest.hexdigest()
        if key in seen:
            same = "is given twice" if seen[key] == str(path) else f"holds the same weights as {seen[key]}"
            raise ConfigError(
                f"PEFT expert folder {folder} {same}; every expert must be its own adapter (one folder per "
                "task)."
            )
        seen[key] = str(path)


@dataclass
class LoraMixerConfig(AdapterConfig):
    """LoRA-Mixer. Defaults target the attention input and output projections (Mamba: in_proj,
    out_proj)."""

    method: ClassVar[str] = "lora_mixer"

    num_experts: int = 4
    """Number of experts E (ignored when ``experts`` lists them)."""
    r: int = 8
    """Rank of every expert unless ``experts`` says otherwise."""
    lora_alpha: float = 16
    use_rslora: bool = False
    experts: list[ExpertSpec] | None = None
    """Per-expert specs (names, ranks, targets, PEFT sources)."""
    routing: str = "soft"
    """"hard" (by task_ids), "soft" (dense softmax), "topk" (k largest, renormalised), "uniform" or
    "arrow" (no router: each token's |x . v_e| with v_e expert e's top right singular vector, softmax over
    the top_k; Arrow, as peft's ArrowConfig routes)."""
    top_k: int | None = None
    """Experts kept per token under "topk" routing. None: min(3, E), the paper's K = 3 at inference."""
    temperature: float = 1.0
    """Softmax temperature of the router."""
    router_granularity: str = "projection"
    """"projection", "layer" or "shared" (see the module docstring)."""
    router_pooling: str = "token"
    """"token": a routing per token (the paper). "sample": a gate from the sample's own input, the router
    applied at each position to the running mean of the sample's inputs so far (causal: a decoder's gate
    never sees later tokens), computed once per router and step by the first projection that uses it
    (with ``router_granularity="layer"``: one gate per layer from the block's normalised hidden state,
    MoLE's gate; see ``LoraMixerConfig.mole``)."""
    gate_balance_coef: float = 0.0
    """MoLE's gate balancing loss -sum_i log q_i (q_i: expert i's mean gate); 0: off."""
    balance_coef: float = 0.01
    """alpha of the balance term sum_i pbar_i fbar_i."""
    specialization_coef: float = 0.01
    """lambda of the per-token routing-entropy term (minimised: confident routing)."""
    preservation_coef: float = PRESERVATION_COEF
    """beta of the preservation penalty sum ||theta - theta_0||^2 in stage 2, where the experts keep
    training beside the routers (the paper's stage 2); 0 trains the routers alone. See
    PRESERVATION_COEF for the default's value and why."""
    route_label_coef: float = 0.0
    """Ours: weight of the supervised routing term (needs ``task_labels`` in forward; see above)."""
    freeze_experts: bool = False
    """Train only the routers (plug-and-play with existing LoRA adapters)."""
    init_lora_weights: bool | str = True
    """As LoraConfig: kaiming A and zero B (True), "gaussian", or both random (False, for tests)."""

    def __post_init__(self) -> None:
        if self.experts is not None:
            if not isinstance(self.experts, (list, tuple)):
                raise ConfigError(f"experts must be a list of expert specs, got {short(self.experts)}.")
            self.experts = [_expert_spec(i, e) for i, e in enumerate(self.experts)]
            if not self.experts:
                raise ConfigError("experts is empty; give at least one expert.")
            names = [e.name for e in self.experts]
            if len(set(names)) != len(names):
                raise ConfigError(f"expert names must be unique, got {names}.")
            self.num_experts = len(self.experts)
        check_fields(self)
        check_targeting(self)
        for spec in self.experts or []:
            check_fields(spec)
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ConfigError(f"num_experts must be a positive integer, got {self.num_experts!r}.")
        for spec in self.expert_specs():
            if spec.source is None and (not isinstance(spec.r, int) or spec.r < 1):
                raise ConfigError(f"expert {spec.name!r}: rank r must be a positive integer, got {spec.r!r}.")
            if spec.source is None:
                check_lora_alpha(f"expert {spec.name!r}: lora_alpha", spec.lora_alpha, "e.g. 16")
        if self.routing not in ROUTINGS:
            raise ConfigError(f"routing must be one of {ROUTINGS}, got {self.routing!r}.")
        if self.top_k is None:
            self.top_k = min(3, self.num_experts)
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"top_k must be in 1..num_experts={self.num_experts}, got {self.top_k!r}.")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}.")
        if self.router_granularity not in GRANULARITIES:
            raise ConfigError(
                f"router_granularity must be one of {GRANULARITIES}, got {self.router_granularity!r}."
            )
        if self.router_pooling not in ("token", "sample"):
            raise ConfigError(f"router_pooling must be 'token' or 'sample', got {self.router_pooling!r}.")
        for name in (
            "balance_coef",
            "specialization_coef",
            "preservation_coef",
            "route_label_coef",
            "gate_balance_coef",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}.")

    def expert_specs(self) -> list[ExpertSpec]:
        if self.experts is not None:
            return list(self.experts)
        return [
            ExpertSpec(f"expert_{e}", self.r, self.lora_alpha, self.use_rslora)
            for e in range(self.num_experts)
        ]

    def expert_names(self) -> list[str]:
        return [e.name for e in self.expert_specs()]

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.experts is not None:
            out["experts"] = [dataclasses.asdict(e) for e in self.experts]
        return out

    @classmethod
    def mole(
        cls, folders: list[str | os.PathLike], names: list[str] | None = None, **kwargs: Any
    ) -> LoraMixerConfig:
        """MoLE (Wu et al., 2024, "Mixture of LoRA Experts") over existing PEFT LoRA folders: the LoRAs
        frozen, a learned gate per layer from the block's hidden state (``router_granularity="layer"``,
        ``router_pooling="sample"``), dense softmax, and MoLE's gate balancing loss instead of the
        LoRA-Mixer's routing losses. Only the gates train."""
        settings = dict(
            routing="soft",
            router_granularity="layer",
            router_pooling="sample",
            balance_coef=0.0,
            specialization_coef=0.0,
            gate_balance_coef=MOLE_GATE_BALANCE,
        )
        return cls.from_peft_adapters(folders, names, **{**settings, **kwargs})

    @classmethod
    def from_peft_adapters(
        cls, folders: list[str | os.PathLike], names: list[str] | None = None, **kwargs: Any
    ) -> LoraMixerConfig:
        """Experts from existing PEFT LoRA folders (ranks, alphas and target modules may differ).

        Expert names are ``names`` or the folder names. Only the router trains (``freeze_experts``)
        unless kwargs say otherwise. The weights are read when the config is applied with ``adapt``.
        """
        from factorlab.peft_format import read_peft_lora

        if not folders:
            raise ConfigError("from_peft_adapters needs at least one PEFT LoRA folder.")
        if names is not None and len(names) != len(folders):
            raise ConfigError(f"{len(names)} names for {len(folders)} folders.")
        _refuse_duplicate_folders(folders)
        experts, targets = [], set()
        for i, folder in enumerate(folders):
            lora = read_peft_lora(folder)  # validates: LoRA only, shapes, ranks
            name = names[i] if names else Path(folder).resolve().name
            experts.append(
                ExpertSpec(
                    name=name,
                    r=int(lora.config.get("r", 8)),
                    lora_alpha=lora.config.get("lora_alpha", 8),
                    use_rslora=lora.use_rslora,
                    target_modules=sorted(lora.weights),
                    source=str(Path(folder).resolve()),
                    modules={m: [lora.ranks[m], lora.scaling(m)] for m in sorted(lora.weights)},
                )
            )
            targets |= set(lora.weights)
        kwargs.setdefault("freeze_experts", True)
        kwargs.setdefault("target_modules", sorted(targets))
        return cls(experts=experts, **kwargs)
