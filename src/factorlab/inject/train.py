"""Fine-tuning a backend on a world's training texts with one adaptation method."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from factorlab.core.adapted import adapt
from factorlab.distributed import init_from_env, rank, world_size
from factorlab.errors import ConfigError
from factorlab.inject.backends import Backend
from factorlab.inject.world import World
from factorlab.methods.compacter.config import CompacterPlusPlusConfig, reduction_for
from factorlab.methods.lora.config import LoraConfig
from factorlab.methods.lora_mixer.config import LoraMixerConfig
from factorlab.precision import check_precision, keep_trainable_float32, store_base
from factorlab.training import pack, packs_sequences, run_training, to_device
from factorlab.validation import check_fields, check_ranges

METHODS = ("full", "lora", "compacter++", "lora-mixer")

# (lr, epochs, batch size) per backend kind and method. Full fine-tuning needs a far smaller rate.
# Tiny: measured over 3 pretraining x 3 fine-tuning seeds (AVX2 kernels), city-language test-implication
# rank after / before: full lr 1e-3 reached 0.52 (not robust), 2e-3 <= 0.30, 3e-3 <= 0.32; LoRA lr 3e-3
# reached 0.54, 5e-3 with 30 epochs left one run's facts unlearned, 5e-3 with 40 epochs <= 0.44,
# 7e-3 and 1e-2 collapsed on some seeds.
DEFAULTS = {
    "tiny": {
        "full": (3e-3, 30, 16),
        "lora": (5e-3, 40, 16),
        "compacter++": (2e-2, 30, 16),
        "lora-mixer": (1e-2, 30, 16),
    },
    "hf": {
        "full": (3e-5, 8, 8),
        "lora": (1e-3, 8, 8),
        "compacter++": (2e-3, 8, 8),
        "lora-mixer": (1e-3, 8, 8),
    },
}


@dataclass
class FineTuneSettings:
    method: str
    r: int = 8
    lora_alpha: float = 8.0
    """Fixed across ranks (PEFT's default): the update scale alpha / r shrinks as r grows, which keeps
    Adam's effective step size comparable between ranks of a sweep."""
    lr: float | None = None
    epochs: int | None = None
    batch_size: int | None = None
    seed: int = 0
    precision: str = "float32"
    """"float32", "bfloat16" or "float16": the base stored in it, adapters float32, the forward under
    autocast (full fine-tuning: float32 master weights); see factorlab.precision."""
    gradient_checkpointing: bool = False
    fsdp: bool = False
    """Shard model, gradients and optimizer state over the torchrun processes (factorlab.fsdp)."""

    def __post_init__(self) -> None:
        check_fields(self)
        check_ranges(self, positive=("r", "lr", "epochs", "batch_size"), non_negative=("seed",))
        check_precision(self.precision)

    def resolved(self, backend: Backend) -> tuple[float, int, int]:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}.")
        lr, epochs, batch = DEFAULTS["tiny" if backend.name == "tiny" else "hf"][self.method]
        lr = lr if self.lr is None else self.lr
        epochs = epochs if self.epochs is None else self.epochs
        batch = batch if self.batch_size is None else self.batch_size
        return lr, epochs, batch


def prepare(
    model: nn.Module, method: str, r: int, lora_alpha: float = 8.0, precision: str = "float32"
) -> nn.Module:
    """A trainable copy of ``model`` for ``method``: for an adapter, the base stored in ``precision``
    and every trainable weight float32; full fine-tuning keeps float32 master weights."""
    model = copy.deepcopy(model)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    return keep_trainable_float32(_adapted(store_base(model, precision), method, r, lora_alpha))


def _adapted(model: nn.Module, method: str, r: int, lora_alpha: float) -> nn.Module:
    if method == "lora":
        return adapt(model, LoraConfig(r=r, lora_alpha=lora_alpha, target_modules="all-linear"))
    if method == "compacter++":
        hidden = model.config.hidden_size
        return adapt(
            model,
            CompacterPlusPlusConfig(reduction_factor=reduction_for(hidden), train_layer_norms=True),
        )
    if method == "lora-mixer":
        return adapt(
            model, LoraMixerConfig(num_experts=4, r=r, lora_alpha=lora_alpha, target_modules="all-linear")
        )
    raise ConfigError(f"method must be one of {METHODS}, got {method!r}.")


def fine_tune(
    backend: Backend,
    world: World,
    settings: FineTuneSettings,
    progress=None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 50,
    stop_after: int | None = None,
    watch: Callable[[int, nn.Module], None] | None = None,
    watch_steps: Collection[int] = (),
) -> tuple[nn.Module, list[float]]:
    """Train on every training text for ``epochs`` epochs (causal LM loss on all tokens).

    ``watch(step, model)`` runs after each step in ``watch_steps`` (steps done), without gradients, the
    model put back in training mode after it (one process only: under torchrun it is not called).

    Each batch is packed into one row without padding where the model supports it (checked on the
    model: packed logits must equal padded ones), else padded to its longest text.

    Runs unchanged under torchrun / accelerate launch: each global batch is sharded over the
    ranks and the loss is normalised by the global token count, so the loss curve equals one
    process's with the same global batch. With ``checkpoint_dir`` it saves every
    ``checkpoint_every`` steps (rank 0 only) and resumes from the last checkpoint; the data order
    is a pure function of (seed, epoch), so a resumed run ends with the same weights as an
    uninterrupted one. ``stop_after`` stops early (to test resuming).
    """
    lr, _, batch_size = settings.resolved(backend)
    init_from_env()
    if batch_size < world_size():
        raise ConfigError(f"batch_size={batch_size} is smaller than the {world_size()} processes; raise it.")
    torch.manual_seed(settings.seed)
    # under FSDP the weights stay float32 (the sharded master copy) and FSDP computes in the precision
    stored = "float32" if settings.fsdp else settings.precision
    model = prepare(backend.model, settings.method, settings.r, settings.lora_alpha, stored)

    def optimizer(params):
        # the paper's recipe: Adam, no weight decay, constant rate; fused: one kernel for all parameters
        # (sharded DTensor parameters take the per-tensor loop)
        return torch.optim.Adam(params, lr=lr, fused=not settings.fsdp)

    # One row without padding when the model keeps packed texts apart (the same loss, fewer tokens)
    packed = packs_sequences(model, model.get_input_embeddings().num_embeddings)
    device = next(model.parameters()).device  # the backend's: batches follow the weights
    batch_for_step, steps = batches(backend, world, settings, packed, device)
    watched = set(watch_steps) if watch is not None and world_size() == 1 else set()

    def step_done(step: int) -> None:
        if progress is not None:
            progress(step)
        if step in watched:
            with torch.no_grad():
                watch(step, model)
            model.train()

    losses = run_training(
        model,
        optimizer,
        steps,
        batch_for_step,
        checkpoint_dir,
        checkpoint_every,
        step_done,
        stop_after,
        context=f"{settings.method}, lr={lr}",
        precision=settings.precision,
        gradient_checkpointing=settings.gradient_checkpointing,
        fsdp=settings.fsdp,
    )
    return model, losses


def batches(backend: Backend, world: World, settings: FineTuneSettings, packed: bool, device):
    """(step -> this rank's (inputs, labels, {}), number of steps): every training text each epoch, in an
    order that is a pure function of (seed, epoch); one row without padding when ``packed``."""
    _, epochs, batch_size = settings.resolved(backend)
    texts = world.training_texts()
    per_epoch = (len(texts) + batch_size - 1) // batch_size

    def batch_for_step(step: int):
        epoch, index = divmod(step, per_epoch)
        order = list(range(len(texts)))
        random.Random(settings.seed * 100_003 + epoch).shuffle(order)
        batch = [texts[i] for i in order[index * batch_size : (index + 1) * batch_size]]
        enc = backend.encode(batch[rank() :: world_size()])
        if packed:
            inputs, labels = pack(enc["input_ids"], enc["attention_mask"])
        else:
            inputs, labels = enc, enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        return to_device(inputs, device), to_device({"labels": labels}, device)["labels"], {}

    return batch_for_step, epochs * per_epoch


def total_steps(backend: Backend, world: World, settings: FineTuneSettings) -> int:
    _, epochs, batch_size = settings.resolved(backend)
    n = len(world.training_texts())
    return epochs * ((n + batch_size - 1) // batch_size)
