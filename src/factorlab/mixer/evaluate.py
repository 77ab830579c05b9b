"""Evaluation for the mixer lab: greedy generation with the KV cache, accuracy by each task's scorer,
and the routing report (usage per task and expert, router accuracy)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from factorlab.core.adapted import AdaptedModel
from factorlab.methods.lora_mixer.model import routing_weights_per_sample
from factorlab.mixer.tasks import Example
from factorlab.mixer.train import collate
from factorlab.training import logits_at


@torch.no_grad()
def predict(
    model: nn.Module,
    examples: Sequence[Example],
    pad_id: int,
    task_ids: torch.Tensor | None = None,
    max_new_tokens: int = 1,
    batch_size: int = 128,
) -> list[list[int]]:
    """Greedy answers. Single-token answers come from one forward; longer ones from generate() with the
    KV cache, or, for a model whose config turns the cache off, from a loop that drops finished texts."""
    model.eval()
    out: list[list[int]] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        kwargs = {} if task_ids is None else {"task_ids": task_ids[start : start + batch_size]}
        if max_new_tokens == 1:
            batch = collate([dataclasses.replace(e, answer=[]) for e in chunk], pad_id)
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs
            ).logits
            last = batch["attention_mask"].sum(1) - 1
            out += [[int(t)] for t in logits[torch.arange(len(chunk)), last].argmax(-1)]
        elif not bool(getattr(getattr(model, "config", None), "use_cache", True)):
            out += _greedy_without_cache(model, [e.prompt for e in chunk], pad_id, max_new_tokens, **kwargs)
        else:
            padded = _left_padded([e.prompt for e in chunk], pad_id)
            width = padded["input_ids"].shape[1]
            generated = model.generate(
                input_ids=padded["input_ids"],
                attention_mask=padded["attention_mask"],
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                **kwargs,
            )
            out += [row[width:].tolist() for row in generated]
    return out


def _left_padded(prompts: Sequence[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _greedy_without_cache(
    model: nn.Module, prompts: Sequence[list[int]], pad_id: int, max_new_tokens: int, **kwargs
) -> list[list[int]]:
    """Greedy decoding for models that cannot keep a KV cache (X-LoRA): every step re-reads each text,
    so a text leaves the batch as soon as it ends (generate() would keep computing it, padded)."""
    stops = model.generation_config.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops]) - {None}
    texts = [list(p) for p in prompts]
    answers: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    for _ in range(max_new_tokens):
        if not active:
            break
        forward = {k: v[active] for k, v in kwargs.items()}  # per-sample inputs (task ids)
        logits = model(**_left_padded([texts[i] for i in active], pad_id), **forward).logits[:, -1]
        for i, token in zip(list(active), logits.argmax(-1).tolist()):
            texts[i].append(token)
            answers[i].append(token)
            if token in stops:
                active.remove(i)
    return answers


def accuracy(
    model,
    tasks,
    examples: Sequence[Example],
    pad_id: int,
    hard: bool = False,
    max_new_tokens: int = 1,
    tokens: dict[str, int] | None = None,
) -> float:
    """Share of ``examples`` answered right (greedy). ``tokens``, if given, is increased by the prompt
    tokens read ("prompt") and the answer tokens generated ("generated")."""
    task_ids = torch.tensor([e.task for e in examples]) if hard else None
    predictions = predict(model, examples, pad_id, task_ids, max_new_tokens)
    if tokens is not None:
        tokens["prompt"] = tokens.get("prompt", 0) + sum(len(e.prompt) for e in examples)
        tokens["generated"] = tokens.get("generated", 0) + sum(len(p) for p in predictions)
    return sum(tasks.score(e, p) for e, p in zip(examples, predictions)) / len(examples)


@torch.no_grad()
def routing_report(mixer: AdaptedModel, evals: Sequence[Sequence[Example]], pad_id: int):
    """(mean routing weight per (task, expert), router accuracy, router accuracy per task): accuracy is
    the share of samples whose most used expert is their own task's expert."""
    usage, per_task = [], []
    for k, examples in enumerate(evals):
        batch = collate([dataclasses.replace(e, answer=[]) for e in examples], pad_id)
        weights = routing_weights_per_sample(
            mixer, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        )
        usage.append(weights.mean(0))
        per_task.append(float((weights.argmax(-1) == k).float().mean()))
    total = sum(len(e) for e in evals)
    overall = sum(acc * len(e) for acc, e in zip(per_task, evals)) / total
    return torch.stack(usage), overall, per_task


@torch.no_grad()
def answer_loss(model: nn.Module, examples: Sequence[Example], pad_id: int, chunk: int = 64) -> float:
    """Mean cross-entropy over the answer tokens of ``examples`` (the training loss, without gradients)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), chunk):
        batch = collate(examples[start : start + chunk], pad_id)
        labels = batch["labels"]
        targets = labels[:, 1:]
        predicts = targets != -100
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = predicts  # the head runs only where an answer token is predicted
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        logits = logits_at(model, model, keep, **inputs)
        total += float(torch.nn.functional.cross_entropy(logits.float(), targets[predicts], reduction="sum"))
        count += int(predicts.sum())
    return total / max(count, 1)
