"""Which modules an adapter goes into: PEFT-style ``target_modules`` plus architecture roles.

``target_modules`` (as in PEFT):
  * a list of names: a module matches if its full name equals an entry or ends with "." + entry;
  * a string: a regular expression that must match the full module name;
  * "all-linear": every linear layer except the output head.
``exclude_modules`` uses the same rules; ``layers_to_transform`` keeps only the given layer indices.

Roles name the same parts of every architecture family, so a method can ask for "the attention
output projection" without knowing that it is ``o_proj`` in Llama, ``attn.c_proj`` in GPT-2,
``SelfAttention.o`` in T5 and ``attention.output.dense`` in BERT.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
from collections.abc import Callable, Sequence

import torch
from torch import nn

from factorlab.errors import TargetError
from factorlab.layers.base import AdapterLayer
from factorlab.layers.shapes import LAYER_PATTERNS, is_conv1d, is_linear, layer_index  # noqa: F401
from factorlab.validation import check_regex

# role -> regular expression over the full module name, per family (config.model_type)
_LLAMA_LIKE = {
    "attn_q": r".*\.self_attn\.q_proj",
    "attn_k": r".*\.self_attn\.k_proj",
    "attn_v": r".*\.self_attn\.v_proj",
    "attn_out": r".*\.self_attn\.o_proj",
    "ffn_in": r".*\.mlp\.(gate_proj|up_proj)",
    "ffn_out": r".*\.mlp\.down_proj",
}
PRESETS: dict[str, dict[str, str]] = {
    **{
        t: _LLAMA_LIKE
        for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "smollm3")
    },
    "gpt2": {  # q, k and v share one fused Conv1D
        "attn_q": r".*\.attn\.c_attn",
        "attn_k": r".*\.attn\.c_attn",
        "attn_v": r".*\.attn\.c_attn",
        "attn_out": r".*\.attn\.c_proj",
        "ffn_in": r".*\.mlp\.c_fc",
        "ffn_out": r".*\.mlp\.c_proj",
    },
    "t5": {  # self-attention of encoder and decoder; cross-attention has its own roles
        "attn_q": r".*\.SelfAttention\.q",
        "attn_k": r".*\.SelfAttention\.k",
        "attn_v": r".*\.SelfAttention\.v",
        "attn_out": r".*\.SelfAttention\.o",
        "cross_attn_q": r".*\.EncDecAttention\.q",
        "cross_attn_k": r".*\.EncDecAttention\.k",
        "cross_attn_v": r".*\.EncDecAttention\.v",
        "cross_attn_out": r".*\.EncDecAttention\.o",
        "ffn_in": r".*\.DenseReluDense\.wi(_0|_1)?",
        "ffn_out": r".*\.DenseReluDense\.wo",
    },
    "bert": {
        "attn_q": r".*\.attention\.self\.query",
        "attn_k": r".*\.attention\.self\.key",
        "attn_v": r".*\.attention\.self\.value",
        "attn_out": r".*\.attention\.output\.dense",
        "ffn_in": r".*\.intermediate\.dense",
        "ffn_out": r".*\.layer\.\d+\.output\.dense",
    },
    "mamba": {
        "ssm_in": r".*\.mixer\.in_proj",
        "ssm_x": r".*\.mixer\.x_proj",
        "ssm_dt": r".*\.mixer\.dt_proj",
        "ssm_out": r".*\.mixer\.out_proj",
    },
}
PRESETS["mt5"] = PRESETS["t5"]
PRESETS["falcon_mamba"] = PRESETS["mamba"]
for _family in ("bert", "roberta", "xlm-roberta"):
    PRESETS[_family] = PRESETS["bert"]

ROLE_GROUPS = {
    "attn_in": ("attn_q", "attn_k", "attn_v"),
    "attention": ("attn_q", "attn_k", "attn_v", "attn_out"),
    "ffn": ("ffn_in", "ffn_out"),
    "ssm_in_out": ("ssm_in", "ssm_out"),
}


def model_family(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def expand_roles(roles: Sequence[str], family: str | None) -> list[str]:
    """Role names (groups expanded) -> regular expressions for this family."""
    if family not in PRESETS:
        raise TargetError(
            f"no architecture preset for model_type {family!r}, so roles {list(roles)} cannot be resolved; "
            f"pass target_modules explicitly. Presets exist for: {', '.join(sorted(PRESETS))}."
        )
    preset = PRESETS[family]
    patterns: list[str] = []
    for role in roles:
        for r in ROLE_GROUPS.get(role, (role,)):
            if r not in preset:
                known = sorted(
                    set(preset) | {g for g, members in ROLE_GROUPS.items() if set(members) <= set(preset)}
                )
                raise TargetError(f"role {r!r} does not exist for {family} models; known roles: {known}.")
            if preset[r] not in patterns:
                patterns.append(preset[r])
    return patterns


def _matches(name: str, spec: str | Sequence[str]) -> bool:
    if isinstance(spec, str):
        if spec == "all-linear":
            return True
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def unwrapped(module: nn.Module) -> nn.Module:
    """The module an adapter layer wraps (``base_layer``), or the module itself: methods judge and
    adapt the original, whatever adapter already sits on it."""
    return module.base_layer if isinstance(module, AdapterLayer) else module


def output_head_names(model: nn.Module) -> set[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n for n, m in model.named_modules() if head is not None and m is head} | {"lm_head"}


def resolve_targets(
    model: nn.Module,
    target_modules: str | Sequence[str] | None,
    target_roles: Sequence[str] | None = None,
    exclude_modules: str | Sequence[str] | None = None,
    layers_to_transform: Sequence[int] | None = None,
    default_roles: Sequence[str] = (),
    accepts: Callable[[nn.Module], bool] | None = None,
    accepted_kinds: str = "nn.Linear or Conv1D layers",
) -> list[str]:
    """Full names of the modules to adapt, in model order. Raises TargetError if none match, or if
    one is not a module the method can adapt (``accepts``; default: linear layers)."""
    accepts = accepts or is_linear
    for what, spec in (("target_modules", target_modules), ("exclude_modules", exclude_modules)):
        if isinstance(spec, str) and spec != "all-linear":
            check_regex(what, spec)
    family = model_family(model)
    if target_modules is None and not target_roles:
        if not default_roles:
            raise TargetError(
                "no targets: pass target_modules (names, a regex, or 'all-linear') or target_roles."
            )
        target_roles = default_roles
    role_patterns = expand_roles(target_roles, family) if target_roles else []
    heads = output_head_names(model)
    names = []
    inside_adapters: list[str] = []  # an adapter layer's own submodules are never targets
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in inside_adapters):
            continue
        if hasattr(module, "adapter_weights") and hasattr(module, "base_layer"):
            inside_adapters.append(name + ".")
        hit = target_modules is not None and _matches(name, target_modules)
        if target_modules == "all-linear" and (not is_linear(module) or name in heads):
            hit = False
        hit = hit or any(re.fullmatch(p, name) for p in role_patterns)
        if not hit:
            continue
        if exclude_modules is not None and _matches(name, exclude_modules):
            continue
        if layers_to_transform is not None and layer_index(name) not in set(layers_to_transform):
            continue
        names.append(name)
    if not names:
        raise TargetError(
            _nothing_matched(model, target_modules, target_roles, exclude_modules, layers_to_transform)
        )
    originals = {n: unwrapped(model.get_submodule(n)) for n in names}
    unsupported = [(n, type(m).__name__) for n, m in originals.items() if not accepts(m)]
    if unsupported:
        shown = ", ".join(f"{n} ({t})" for n, t in unsupported[:5])
        raise TargetError(
            f"target_modules matched modules this method cannot adapt: {shown}"
            f"{' ...' if len(unsupported) > 5 else ''}. This method adapts {accepted_kinds}; "
            "name the projections inside these modules instead (e.g. 'q_proj' rather than 'self_attn')."
        )
    return names


def _nothing_matched(model, target_modules, target_roles, exclude_modules, layers_to_transform) -> str:
    linear = [n for n, m in model.named_modules() if is_linear(m)]
    suffixes = sorted({n.split(".")[-1] for n in linear})
    asked = (
        target_modules if isinstance(target_modules, str) or target_modules is None else list(target_modules)
    )
    wanted = [asked] if isinstance(asked, str) else (asked or [])
    close = list(
        dict.fromkeys(c for w in wanted for c in difflib.get_close_matches(str(w), suffixes, n=3, cutoff=0.5))
    )
    msg = f"target_modules={asked!r}"
    if target_roles:
        msg += f" / target_roles={list(target_roles)!r}"
    msg += " matched no module of this model"
    if exclude_modules is not None or layers_to_transform is not None:
        msg += f" (after exclude_modules={exclude_modules!r}, layers_to_transform={layers_to_transform!r})"
    msg += "."
    if close:
        msg += f" Did you mean {close}?"
    msg += f" Linear layers here end in: {suffixes[:20]}{' ...' if len(suffixes) > 20 else ''}."
    return msg


# ---- modules whose weights the model reads directly ---------------------------------------------


def _fused_mamba_kernels_available() -> bool:
    if not torch.cuda.is_available():
        return False
    return any(importlib.util.find_spec(p) is not None for p in ("mamba_ssm", "kernels"))


def check_called_as_modules(model: nn.Module, names: Sequence[str]) -> None:
    """Refuse targets whose weight the model uses directly instead of calling the module:
    an adapter wrapped around such a module would never run, so it would train nothing."""
    if model_family(model) not in ("mamba", "falcon_mamba"):
        return
    fused = _fused_mamba_kernels_available()
    for name in names:
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "dt_proj":
            raise TargetError(
                f"{name}: transformers' Mamba mixer multiplies by dt_proj.weight directly and never calls "
                "dt_proj, so an adapter there would get no gradient and change nothing. Target in_proj, "
                "x_proj or out_proj instead."
            )
        if fused and leaf in ("x_proj", "out_proj"):
            raise TargetError(
                f"{name}: with the fused CUDA kernels (mamba_ssm / kernels) the Mamba mixer passes "
                f"{leaf}.weight straight into the kernel during training, so an adapter there would not "
                "train. Target in_proj, or run without the fused kernels."
            )
