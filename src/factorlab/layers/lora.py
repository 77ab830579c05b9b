"""LoRA: a low-rank update added to a frozen linear layer (Hu et al., 2021).

    y = base(x) + sum over active adapters a of  s_a * B_a A_a dropout_a(x)

    A_a: (r, in)   B_a: (out, r)   s_a = alpha / r, or alpha / sqrt(r) with rsLoRA

The base layer is an ``nn.Linear`` (weight (out, in)) or a GPT-2-style ``Conv1D``
(weight (in, out), ``fan_in_fan_out=True``). Pure torch; weights and key names follow PEFT
(``lora_A.<name>.weight``), so adapters move between the two without conversion.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from factorlab.errors import ConfigError
from factorlab.layers.base import AdapterLayer

LORA_INITS = (True, False, "kaiming", "gaussian")


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapters on half-precision bases train in float32, as PEFT does by default."""
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


class LoRALinear(AdapterLayer):
    adapter_weights = ("lora_A", "lora_B")
    adapter_extras = ("lora_dropout", "scaling", "r")
    can_merge = True

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False):
        super().__init__(base_layer)
        weight = base_layer.weight
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features = (
            (weight.shape[0], weight.shape[1]) if fan_in_fan_out else (weight.shape[1], weight.shape[0])
        )
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.r: dict[str, int] = {}

    def update_layer(
        self,
        name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
    ) -> None:
        """Add adapter ``name`` of rank ``r`` (init: True/"kaiming" = kaiming-uniform A and zero B,
        "gaussian" = N(0, 1/r) A and zero B, False = both random, for tests)."""
        if not isinstance(r, int) or r <= 0:
            raise ConfigError(f"LoRA rank r must be a positive integer, got {r!r}.")
        if r > 8 * max(self.in_features, self.out_features):  # a typo, not a rank: refuse before allocating
            raise ConfigError(
                f"LoRA rank r={r} far exceeds this {self.in_features} -> {self.out_features} layer's "
                f"widths; the update B A has rank <= {min(self.in_features, self.out_features)} anyway. "
                "Use a smaller r."
            )
        if init_lora_weights not in LORA_INITS:
            raise ConfigError(f"init_lora_weights must be one of {LORA_INITS}, got {init_lora_weights!r}.")
        if not 0.0 <= lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {lora_dropout}.")
        weight = self.base_layer.weight
        factory = {"device": weight.device, "dtype": adapter_dtype(weight)}
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, **factory)
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.scaling[name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.r[name] = r
        self.reset_lora_parameters(name, init_lora_weights)

    @torch.no_grad()
    def reset_lora_parameters(self, name: str, init_lora_weights: bool | str = True) -> None:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        if init_lora_weights == "gaussian":
            nn.init.normal_(a, std=1 / self.r[name])
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init_lora_weights is False:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        else:
            nn.init.zeros_(b)

    def delta_weight(self, name: str) -> torch.Tensor:
        """The dense update s * B A in the base weight's layout ((out, in), or (in, out) for Conv1D)."""
        delta = (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            h = lora_a(self.lora_dropout[name](x.to(lora_a.weight.dtype)))
            result = result + (lora_b(h) * self.scaling[name]).to(result.dtype)
        return result

    @torch.no_grad()
    def merge(self, names: Iterable[str] | None = None) -> None:
        weight = self.base_layer.weight
        for name in self.active_adapters if names is None else names:
            if name in self.merged_adapters:
                continue
            merged = weight.data + self.delta_weight(name).to(weight.dtype)
            if not torch.isfinite(merged).all():
                raise ValueError(
                    f"merging adapter {name!r} would put non-finite values into the base weight."
                )
            weight.data = merged
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        weight = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight.data -= self.delta_weight(name).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}"
