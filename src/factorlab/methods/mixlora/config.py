"""MixLoraConfig: routed LoRA experts in every feed-forward block plus a LoRA on attention (MixLoRA)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from factorlab.core.method import AdapterConfig
from factorlab.errors import ConfigError
from factorlab.validation import check_fields, check_lora_alpha, check_ranges, check_targeting

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "mlp"]


@dataclass
class MixLoraConfig(AdapterConfig):
    """MixLoRA. Targets are attention projections (a plain LoRA each) and gated feed-forward blocks
    (``mlp``: E routed experts); the default is Llama-family naming, q, k, v, o and the MLP."""

    method: ClassVar[str] = "mixlora"

    r: int = 8
    """Rank of every LoRA (attention and experts)."""
    lora_alpha: float = 16
    """Scaling lora_alpha / r."""
    num_experts: int = 8
    """Experts per feed-forward block (the paper: 8)."""
    top_k: int = 2
    """Experts per token (the paper: 2)."""
    router_aux_loss_coef: float = 0.001
    """Weight of the Switch-style balance loss E * sum_i f_i P_i (the paper: 0.001)."""
    init_lora_weights: bool = True
    """True: kaiming A and zero B (the model starts as the base); False: both random (tests)."""

    def __post_init__(self) -> None:
        if self.target_modules is None and not self.target_roles:
            self.target_modules = list(DEFAULT_TARGETS)
        check_fields(self)
        check_targeting(self)
        check_ranges(self, positive=("r", "num_experts", "top_k"), non_negative=("router_aux_loss_coef",))
        if self.top_k > self.num_experts:
            raise ConfigError(
                f"top_k={self.top_k} exceeds num_experts={self.num_experts}; use top_k <= num_experts."
            )
        check_lora_alpha("lora_alpha", self.lora_alpha)
