"""PEFT's LoRA file format, read and written without importing peft: ``adapter_config.json``
(peft_type "LORA", r, lora_alpha, target_modules, ...) and ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r). Below both the
core and the methods, which read PEFT folders (loading, plugging experts into a LoRA-Mixer).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from factorlab.adapter_files import read_adapter_config, read_adapter_tensors, write_adapter_folder
from factorlab.errors import AdapterLoadError, ConfigError
from factorlab.validation import FLOAT32_MAX

PEFT_EMBEDDING_NAMES = ("embed_tokens", "lm_head")  # PEFT saves these whole when target_modules names them
KEY_PREFIX = "base_model.model."  # PEFT's key prefix; factorlab's files use it too

HEAD_CLASSES = {"ForSequenceClassification": "SEQ_CLS", "ForTokenClassification": "TOKEN_CLS",
                "ForQuestionAnswering": "QUESTION_ANS"}  # fmt: skip


def check_save_keywords(save_embedding_layers, path_initial_conversion, kwargs: dict) -> None:
    """PEFT's ``save_pretrained`` keywords that factorlab takes differently or not at all."""
    unknown = sorted(set(kwargs) - {"state_dict", "convert_pissa_to_lora", "push_to_hub"})
    if unknown:
        raise ConfigError(
            f"save_pretrained() got unknown keyword(s) {unknown}; it takes PEFT's save_pretrained keywords."
        )
    if save_embedding_layers not in ("auto", False):
        raise ConfigError(
            f"save_embedding_layers={save_embedding_layers!r}: factorlab saves the embeddings an adapter "
            "trains; to train and save them, add modules_to_save=['embed_tokens', 'lm_head'] to the config."
        )
    if path_initial_conversion is not None or kwargs.get("convert_pissa_to_lora"):
        raise ConfigError("PiSSA/OLoRA weight conversion on save is not supported (nor those inits).")
    if kwargs.get("push_to_hub"):
        raise ConfigError("factorlab does not upload; save locally and push with huggingface_hub.")


def task_type_of(base: nn.Module) -> str | None:
    """PEFT's task type for this model class, written to PEFT-format folders when the config has none."""
    cls = type(base).__name__
    if cls.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    if getattr(getattr(base, "config", None), "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"
    return next((t for suffix, t in HEAD_CLASSES.items() if cls.endswith(suffix)), None)


def pattern_value(patterns: dict[str, float], module_name: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of the name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


_LORA_KEY = re.compile(rf"^{re.escape(KEY_PREFIX)}(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA bias terms",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on raw parameters",
    "modules_to_save": "modules_to_save (full copies of extra modules)",
}


def write_peft_lora(
    path: str | os.PathLike,
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float, bool]],
    base_model: nn.Module,
    use_rslora: bool = False,
    lora_dropout: float = 0.0,
) -> Path:
    """A PEFT LoRA folder from per-module (A (r, in), B (out, r), alpha, fan_in_fan_out)."""
    if not modules:
        raise ConfigError("no LoRA modules to write.")
    ranks = {m: a.shape[0] for m, (a, _, _, _) in modules.items()}
    alphas = {m: alpha for m, (_, _, alpha, _) in modules.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank / alpha
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    base_config = getattr(base_model, "config", None)
    peft_config = {
        "peft_type": "LORA",
        "task_type": task_type_of(base_model),
        "base_model_name_or_path": getattr(base_config, "_name_or_path", None) or None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": lora_dropout,
        "use_rslora": use_rslora,
        "target_modules": sorted(modules),  # exact names: PEFT matches name == target too
        "fan_in_fan_out": any(f for _, _, _, f in modules.values()),
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {re.escape(m): v for m, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(m): v for m, v in alphas.items() if v != alpha},
        "use_dora": False,
    }
    tensors = {}
    for m, (a, b, _, _) in modules.items():
        tensors[f"{KEY_PREFIX}{m}.lora_A.weight"] = a
        tensors[f"{KEY_PREFIX}{m}.lora_B.weight"] = b
    return write_adapter_folder(path, peft_config, tensors, {})


@dataclass
class PeftLora:
    """A PEFT LoRA folder, read and checked: per module (A (r, in), B (out, r)), rank and alpha."""

    path: Path
    config: dict
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ranks: dict[str, int]
    alphas: dict[str, float]

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    def scaling(self, module: str) -> float:
        r = self.ranks[module]
        return self.alphas[module] / (math.sqrt(r) if self.use_rslora else r)


def read_peft_lora(path: str | os.PathLike) -> PeftLora:
    """Read a PEFT LoRA folder; refuse anything that is not plain LoRA on linear layers."""
    data = read_adapter_config(path)
    peft_type = data.get("peft_type")
    if peft_type != "LORA":
        what = f"a PEFT {peft_type} adapter" if peft_type else "not a PEFT adapter (no peft_type)"
        raise AdapterLoadError(
            f"{path} holds {what}; factorlab reads PEFT LoRA adapters (peft_type 'LORA') only."
        )
    for flag, what in _UNSUPPORTED_FLAGS.items():
        if data.get(flag):
            raise AdapterLoadError(
                f"{path} uses {what} ({flag}={data[flag]!r}), which factorlab does not support."
            )
    tensors = read_adapter_tensors(path)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _LORA_KEY.match(key)
        if m is None:
            raise AdapterLoadError(
                f"{path}: tensor {key!r} is not a LoRA A/B weight of a linear layer; factorlab reads LoRA on "
                "linear layers only (no embedding, convolution or DoRA tensors)."
            )
        if not tensor.is_floating_point() or not torch.isfinite(tensor.float()).all():
            raise AdapterLoadError(
                f"{path}: tensor {key!r} is {tensor.dtype} with "
                f"{'non-float values' if not tensor.is_floating_point() else 'NaN or inf values'}; "
                "the adapter is corrupt."
            )
        parts.setdefault(m["module"], {})[m["part"]] = tensor
    if not parts:
        raise AdapterLoadError(f"{path}/adapter_model.safetensors holds no LoRA tensors.")
    r_default, alpha_default = data.get("r", 8), data.get("lora_alpha", 8)
    alpha_values = [alpha_default, *(data.get("alpha_pattern") or {}).values()]
    if isinstance(r_default, bool) or not isinstance(r_default, int) or r_default < 1:
        raise AdapterLoadError(
            f"{path}/adapter_config.json: r must be a positive integer, got {r_default!r}."
        )
    for alpha in alpha_values:
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float))
            or not math.isfinite(alpha)
            or abs(alpha) > FLOAT32_MAX
        ):
            raise AdapterLoadError(
                f"{path}/adapter_config.json: lora_alpha must be a finite number within float32's range, "
                f"got {alpha!r}."
            )
    if not isinstance(data.get("use_rslora", False), bool):
        raise AdapterLoadError(f"{path}/adapter_config.json: use_rslora must be true or false.")
    weights, ranks, alphas = {}, {}, {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise AdapterLoadError(
                f"{path}: module {module} has lora_{'A' if 'A' in ab else 'B'} but not both."
            )
        rank = ab["A"].shape[0]
        if ab["B"].shape[1] != rank:
            raise AdapterLoadError(
                f"{path}: rank mismatch at {module}: lora_A has rank {rank} but lora_B has "
                f"{ab['B'].shape[1]}."
            )
        expected = int(pattern_value(data.get("rank_pattern") or {}, module, r_default))
        if expected != rank:
            raise AdapterLoadError(
                f"{path}: rank mismatch at {module}: adapter_config.json says r={expected}, the tensors have "
                f"rank {rank}. The folder mixes files from different adapters."
            )
        weights[module] = (ab["A"], ab["B"])
        ranks[module] = rank
        alphas[module] = pattern_value(data.get("alpha_pattern") or {}, module, alpha_default)
    return PeftLora(Path(path), data, weights, ranks, alphas)
