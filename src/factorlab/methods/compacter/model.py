"""How Compacter-family adapters are injected: one BottleneckAdapterLayer (down PHM -> activation
-> up PHM, residual) on each target projection, plus the weights all layers share."""

from __future__ import annotations

from torch import nn

from factorlab.core.method import Method
from factorlab.errors import ConfigError
from factorlab.layers.base import AdapterLayer
from factorlab.layers.bottleneck import BottleneckAdapterLayer, output_features
from factorlab.layers.lora import adapter_dtype
from factorlab.layers.modules_to_save import ModulesToSave
from factorlab.layers.phm import PHMFastWeights, PHMLinear, PHMRule, check_phm_dim
from factorlab.methods.compacter.config import (
    UNSHARED_RULE_STD,
    CompacterConfig,
    CompacterPlusPlusConfig,
    PHMAdapterConfig,
)


def bottleneck_size(hidden: int, config: CompacterConfig, module_name: str) -> int:
    size = int(hidden // config.reduction_factor)
    if size < 1:
        raise ConfigError(
            f"{module_name}: reduction_factor={config.reduction_factor} is larger than the hidden size "
            f"{hidden}, so the bottleneck would have 0 units; use reduction_factor <= {hidden} "
            f"(e.g. {max(1, hidden // 8)} gives a bottleneck of {hidden // max(1, hidden // 8)})."
        )
    return size


def _check_dims(hidden: int, config: CompacterConfig, module_name: str) -> int:
    bottleneck = bottleneck_size(hidden, config, module_name)
    try:
        check_phm_dim(config.phm_dim, {"hidden size": hidden, "bottleneck size": bottleneck})
    except ConfigError as err:
        raise ConfigError(f"{module_name} (reduction_factor={config.reduction_factor}): {err}") from None
    return bottleneck


def build_shared(
    base: nn.Module, config: CompacterConfig, targets: dict[str, nn.Module], loading: bool
) -> nn.ModuleDict | None:
    """Validate every target's sizes before anything is injected; build the shared rule / weights."""
    sizes = {}
    for name, module in targets.items():
        sizes[name] = (
            output_features(module),
            _check_dims(output_features(module), config, name),
            module.weight,
        )
    shared = nn.ModuleDict()
    first_weight = next(iter(sizes.values()))[2]
    factory = {"device": first_weight.device, "dtype": adapter_dtype(first_weight)}
    n = config.phm_dim
    if config.shared_phm_rule:
        shared["phm_rule"] = PHMRule(
            n,
            config.factorized_phm_rule,
            config.phm_c_init,
            config.phm_init_range,
            config.learn_phm,
            **factory,
        )
    if config.shared_W_phm:
        shapes = {(h, b) for h, b, _ in sizes.values()}
        if len(shapes) > 1:
            raise ConfigError(
                f"shared_W_phm needs every target to have the same size; found {sorted(shapes)}."
            )
        hidden, bottleneck = shapes.pop()
        rank = config.phm_rank if config.factorized_phm_W else None
        init = (config.hypercomplex_nonlinearity, config.phm_init_range)
        shared["W_down"] = PHMFastWeights(n, bottleneck // n, hidden // n, rank, *init, **factory)
        shared["W_up"] = PHMFastWeights(n, hidden // n, bottleneck // n, rank, *init, **factory)
    return shared if len(shared) else None


def build_compacter_layer(
    target: nn.Module,
    config: CompacterConfig,
    adapter_name: str,
    module_name: str,
    existing: BottleneckAdapterLayer | None,
    shared: nn.ModuleDict | None = None,
) -> BottleneckAdapterLayer:
    layer = existing if existing is not None else BottleneckAdapterLayer(target)
    hidden = layer.hidden_size
    bottleneck = _check_dims(hidden, config, module_name)
    shared = dict(shared.items()) if shared is not None else {}
    common = {
        "phm_dim": config.phm_dim,
        "phm_rank": config.phm_rank if config.factorized_phm_W else None,
        "bias": config.phm_bias,
        "rule": shared.get("phm_rule"),
        "rule_init": config.phm_c_init,
        "rule_init_range": config.phm_init_range if config.shared_phm_rule else UNSHARED_RULE_STD,
        "learn_rule": config.learn_phm,
        "factorized_rule": config.factorized_phm_rule,
        "fast_init": config.hypercomplex_nonlinearity,
        "fast_init_range": config.phm_init_range,
        "device": target.weight.device,
        "dtype": adapter_dtype(target.weight),
    }
    down = PHMLinear(hidden, bottleneck, fast=shared.get("W_down"), **common)
    up = PHMLinear(bottleneck, hidden, fast=shared.get("W_up"), **common)
    layer.update_layer(adapter_name, down, up, config.non_linearity)
    return layer


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def norm_modules(base: nn.Module, config: CompacterConfig) -> list[str]:
    """Every LayerNorm / RMSNorm of the model, when the config trains them."""
    if not config.train_layer_norms:
        return []
    names, inside = [], []
    for name, module in base.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        if isinstance(module, AdapterLayer):
            inside.append(name + ".")
            if isinstance(module, ModulesToSave) and is_norm(module.base_layer):
                names.append(name)
        elif is_norm(module):
            names.append(name)
    return names


def _method(config_cls: type[CompacterConfig]) -> Method:
    return Method(
        name=config_cls.method,
        config_cls=config_cls,
        layer_cls=BottleneckAdapterLayer,
        build_layer=build_compacter_layer,
        default_roles=lambda family: config_cls.default_roles,
        build_shared=build_shared,
        extra_modules_to_save=norm_modules,
        param_kinds=(
            ("phm_rule", "PHM rule A_i (slow weights)"),
            ("own_rule", "PHM rule A_i (slow weights)"),
            ("W_down", "PHM fast weights (shared)"),
            ("W_up", "PHM fast weights (shared)"),
            ("own_fast", "PHM fast weights s_i, t_i / B_i"),
            ("adapter_down", "PHM biases"),
            ("adapter_up", "PHM biases"),
        ),
    )


COMPACTER = _method(CompacterConfig)
COMPACTER_PLUS_PLUS = _method(CompacterPlusPlusConfig)
PHM_ADAPTER = _method(PHMAdapterConfig)
