"""A memory plan before launch: per-GPU bytes of weights, gradients, optimizer state and activations
for a model, a method and a batch, under DDP and under FSDP, and whether it fits.

Nothing is allocated. The model is built on PyTorch's ``meta`` device (shapes without storage), the
method's adapters are added to it exactly as in training, and the activations are measured, not
guessed: a forward on meta tensors with a ``saved_tensors_hooks`` counts every tensor autograd keeps for
the backward (parameters and views of them excluded), for one and for two decoder blocks, so

    activations = outside the blocks + blocks x (per block),   logits/loss: tokens x vocabulary x 12 B

(with gradient checkpointing: outside + blocks x (a block's input) + one block recomputed)
(the head's output in the compute dtype, its float32 copy, the saved log-probabilities and their
gradient). On a GPU the attention runs fused (flash / memory-efficient SDPA), which keeps no
(sequence x sequence) matrix; on the CPU it is kept, and counted.

Per GPU, for P parameters of which T train, in dtype d (2 bytes for bf16/fp16, 4 for float32):

* weights: frozen ones in d, trained ones float32; full fine-tuning keeps float32 master weights
  (factorlab.precision), so 4 P;
* gradients 4 T; Adam's two moments 8 T; DDP adds its float32 gradient buckets (4 T);
* FSDP divides weights, gradients and optimizer state by the GPU count and adds two decoder blocks
  gathered in d (the one computing and the one prefetched);
* the process itself: a CUDA context and kernel workspaces (1 GiB assumed), or on the CPU the Python
  objects of the model and torch's runtime (64 MB, measured).

Checked against measured peak memory on the CPU by ``bench/plan_accuracy.py`` (BENCHMARKS.md).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from factorlab.errors import ConfigError
from factorlab.precision import check_precision

METHODS = ("full", "lora", "compacter++", "lora-mixer")
GIB = 1024**3

# The OCR paper's five LLMs (their published configs), for `factorlab plan --model NAME` offline.
PAPER_MODELS: dict[str, dict[str, Any]] = {
    "llama-3-8b": {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "max_position_embeddings": 8192, "rope_theta": 500000.0, "tie_word_embeddings": False,
    },
    "mistral-7b": {
        "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
        "max_position_embeddings": 32768, "tie_word_embeddings": False,
    },
    "qwen2-7b": {
        "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
        "max_position_embeddings": 32768, "tie_word_embeddings": False,
    },
    "gemma-2-9b": {
        "model_type": "gemma2", "hidden_size": 3584, "intermediate_size": 14336, "num_hidden_layers": 42,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "vocab_size": 256000,
        "max_position_embeddings": 8192, "tie_word_embeddings": True,
    },
    "olmo-7b": {
        "model_type": "olmo", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 50304,
        "max_position_embeddings": 2048, "tie_word_embeddings": False,
    },
}  # fmt: skip


@dataclass
class PlanConfig:
    model: str
    """A model folder (its config.json), a config.json file, or one of PAPER_MODELS."""
    method: str = "full"
    precision: str = "bfloat16"
    gpus: int = 8
    gpu_memory: float = 80.0
    """GiB per GPU."""
    batch: int = 8
    """Sequences per GPU."""
    seq: int = 128
    gradient_checkpointing: bool = False
    r: int = 16
    """LoRA / LoRA-Mixer rank."""
    experts: int = 4
    device: str = "cuda"
    """"cuda" (fused attention: no sequence x sequence matrix kept) or "cpu"."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {METHODS}, got {self.method!r}.")
        check_precision(self.precision)
        for name in ("gpus", "batch", "seq", "r", "experts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name} must be a positive integer, got {value!r}.")
        if not (
            isinstance(self.gpu_memory, (int, float))
            and math.isfinite(self.gpu_memory)
            and self.gpu_memory > 0
        ):
            raise ConfigError(f"--gpu-memory must be a positive size, e.g. 80GB, got {self.gpu_memory!r}.")
        if self.device not in ("cuda", "cpu"):
            raise ConfigError(f"device must be cuda or cpu, got {self.device!r}.")


def parse_size(text: str) -> float:
    """ "80GB", "80GiB", "80" -> GiB. GB is read as GiB, as GPUs are sold: an "80GB" card holds 80 GiB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(GB|GIB|G|TB|TIB|MB|MIB)?\s*", str(text).upper())
    if not match:
        raise ConfigError(f"--gpu-memory {text!r}: give a size like 80GB or 141GB.")
    value, unit = float(match.group(1)), match.group(2) or "GB"
    scale = {"GB": GIB, "G": GIB, "GIB": GIB, "TB": 1024 * GIB, "TIB": 1024 * GIB, "MB": 2**20, "MIB": 2**20}[
        unit
    ]
    return value * scale / GIB


def load_model_config(spec: str):
    """A transformers config from a PAPER_MODELS name, a model folder or a config.json file."""
    from transformers import CONFIG_MAPPING, AutoConfig

    from factorlab.files import read_structured

    if spec in PAPER_MODELS:
        data = dict(PAPER_MODELS[spec])
    else:
        path = Path(spec)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(
                f"--model {spec!r} is neither a model folder, a config.json nor one of "
                f"{sorted(PAPER_MODELS)}."
            )
        data = read_structured(file, f"model config {file}", 10_000_000)
        if not isinstance(data, dict):
            raise ConfigError(f"{file} should hold a JSON object.")
    model_type = data.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(f"model_type {model_type!r} is not one this transformers knows.")
    fields = {k: v for k, v in data.items() if k not in ("model_type", "auto_map", "architectures")}
    return AutoConfig.for_model(model_type, **fields)


def meta_model(config, cfg: PlanConfig, layers: int | None = None) -> nn.Module:
    """The model on the meta device (no storage), with ``cfg.method``'s adapters as training adds them."""
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    if layers is not None:
        config.num_hidden_layers = layers
        if hasattr(config, "layer_types") and config.layer_types is not None:
            config.layer_types = config.layer_types[:layers]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return adapt_for_plan(model, cfg)


def adapt_for_plan(model: nn.Module, cfg: PlanConfig) -> nn.Module:
    from factorlab.core.adapted import adapt
    from factorlab.methods import CompacterPlusPlusConfig, LoraConfig, LoraMixerConfig
    from factorlab.methods.compacter.config import reduction_for

    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if cfg.method == "lora":
        config = LoraConfig(r=cfg.r, lora_alpha=2 * cfg.r, target_modules="all-linear")
    elif cfg.method == "compacter++":
        hidden = model.config.hidden_size
        config = CompacterPlusPlusConfig(reduction_factor=reduction_for(hidden), train_layer_norms=True)
    else:
        config = LoraMixerConfig(
            num_experts=cfg.experts, r=cfg.r, lora_alpha=2 * cfg.r, target_modules="all-linear"
        )
    return adapt(model, config)


def saved_activation_bytes(model: nn.Module, cfg: PlanConfig, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes autograd keeps for the backward after a forward of (batch, seq) tokens on the meta
    device, parameters and views of them excluded; bytes of one decoder block's input). With
    FlashAttention-like kernels on a GPU, the (seq x seq) attention matrices are excluded."""
    from factorlab.fsdp import decoder_blocks

    params = {id(p) for p in model.parameters()}
    held = [0]
    block_input = [0]
    seen: set[int] = set()
    keep: list[torch.Tensor] = []  # alive until the end, so no id is reused by another tensor

    def pack(t: torch.Tensor):
        base = t._base if t._base is not None else t
        if id(t) in params or id(base) in params or id(base) in seen:
            return t  # a weight, or a tensor already counted (saved by two operations)
        if cfg.device == "cuda" and t.dim() >= 2 and tuple(t.shape[-2:]) == (cfg.seq, cfg.seq):
            return t
        seen.add(id(base))
        keep.append(base)
        held[0] += base.numel() * base.element_size()
        return t

    def first_input(module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        block_input[0] = hidden.numel() * hidden.element_size()

    handle = decoder_blocks(model)[0].register_forward_pre_hook(first_input, with_kwargs=True)
    model.train()
    ids = torch.zeros(cfg.batch, cfg.seq, dtype=torch.long, device="meta")
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else _nothing()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            model(input_ids=ids)  # meta tensors: shapes and dtypes, no storage, no compute
    finally:
        handle.remove()
    return held[0], block_input[0]


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@dataclass
class Plan:
    config: PlanConfig
    parameters: int
    trainable: int
    frozen_bytes: int
    trainable_bytes: int
    activations: int
    logits: int
    block_bytes: int
    cpu_copies: int = 0
    rows: dict[str, dict[str, float]] = field(default_factory=dict)

    def per_gpu(self, strategy: str) -> dict[str, float]:
        n = self.config.gpus if strategy == "fsdp" else 1
        weights = (self.frozen_bytes + self.trainable_bytes) / n
        grads = 4 * self.trainable / n
        optimizer = 8 * self.trainable / n
        extra = 2 * self.block_bytes if strategy == "fsdp" and self.config.gpus > 1 else self.cpu_copies
        if strategy == "ddp" and self.config.gpus > 1:
            extra = 4 * self.trainable + self.cpu_copies  # DDP's float32 gradient buckets
        runtime = 2**30 if self.config.device == "cuda" else 64 * 2**20
        row = {
            "weights": weights,
            "gradients": grads,
            "optimizer": optimizer,
            "activations": self.activations + self.logits,
            "overhead": extra + runtime,
        }
        row["total"] = sum(row.values())
        return row

    def fits(self, strategy: str) -> bool:
        return self.per_gpu(strategy)["total"] <= self.config.gpu_memory * GIB

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.__dict__,
            "parameters": self.parameters,
            "trainable": self.trainable,
            "ddp": self.per_gpu("ddp"),
            "fsdp": self.per_gpu("fsdp"),
            "fits": {"ddp": self.fits("ddp"), "fsdp": self.fits("fsdp")},
            "advice": advice(self),
        }


def activation_bytes(config, cfg: PlanConfig) -> tuple[int, int]:
    """(bytes autograd keeps for the backward of the whole model, bytes of the logits and their
    float32 log-softmax and gradient) for ``cfg.batch`` x ``cfg.seq`` tokens: one and two decoder
    blocks measured on the meta device, the rest extrapolated block by block."""
    dtype = check_precision(cfg.precision)
    (one, block_input), (two, _) = (
        saved_activation_bytes(meta_model(config, cfg, n), cfg, dtype) for n in (1, 2)
    )
    layers = config.num_hidden_layers
    per_block = two - one
    if cfg.gradient_checkpointing:  # each block keeps its input; one block is recomputed at a time
        activations = (one - per_block) + layers * block_input + per_block
    else:
        activations = one + (layers - 1) * per_block
    return activations, cfg.batch * cfg.seq * config.vocab_size * (dtype.itemsize + 4 + 4)


def pack_cell_bytes(config, tokens: int, r: int) -> int:
    """Memory one more LoRA cell adds to a pack on CPU (factorlab.inject.pack): its activations and
    logits for ``tokens`` tokens, and its adapter with gradients and Adam state (4 float32 copies)."""
    cfg = PlanConfig(
        model="pack", method="lora", precision="float32", gpus=1, batch=1, seq=tokens, r=r, device="cpu"
    )
    activations, logits = activation_bytes(config, cfg)
    adapter = sum(p.numel() for p in meta_model(config, cfg, 1).parameters() if p.requires_grad)
    return activations + logits + 16 * adapter * config.num_hidden_layers


def make_plan(cfg: PlanConfig) -> Plan:
    config = load_model_config(cfg.model)
    dtype = check_precision(cfg.precision)
    model = meta_model(config, cfg)
    activations, logits = activation_bytes(config, cfg)
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = parameters - trainable
    trained_size = 4  # float32 master weights / adapters
    frozen_size = dtype.itemsize
    blocks = [m for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n.endswith("layers")]
    block = max((sum(p.numel() for p in b[0].parameters()) for b in blocks if len(b)), default=0)
    # factorlab's CPU float32 loop multiplies frozen linear weights through a transposed copy of them
    # (factorlab.layers.frozen): one more copy of those weights while training
    copies = 0
    if cfg.device == "cpu" and dtype == torch.float32:
        copies = 4 * sum(
            m.weight.numel() for m in model.modules() if type(m) is nn.Linear and not m.weight.requires_grad
        )
    return Plan(
        cfg,
        parameters,
        trainable,
        frozen * frozen_size,
        trainable * trained_size,
        activations,
        logits,
        block * dtype.itemsize,
        copies,
    )


def advice(plan: Plan) -> str:
    """What fits, or the smallest set of changes that would: tried cumulatively, least disruptive first
    (gradient checkpointing, smaller per-GPU batches with accumulation, LoRA instead of all weights,
    more GPUs)."""
    cfg = plan.config
    if plan.fits("ddp"):
        return "fits with DDP (the default): every GPU holds the whole model."
    if plan.fits("fsdp") and cfg.gpus > 1:
        need = plan.per_gpu("ddp")["total"] / GIB
        return f"fits with FSDP over {cfg.gpus} GPUs (--fsdp); DDP would need {need:.1f} GiB a GPU."
    steps: list[tuple[str, dict[str, Any]]] = []
    if not cfg.gradient_checkpointing:
        steps.append(("--gradient-checkpointing", {"gradient_checkpointing": True}))
    batch = cfg.batch
    while batch > 1:
        batch //= 2
        steps.append((f"--batch {batch} (accumulate gradients for the same global batch)", {"batch": batch}))
    if cfg.method == "full":
        steps.append(("--method lora (train adapters, not all weights)", {"method": "lora"}))
    gpus = cfg.gpus
    for _ in range(3):
        gpus *= 2
        steps.append((f"--gpus {gpus}", {"gpus": gpus}))

    def fits(changes: dict[str, Any]) -> Plan | None:
        candidate = make_plan(PlanConfig(**{**cfg.__dict__, **changes}))
        return candidate if candidate.fits("ddp") or candidate.fits("fsdp") else None

    changes: dict[str, Any] = {}
    for _, change in steps:
        changes |= change
        if fits(changes):
            break
    else:
        return (
            f"does not fit in {cfg.gpu_memory:g} GiB even with checkpointing, a batch of 1, LoRA and {gpus} "
            "GPUs; use GPUs with more memory."
        )
    # then give back what is not needed: the largest batch that still fits, each other change if it can go
    if "batch" in changes:
        for batch in [
            b for b in (cfg.batch, *(c["batch"] for _, c in steps if "batch" in c)) if b > changes["batch"]
        ]:
            if fits({**changes, "batch": batch}):
                changes["batch"] = batch
                break
    for key in [k for k in changes if k != "batch"]:
        trial = {k: v for k, v in changes.items() if k != key}
        if fits(trial):
            changes = trial
    changes = {k: v for k, v in changes.items() if getattr(cfg, k) != v}
    final = fits(changes)
    how = "with DDP" if final.fits("ddp") else "with FSDP (--fsdp)"
    words = {
        "gradient_checkpointing": "--gradient-checkpointing",
        "batch": f"--batch {changes.get('batch')} (accumulate gradients to keep the global batch)",
        "method": "--method lora (train adapters, not all weights)",
        "gpus": f"--gpus {changes.get('gpus')}",
    }
    return (
        f"does not fit in {cfg.gpu_memory:g} GiB; it fits {how} with {', '.join(words[k] for k in changes)}."
    )


def format_plan(plan: Plan) -> str:
    cfg = plan.config
    lines = [
        f"{cfg.model}: {plan.parameters / 1e9:.2f}B parameters, {plan.trainable:,} trained ({cfg.method}), "
        f"{cfg.precision}, batch {cfg.batch} x {cfg.seq} tokens per GPU"
        + (", gradient checkpointing" if cfg.gradient_checkpointing else ""),
        "",
        "| per GPU (GiB) | weights | gradients | optimizer | activations | overhead | total | "
        f"fits {cfg.gpu_memory:g} GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for strategy, label in (("ddp", "DDP"), ("fsdp", f"FSDP x {cfg.gpus}")):
        row = plan.per_gpu(strategy)
        cells = " | ".join(
            f"{row[k] / GIB:.1f}"
            for k in ("weights", "gradients", "optimizer", "activations", "overhead", "total")
        )
        lines.append(f"| {label} | {cells} | {'yes' if plan.fits(strategy) else 'no'} |")
    lines += ["", advice(plan)]
    return "\n".join(lines)


def write_plan(plan: Plan, path: str | Path) -> None:
    Path(path).write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
