"""HydraLoraConfig: one shared A, several Bs and a router per adapted projection (HydraLoRA)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from factorlab.core.method import AdapterConfig
from factorlab.errors import ConfigError
from factorlab.validation import check_fields, check_lora_alpha, check_ranges, check_targeting


@dataclass
class HydraLoraConfig(AdapterConfig):
    """HydraLoRA. Defaults target the attention input and output projections and the MLP, like the
    paper's all-linear setting on Llama (q, k, v, o, gate, up, down)."""

    method: ClassVar[str] = "hydralora"

    r: int = 8
    """Rank of the shared A and of every B."""
    num_experts: int = 3
    """Number of B matrices (the paper's default: 3)."""
    lora_alpha: float = 16
    """Scaling s = lora_alpha / r."""
    init_lora_weights: bool | str = True
    """As LoraConfig: kaiming A and zero Bs (True), "gaussian" A, or every weight random (False, tests)."""

    def __post_init__(self) -> None:
        check_fields(self)
        check_targeting(self)
        check_ranges(self, positive=("r", "num_experts"))  # check_fields made them integers
        check_lora_alpha("lora_alpha", self.lora_alpha)
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ConfigError(
                f"init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}."
            )
