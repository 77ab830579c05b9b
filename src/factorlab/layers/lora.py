"""LoRA: a low-rank update added to a frozen linear layer (Hu et al., 2021).

    y = base(x) + sum over active adapters a of  s_a * B_a A_a dropout_a(x)

    A_a: (r, in)   B_a: (out, r)   s_a = alpha / r, or alpha / sqrt(r) with rsLoRA

DoRA (Liu et al., 2024) splits the adapted weight into a trainable magnitude m (one per output)
and a direction:

    W' = m * (W + s B A) / ||W + s B A||      (row norms, detached as in the paper, section 4.3)
    y  = base(x) + (m / ||.|| - 1) * (W x) + (m / ||.||) * s B A dropout(x)

m starts at the row norms of W + s B A, so the adapter starts as the base model.

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
from factorlab.layers.base import AdapterLayer, copy_state_exact
from factorlab.layers.frozen import lora_on_frozen, transposed_weight
from factorlab.layers.shapes import weight_dims

LORA_INITS = (True, False, "kaiming", "gaussian")


@torch.no_grad()
def init_lora_pair(a: torch.Tensor, b: torch.Tensor, init_lora_weights: bool | str, r: int) -> None:
    """PEFT's init: True/"kaiming" = kaiming-uniform A and zero B, "gaussian" = N(0, 1/r) A and zero
    B (both start as the base model), False = both random (for tests)."""
    if init_lora_weights == "gaussian":
        nn.init.normal_(a, std=1 / r)
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    if init_lora_weights is False:
        nn.init.kaiming_uniform_(b, a=math.sqrt(5))
    else:
        nn.init.zeros_(b)


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapters on half-precision bases train in float32, as PEFT does by default."""
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


class DoraMagnitude(nn.Module):
    """DoRA's magnitude vector m, shape (out,)."""

    def __init__(self, out_features: int, **factory):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, **factory))


class LoRALayer(AdapterLayer):
    """What every LoRA layer is (linear, embedding, convolution): ranks, scalings, the checks and the
    merge rule are here; each kind creates its own weights (``_create``) and says its widths."""

    adapter_extras = ("lora_dropout", "scaling", "r")
    can_merge = True
    supports_dora = False

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.r: dict[str, int] = {}

    def widths(self) -> tuple[int, int]:
        raise NotImplementedError

    def update_layer(
        self,
        name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        use_dora: bool = False,
    ) -> None:
        """Add adapter ``name`` of rank ``r`` (init: True/"kaiming" = kaiming-uniform A and zero B,
        "gaussian" = N(0, 1/r) A and zero B, False = both random, for tests; embeddings: PEFT's)."""
        widths = self.widths()
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ConfigError(f"LoRA rank r must be a positive integer, got {r!r}.")
        if r > 8 * max(widths):  # a typo, not a rank: refuse before allocating
            raise ConfigError(
                f"LoRA rank r={r} far exceeds this {widths[0]} -> {widths[1]} layer's widths; the update "
                f"has rank <= {min(widths)} anyway. Use a smaller r."
            )
        if init_lora_weights not in LORA_INITS:
            raise ConfigError(f"init_lora_weights must be one of {LORA_INITS}, got {init_lora_weights!r}.")
        if not 0.0 <= lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {lora_dropout}.")
        if use_dora and not self.supports_dora:
            raise ConfigError(
                f"DoRA on {type(self.base_layer).__name__} layers is not supported by factorlab; target "
                "linear layers for DoRA."
            )
        weight = self.base_layer.weight
        factory = {"device": weight.device, "dtype": adapter_dtype(weight)}
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.scaling[name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.r[name] = r
        self._create(name, r, init_lora_weights, use_dora, factory)

    def _create(
        self, name: str, r: int, init_lora_weights: bool | str, use_dora: bool, factory: dict
    ) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self, names: Iterable[str] | None = None) -> None:
        weight = self.base_layer.weight
        for name in self.active_adapters if names is None else names:
            if name in self.merged_adapters:
                continue
            merged = self._merged_weight(name, weight)
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
            weight.data = self._unmerged_weight(self.merged_adapters.pop(), weight)

    def _merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight.data + self.delta_weight(name).to(weight.dtype)

    def _unmerged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight.data - self.delta_weight(name).to(weight.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        raise NotImplementedError


class LoRALinear(LoRALayer):
    adapter_weights = ("lora_A", "lora_B", "lora_magnitude_vector")
    supports_dora = True

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False):
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features = weight_dims(base_layer.weight, fan_in_fan_out)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only
        self._dora_norms: dict[str, torch.Tensor] = {}  # row norms at merge time, to unmerge exactly

    def widths(self) -> tuple[int, int]:
        return self.in_features, self.out_features

    def _create(
        self, name: str, r: int, init_lora_weights: bool | str, use_dora: bool, factory: dict
    ) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, **factory)
        self.reset_lora_parameters(name, init_lora_weights)
        if use_dora:
            self.lora_magnitude_vector[name] = DoraMagnitude(self.out_features, **factory)
            with torch.no_grad():
                self.lora_magnitude_vector[name].weight.copy_(self._direction_norm(name))

    @torch.no_grad()
    def reset_lora_parameters(self, name: str, init_lora_weights: bool | str = True) -> None:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        init_lora_pair(a, b, init_lora_weights, self.r[name])

    def _weight_out_in(self) -> torch.Tensor:
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight

    def _direction_norm(self, name: str) -> torch.Tensor:
        """||W + s B A|| per output row (out,), without gradient: DoRA treats it as a constant."""
        with torch.no_grad():
            delta = (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]
            return torch.linalg.norm(self._weight_out_in().to(delta.dtype) + delta, dim=1)

    # PEFT stores DoRA's magnitude as "<module>.lora_magnitude_vector" (no ".weight").
    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        out = super().adapter_state_dict(name)
        if "lora_magnitude_vector.weight" in out:
            out["lora_magnitude_vector"] = out.pop("lora_magnitude_vector.weight")
        return out

    def load_adapter_state_dict(self, name: str, tensors: dict[str, torch.Tensor], where: str) -> None:
        expected = super().adapter_state_dict(name)
        if "lora_magnitude_vector" in tensors:
            tensors = dict(tensors)
            tensors["lora_magnitude_vector.weight"] = tensors.pop("lora_magnitude_vector")
        copy_state_exact(expected, tensors, where)

    def delta_weight(self, name: str, out_in: bool = False) -> torch.Tensor:
        """The dense update s * B A in the base weight's layout ((out, in), or (in, out) for Conv1D);
        ``out_in``: always (out, in)."""
        delta = (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]
        return delta.T if self.fan_in_fan_out and not out_in else delta

    def _one_node_training(self, x: torch.Tensor) -> torch.Tensor | None:
        """Inside ``transposed_frozen_weights`` (training), base + one plain LoRA update as a single
        autograd node (``factorlab.layers.frozen``); None where the general path below must run."""
        weight_t = transposed_weight(self.base_layer, x)
        if weight_t is None or self.disabled:  # outside training: one dict lookup, then the usual path
            return None
        active = [n for n in self.active_adapters if n not in self.merged_adapters]
        if len(active) != 1:
            return None
        name = active[0]
        lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
        if name in self.lora_magnitude_vector or not isinstance(self.lora_dropout[name], nn.Identity):
            return None
        if lora_a.dtype != x.dtype:
            return None
        return lora_on_frozen(x, self.base_layer, weight_t, lora_a, lora_b, self.scaling[name])

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        fused = self._one_node_training(x)
        if fused is not None:
            return fused
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        base_out = None
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            x_in = self.lora_dropout[name](x.to(lora_a.weight.dtype))
            scaling = self.scaling[name]
            if math.frexp(scaling)[0] == 0.5:  # a power of two scales exactly, so at width r, not out
                update = lora_b(lora_a(x_in) * scaling)
            else:
                update = lora_b(lora_a(x_in)) * scaling
            if name in self.lora_magnitude_vector:
                scale = self.lora_magnitude_vector[name].weight / self._direction_norm(name)  # (out,)
                if x_in is x or isinstance(self.lora_dropout[name], nn.Identity) or not self.training:
                    if base_out is None:  # W x, the base output without its bias
                        bias = self.bias
                        base_out = result if bias is None else result - bias
                    wx = base_out.to(update.dtype)
                else:  # W applied to the dropped-out input, as PEFT does
                    wx = nn.functional.linear(x_in, self._weight_out_in().to(x_in.dtype))
                update = (scale - 1) * wx + scale * update
            result = result + update.to(result.dtype)
        return result

    def _merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        if name not in self.lora_magnitude_vector:
            return super()._merged_weight(name, weight)
        # DoRA: W' = m / ||W + dW|| * (W + dW); the norm is kept to unmerge exactly
        norm = self._direction_norm(name)
        self._dora_norms[name] = norm
        factor = (self.lora_magnitude_vector[name].weight / norm)[:, None]
        new = factor * (self._weight_out_in() + self.delta_weight(name, out_in=True))
        return (new.T if self.fan_in_fan_out else new).to(weight.dtype)

    def _unmerged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        if name not in self.lora_magnitude_vector:
            return super()._unmerged_weight(name, weight)
        factor = (self.lora_magnitude_vector[name].weight / self._dora_norms.pop(name))[:, None]
        old = self._weight_out_in() / factor - self.delta_weight(name, out_in=True)
        return (old.T if self.fan_in_fan_out else old).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}"


class LoRAEmbedding(LoRALayer):
    """LoRA on an ``nn.Embedding`` (PEFT's layout): y = E[x] + s * A^T[x] B^T.

    A: (r, num_embeddings)   B: (embedding_dim, r)   A starts at zero, B normal, so the adapter
    starts as the base. No dropout on token ids, as in PEFT.
    """

    adapter_weights = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def widths(self) -> tuple[int, int]:
        num, dim = self.base_layer.weight.shape
        return num, dim

    def _create(
        self, name: str, r: int, init_lora_weights: bool | str, use_dora: bool, factory: dict
    ) -> None:
        num, dim = self.widths()
        self.lora_embedding_A[name] = nn.Parameter(torch.randn(r, num, **factory))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(dim, r, **factory))
        if init_lora_weights is not False:
            with torch.no_grad():
                self.lora_embedding_A[name].zero_()
                nn.init.normal_(self.lora_embedding_B[name])

    # Parameters, not modules, hold the weights: their keys carry no ".weight" (as PEFT saves them).
    def adapter_parameters(self, name: str):
        for attr in self.adapter_weights:
            if name in getattr(self, attr):
                yield getattr(self, attr)[name]

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        return {
            attr: getattr(self, attr)[name] for attr in self.adapter_weights if name in getattr(self, attr)
        }

    def delta_weight(self, name: str) -> torch.Tensor:
        """s * (B A)^T, shape (num_embeddings, embedding_dim) like the table."""
        return (self.lora_embedding_B[name] @ self.lora_embedding_A[name]).T * self.scaling[name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        base = self.base_layer
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
            after_a = nn.functional.embedding(
                x, a.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
            )  # (..., r)
            result = result + ((after_a @ b.T) * self.scaling[name]).to(result.dtype)
        return result


class LoRAConv(LoRALayer):
    """LoRA on ``nn.Conv1d`` / ``nn.Conv2d`` (PEFT's layout): y = conv(x) + s * B(A(dropout(x))).

    A: a convolution in -> r with the base's kernel, stride and padding; B: a 1x1 convolution r -> out.
    """

    adapter_weights = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Conv1d | nn.Conv2d):
        super().__init__(base_layer)
        if base_layer.groups != 1 or any(d != 1 for d in base_layer.dilation):
            raise ConfigError(
                f"LoRA on a convolution with groups={base_layer.groups}, dilation={base_layer.dilation} is "
                "not supported (PEFT cannot merge it either); exclude this module."
            )
        if isinstance(base_layer.padding, str):
            raise ConfigError(f"LoRA on a convolution with padding={base_layer.padding!r} is not supported.")
        self.conv = nn.Conv2d if isinstance(base_layer, nn.Conv2d) else nn.Conv1d
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def widths(self) -> tuple[int, int]:
        return self.base_layer.in_channels, self.base_layer.out_channels

    def _create(
        self, name: str, r: int, init_lora_weights: bool | str, use_dora: bool, factory: dict
    ) -> None:
        base = self.base_layer
        ones = (1,) * len(base.kernel_size)
        self.lora_A[name] = self.conv(
            base.in_channels, r, base.kernel_size, base.stride, base.padding, bias=False, **factory
        )
        self.lora_B[name] = self.conv(r, base.out_channels, ones, ones, bias=False, **factory)
        with torch.no_grad():
            init_lora_pair(self.lora_A[name].weight, self.lora_B[name].weight, init_lora_weights, r)

    def delta_weight(self, name: str) -> torch.Tensor:
        """s * (B composed with A) as one kernel of the base's shape (out, in, *kernel)."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight  # (r, in, *k), (out, r, *1)
        combined = torch.einsum("or,ri...->oi...", b.flatten(1), a)
        return combined * self.scaling[name]

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
