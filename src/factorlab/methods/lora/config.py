"""LoraConfig: PEFT's field names and defaults, so configs move between the two unchanged."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

from factorlab.errors import ConfigError
from factorlab.layers.lora import LORA_INITS
from factorlab.methods.base import AdapterConfig
from factorlab.validation import check_fields


def pattern_value(patterns: dict[str, float], module_name: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of the name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


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

    def __post_init__(self) -> None:
        check_fields(self)
        for where, r in [("r", self.r), *((f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items())]:
            if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
                raise ConfigError(f"LoRA {where} must be a positive integer, got {r!r}; e.g. r=8.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if self.init_lora_weights not in LORA_INITS:
            raise ConfigError(
                f"init_lora_weights must be one of {LORA_INITS}, got {self.init_lora_weights!r}."
            )

    def rank_for(self, module_name: str) -> int:
        return int(pattern_value(self.rank_pattern, module_name, self.r))

    def alpha_for(self, module_name: str) -> float:
        return pattern_value(self.alpha_pattern, module_name, self.lora_alpha)
