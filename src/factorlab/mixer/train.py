"""Training for the mixer lab: batches, the loop wrapper, and the two LoRA-Mixer workflows."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from factorlab.core.adapted import AdaptedModel, adapt
from factorlab.distributed import rank, world_size
from factorlab.errors import ConfigError
from factorlab.methods.lora_mixer.config import LoraMixerConfig
from factorlab.methods.lora_mixer.model import set_stage
from factorlab.mixer.tasks import Example
from factorlab.precision import store_base
from factorlab.training import DEFAULT_LOOP, LoopOptions, pack, packs_sequences, run_training


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels (loss on answer tokens only) and task_ids."""
    width = max(len(e.prompt) + len(e.answer) for e in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        seq = e.prompt + e.answer
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(e.prompt) : len(seq)] = torch.tensor(e.answer)
    task_ids = torch.tensor([e.task for e in examples])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "task_ids": task_ids}


STAGE2_SEED_OFFSET = 1
"""Stage 2 draws its batches with seed + 1, so they differ from stage 1's."""


def sample_batch(pool: Sequence[Example], seed: int, step: int, batch_size: int) -> list[Example]:
    """The global batch of ``step``: a pure function of (seed, step), so a resumed run repeats it."""
    return random.Random(seed * 100_003 + step).sample(list(pool), min(batch_size, len(pool)))


def tokens_trained(data: Sequence[Sequence[Example]], steps: int, batch_size: int, seed: int) -> int:
    """Real (unpadded) tokens that ``train`` feeds the model in ``steps`` steps (throughput numerator)."""
    pool = [e for task in data for e in task]
    return sum(
        len(e.prompt) + len(e.answer)
        for step in range(steps)
        for e in sample_batch(pool, seed, step, batch_size)
    )


def train(
    model: nn.Module,
    data: Sequence[Sequence[Example]],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    hard: bool,
    pad_id: int,
    progress=None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 100,
    supervise_routing: bool = False,
    pack_batches: bool = True,
    options: LoopOptions = DEFAULT_LOOP,
) -> list[float]:
    """AdamW on batches mixed uniformly over tasks. ``hard`` passes the task ids (stage 1);
    ``supervise_routing`` passes them as ``task_labels`` for the supervised routing term instead.
    Otherwise each batch is packed into one row without padding (``pack_batches``) where the model
    keeps packed texts apart: the same loss, fewer tokens computed.

    Runs unchanged under torchrun / accelerate launch (each global batch is sharded over the
    ranks, see factorlab.training.lm_loss); with ``checkpoint_dir`` it checkpoints on rank 0 and
    resumes. Batches are a pure function of (seed, step), so resuming reproduces the same run.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("nothing to train: no parameter requires grad.")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    pool = [e for task in data for e in task]
    # Task ids and labels are per sample, so only batches without them pack into one row (when the
    # model keeps packed texts apart): the same loss without computing on padding.
    packed = (
        pack_batches and not hard and not supervise_routing and packs_sequences(model, _vocab_size(model))
    )

    def batch_for_step(step: int):
        examples = sample_batch(pool, seed, step, batch_size)
        batch = collate(examples[rank() :: world_size()], pad_id)
        task_ids, labels = batch.pop("task_ids"), batch.pop("labels")
        if hard:
            return batch, labels, {"task_ids": task_ids}
        if supervise_routing:
            return batch, labels, {"task_labels": task_ids}
        if packed:
            return (*pack(batch["input_ids"], batch["attention_mask"], labels), {})
        return batch, labels, {}

    return run_training(
        model,
        optimizer,
        steps,
        batch_for_step,
        checkpoint_dir,
        checkpoint_every,
        progress,
        context=f"lr={lr}",
        precision=options.precision,
        gradient_checkpointing=options.gradient_checkpointing,
    )


def train_joint(
    model: nn.Module,
    data: Sequence[Sequence[Example]],
    mixer: LoraMixerConfig,
    steps: int,
    lr: float,
    router_steps: int,
    router_lr: float,
    router_data: Sequence[Sequence[Example]],
    batch_size: int = 64,
    seed: int = 0,
    pad_id: int = 0,
    progress=None,
    after_experts=None,
    options: LoopOptions = DEFAULT_LOOP,
) -> AdaptedModel:
    """Workflow 1: stage 1 trains expert e on data[e] (hard routing); stage 2 trains the routers
    (and, with ``preservation_coef > 0``, lightly tunes the experts under the preservation penalty).
    ``progress(stage, step)`` is called as training advances; ``after_experts(adapted)`` between the
    stages (the comparison scores the experts there)."""
    report = (lambda stage: lambda s: progress(stage, s)) if progress else (lambda stage: None)
    adapted = train_experts(
        model, data, mixer, steps, lr, batch_size, seed, pad_id, report("experts"), options
    )
    if after_experts is not None:
        after_experts(adapted)
    train_stage2(
        adapted, router_data, router_steps, router_lr, batch_size, seed, pad_id, report("router"), options
    )
    return adapted


def train_experts(
    model: nn.Module,
    data: Sequence[Sequence[Example]],
    mixer: LoraMixerConfig,
    steps: int,
    lr: float,
    batch_size: int = 64,
    seed: int = 0,
    pad_id: int = 0,
    progress=None,
    options: LoopOptions = DEFAULT_LOOP,
) -> AdaptedModel:
    """Stage 1: expert e trains on data[e] (hard routing: each sample goes to its task's expert)."""
    if len(data) != mixer.num_experts:
        raise ConfigError(f"{len(data)} task datasets for {mixer.num_experts} experts; give one per expert.")
    adapted = adapt(model, mixer)
    set_stage(adapted, "experts")
    train(adapted, data, steps, lr, batch_size, seed, True, pad_id, progress, options=options)
    return adapted


def train_stage2(
    adapted: AdaptedModel,
    router_data: Sequence[Sequence[Example]],
    router_steps: int,
    router_lr: float,
    batch_size: int = 64,
    seed: int = 0,
    pad_id: int = 0,
    progress=None,
    options: LoopOptions = DEFAULT_LOOP,
) -> AdaptedModel:
    """Stage 2: the routers train on a small mixed set (soft routing); with ``preservation_coef > 0`` the
    experts train too, held near their stage-1 weights. ``seed`` is the run's (see STAGE2_SEED_OFFSET)."""
    mixer = adapted.adapter_configs[adapted.active_adapter]
    set_stage(adapted, "all" if mixer.preservation_coef > 0 else "router")
    stage2_seed = seed + STAGE2_SEED_OFFSET
    return train_routers(
        adapted, router_data, router_steps, router_lr, batch_size, stage2_seed, pad_id, progress, options
    )


def train_router_on_peft(
    model: nn.Module,
    folders: Sequence[str | Path],
    router_data: Sequence[Sequence[Example]],
    steps: int,
    lr: float,
    batch_size: int = 64,
    seed: int = 0,
    pad_id: int = 0,
    names: list[str] | None = None,
    route_label_coef: float = 1.0,
    options: LoopOptions = DEFAULT_LOOP,
    **mixer_kwargs: Any,
) -> AdaptedModel:
    """Workflow 2: experts from existing PEFT LoRA folders (frozen); only the routers train.
    ``router_data[e]`` holds expert e's task, so the labels are there and the supervised routing term
    is on by default (``route_label_coef=1``, ours, as in the recipes; 0 gives the paper's losses)."""
    config = LoraMixerConfig.from_peft_adapters(
        list(folders), names, route_label_coef=route_label_coef, **mixer_kwargs
    )
    adapted = adapt(store_base(model, options.precision), config)
    return train_routers(adapted, router_data, steps, lr, batch_size, seed, pad_id, options=options)


def train_routers(
    adapted: AdaptedModel,
    router_data: Sequence[Sequence[Example]],
    steps: int,
    lr: float,
    batch_size: int = 64,
    seed: int = 0,
    pad_id: int = 0,
    progress=None,
    options: LoopOptions = DEFAULT_LOOP,
) -> AdaptedModel:
    """The plug-and-play training: soft routing over the mixed set, task labels supervising the routers
    when ``route_label_coef > 0``. Whatever the adapter leaves trainable trains (from PEFT folders:
    the routers only)."""
    mixer = adapted.adapter_configs[adapted.active_adapter]
    supervise = mixer.route_label_coef > 0
    train(
        adapted,
        router_data,
        steps,
        lr,
        batch_size,
        seed,
        False,
        pad_id,
        progress,
        supervise_routing=supervise,
        options=options,
    )
    return adapted


def _vocab_size(model: nn.Module) -> int:
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    return getattr(embeddings, "num_embeddings", 2)
