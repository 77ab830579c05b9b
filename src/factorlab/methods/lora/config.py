"""LoraConfig: PEFT's field names and defaults, so configs move between the two unchanged."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from factorlab.core.method import AdapterConfig
from factorlab.errors import ConfigError
from factorlab.layers.lora import LORA_INITS
from factorlab.layers.shapes import LAYER_PATTERNS
from factorlab.peft_format import pattern_value
from factorlab.validation import check_fields, check_lora_alpha, check_regex, check_targeting


@dataclass
class LoraConfig(AdapterConfig):
    """Low-rank adaptation. Defaults are PEFT's."""

    method: ClassVar[str] = "lora"

    r: int = 8
    """Rank of the update B A."""
    lora_alpha: float = 8
    """Scale numerator: the update is multiplied by lora_alpha / r (or / sqrt(r) with use_rslora)."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input."""
    use_rslora: bool = False
    """Rank-stabilised scaling lora_alpha / sqrt(r)."""
    init_lora_weights: bool | str = True
    """True / "kaiming": kaiming-uniform A, zero B (starts as the base model); "gaussian": N(0, 1/r) A,
    zero B; False: both random (the adapter changes the output from the start; for tests)."""
    fan_in_fan_out: bool | None = None
    """Weight stored (in, out), as GPT-2's Conv1D. None detects it per module."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module ranks: {name pattern: r}, matched against the end of the module name."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alphas, same matching."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """PEFT's bias training: "all" trains every bias of the model, "lora_only" those of the adapted
    layers. As in PEFT they train in place (disable/delete/unload do not restore them) and are saved
    with the adapter."""
    use_dora: bool = False
    """DoRA (Liu et al., 2024): the weight is a trainable per-output magnitude m times the direction of
    W + s B A, i.e. W' = m * (W + s B A) / ||W + s B A|| (row norms, treated as constants in backward)."""
    base_model_name_or_path: str | None = None
    """Kept for PEFT round trips; not used to load anything."""
    revision: str | None = None
    """Kept for PEFT round trips; not used to load anything."""
    # PEFT LoRA options factorlab does not implement: accepted at their "off" value, refused otherwise.
    layers_pattern: Any = field(default=None, repr=False)
    layer_replication: Any = field(default=None, repr=False)
    target_parameters: Any = field(default=None, repr=False)
    lora_bias: bool = field(default=False, repr=False)
    loftq_config: Any = field(default_factory=dict, repr=False)
    eva_config: Any = field(default=None, repr=False)
    corda_config: Any = field(default=None, repr=False)
    use_qalora: bool = field(default=False, repr=False)
    alora_invocation_tokens: Any = field(default=None, repr=False)
    arrow_config: Any = field(default=None, repr=False)
    trainable_token_indices: Any = field(default=None, repr=False)
    megatron_config: Any = field(default=None, repr=False)
    use_bdlora: Any = field(default=None, repr=False)
    kasa_config: Any = field(default=None, repr=False)
    lora_ga_config: Any = field(default=None, repr=False)
    monteclora_config: Any = field(default=None, repr=False)
    velora_config: Any = field(default=None, repr=False)

    # What to use instead, for each PEFT option above.
    NOT_SUPPORTED: ClassVar[dict[str, str]] = {
        "layers_pattern": "factorlab finds layer indices itself in blocks named "
        + "/".join(LAYER_PATTERNS)
        + "; use layers_to_transform alone",
        "layer_replication": "not supported; replicate layers in the base model before adapting",
        "target_parameters": "LoRA on raw nn.Parameters is not supported; target the modules",
        "lora_bias": "a bias on lora_B is not supported; use bias='lora_only' to train the layer biases",
        "loftq_config": "LoftQ initialisation is not supported; quantise and initialise with PEFT",
        "eva_config": "EVA initialisation is not supported; use init_lora_weights=True or 'gaussian'",
        "corda_config": "CorDA initialisation is not supported; use init_lora_weights=True or 'gaussian'",
        "use_qalora": "QA-LoRA is not supported",
        "alora_invocation_tokens": "activated LoRA (aLoRA) is not supported",
        "arrow_config": "Arrow routing is not supported; route experts with LoraMixerConfig",
        "trainable_token_indices": "trainable tokens are not supported; use modules_to_save=['embed_tokens']",
        "megatron_config": "Megatron layers are not supported",
        "use_bdlora": "BD-LoRA is not supported",
        "kasa_config": "KaSA is not supported",
        "lora_ga_config": "LoRA-GA initialisation is not supported",
        "monteclora_config": "MonteCLoRA is not supported",
        "velora_config": "VeLoRA is not supported",
    }
    # Keys PEFT writes into adapter_config.json that describe the file, not the adapter.
    FILE_ONLY: ClassVar[tuple[str, ...]] = (
        "peft_type", "peft_version", "auto_mapping", "megatron_core", "qalora_group_size",
        "ensure_weight_tying",
    )  # fmt: skip

    def __post_init__(self) -> None:
        check_fields(self)
        check_targeting(self)
        for name, instead in self.NOT_SUPPORTED.items():
            value = getattr(self, name)
            if name == "layers_pattern" and set([value] if isinstance(value, str) else value or []) <= set(
                LAYER_PATTERNS
            ):
                continue  # a block-list name factorlab finds by itself (PEFT folders often record it)
            if value not in (None, False, {}):
                raise ConfigError(f"LoraConfig.{name}={getattr(self, name)!r}: {instead}.")
        for field_name in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self, field_name):
                check_regex(f"LoraConfig.{field_name} key", key)
        for where, r in [("r", self.r), *((f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items())]:
            if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
                raise ConfigError(f"LoRA {where} must be a positive integer, got {r!r}; e.g. r=8.")
        alphas = [
            ("lora_alpha", self.lora_alpha),
            *((f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items()),
        ]
        for where, alpha in alphas:  # types and finiteness: check_fields
            check_lora_alpha(f"LoRA {where}", alpha)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if self.init_lora_weights not in LORA_INITS:
            raise ConfigError(
                f"init_lora_weights must be one of {LORA_INITS}, got {self.init_lora_weights!r}."
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """A config from adapter_config.json (factorlab's or PEFT's). PEFT options this version does
        not know are dropped while they are off (null, false, empty) and refused otherwise."""
        known = {f.name for f in dataclasses.fields(cls)} | {"method"}
        unknown_on = sorted(k for k, v in data.items() if k not in known and k not in cls.FILE_ONLY and v)
        if unknown_on:
            raise ConfigError(
                f"LoRA option(s) {unknown_on} are set but unknown to factorlab; this adapter needs a PEFT "
                "feature factorlab does not have. Load it with PEFT."
            )
        return super().from_dict({k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        """The fields, without PEFT options left at their "off" value (factorlab does not use them)."""
        out = super().to_dict()
        for name in self.NOT_SUPPORTED:
            if out.get(name) in (None, False, {}):
                out.pop(name)
        return out

    def to_peft_dict(
        self,
        targets: list[str],
        task_type: str | None,
        fan_in_fan_out: bool,
        portable: tuple[list[str] | str, list[str] | str | None] | None = None,
    ) -> dict[str, Any]:
        """adapter_config.json as PEFT writes it, for these resolved target modules. ``portable``:
        (target_modules, exclude_modules) that PEFT's matching resolves to exactly ``targets`` on this
        model (the caller checked); written instead of the exact names, they survive a re-save by PEFT
        and pick more modules in a deeper model, whose missing tensors then stop the load."""
        out = {"peft_type": "LORA", **self.to_dict()}
        out.pop("method")
        out.pop("target_roles")
        if portable is not None:
            out.update(target_modules=portable[0], exclude_modules=portable[1], layers_to_transform=None)
        else:
            # Exact names: PEFT matches name == target, so it adapts exactly the modules factorlab did,
            # whatever roles, regexes or layer filters chose them.
            out.update(target_modules=sorted(targets), exclude_modules=None, layers_to_transform=None)
        out.update(task_type=self.task_type or task_type, inference_mode=True, fan_in_fan_out=fan_in_fan_out)
        return out

    def rank_for(self, module_name: str) -> int:
        return int(pattern_value(self.rank_pattern, module_name, self.r))

    def alpha_for(self, module_name: str) -> float:
        return pattern_value(self.alpha_pattern, module_name, self.lora_alpha)
