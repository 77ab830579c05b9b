"""Multi-task data for LoRA-Mixer: synthetic tasks with their own symbols (the quick preset) and
reasoning-gym tasks graded by their own scorers (the smollm2 preset)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from factorlab.errors import ConfigError


@dataclass
class Example:
    prompt: list[int]
    answer: list[int]
    task: int
    meta: Any = None


class SyntheticTasks:
    """Tiny tasks with single-token answers; task k uses its own symbols and its own separator,
    so the router can tell tasks apart token by token."""

    RULES: ClassVar[dict] = {
        "first": lambda x: x[:, 0],
        "last": lambda x: x[:, -1],
        "max": lambda x: x.max(1).values,
        "min": lambda x: x.min(1).values,
        "second": lambda x: x[:, 1],
        "sum_mod": lambda x: x.sum(1),
    }

    def __init__(self, names: Sequence[str], symbols: int = 10, length: int = 6):
        unknown = [n for n in names if n not in self.RULES]
        if unknown:
            raise ConfigError(f"unknown synthetic task(s) {unknown}; choose from {sorted(self.RULES)}.")
        self.names, self.symbols, self.length = list(names), symbols, length
        self.vocab_size = len(names) * symbols + len(names)  # symbols, then one separator per task

    def examples(self, task: int, n: int, seed: int, exclude: Sequence[Example] = ()) -> list[Example]:
        """``n`` seeded examples of ``task`` whose prompts are not in ``exclude`` (a held-out set)."""
        g = torch.Generator().manual_seed(seed * 1009 + task)
        draw = n + len(exclude)  # enough to replace every excluded prompt
        x = torch.randint(0, self.symbols, (draw, self.length), generator=g)
        y = self.RULES[self.names[task]](x) % self.symbols
        offset, sep = task * self.symbols, len(self.names) * self.symbols + task
        drawn = [Example([*(row + offset).tolist(), sep], [int(a) + offset], task) for row, a in zip(x, y)]
        return _without(drawn, exclude)[:n]

    def score(self, example: Example, predicted: list[int]) -> float:
        return float(predicted[:1] == example.answer[:1])


# Task options that keep every answer short and exact (<= 8 SmolLM2 tokens): arithmetic of at most
# three two-digit terms without division or parentheses; base conversion of values below 256.
GYM_TASK_OPTIONS: dict[str, dict[str, Any]] = {
    "basic_arithmetic": {
        "max_terms": 3,
        "max_digits": 2,
        "operators": ("+", "-", "*"),
        "allow_parentheses": False,
    },
    "base_conversion": {"max_value": 255},
}


class GymTasks:
    """reasoning-gym tasks as chat prompts -> short exact answers, graded by each dataset's own scorer.

    Prompts use the tokenizer's chat template when it has one (SmolLM2-Instruct's), else
    "Question: ...\nAnswer:". Questions are distinct within a set and never in ``exclude``; an answer
    longer than ``max_answer_tokens`` is an error (never silently cut)."""

    def __init__(self, names: Sequence[str], tokenizer, max_answer_tokens: int = 8, options=None):
        try:
            import reasoning_gym  # noqa: F401
        except ImportError:
            raise ConfigError("the smollm2 preset needs reasoning-gym: pip install reasoning-gym") from None
        self.names, self.tokenizer, self.max_answer_tokens = list(names), tokenizer, max_answer_tokens
        self.options = {**GYM_TASK_OPTIONS, **(options or {})}

    def prompt(self, question: str) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
            )
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(f"Question: {question}\nAnswer:")["input_ids"]

    def examples(self, task: int, n: int, seed: int, exclude: Sequence[Example] = ()) -> list[Example]:
        import reasoning_gym

        name = self.names[task]
        taken = {e.meta[1]["question"] for e in exclude if e.meta is not None}
        size = 2 * n + len(taken) + 16  # duplicates and excluded questions are skipped
        dataset = reasoning_gym.create_dataset(
            name, size=size, seed=seed * 1009 + task, **self.options.get(name, {})
        )
        out = []
        for entry in dataset:
            if entry["question"] in taken:
                continue
            taken.add(entry["question"])
            answer = self.tokenizer(str(entry["answer"]), add_special_tokens=False)["input_ids"]
            if len(answer) > self.max_answer_tokens:
                raise ConfigError(
                    f"{name}: the answer {entry['answer']!r} has {len(answer)} tokens, more than "
                    f"max_answer_tokens={self.max_answer_tokens}; pick a task with short answers or "
                    "options that keep them short (GYM_TASK_OPTIONS)."
                )
            out.append(
                Example(
                    self.prompt(entry["question"]),
                    [*answer, self.tokenizer.eos_token_id],
                    task,
                    (dataset, entry),
                )
            )
            if len(out) == n:
                return out
        raise ConfigError(f"{name} gave only {len(out)} distinct questions of the {n} asked (seed {seed}).")

    def score(self, example: Example, predicted: list[int]) -> float:
        dataset, entry = example.meta
        text = self.tokenizer.decode(predicted, skip_special_tokens=True).strip()
        return float(dataset.score_answer(text, entry) >= 1.0)


def _without(examples: list[Example], exclude: Sequence[Example]) -> list[Example]:
    taken = {tuple(e.prompt) for e in exclude}
    return [e for e in examples if tuple(e.prompt) not in taken]


def train_and_eval_sets(tasks, n_train: int, n_eval: int, seed: int) -> tuple[list, list]:
    """Per task: ``n_train`` training examples (seed) and ``n_eval`` held-out ones (seed 10,000 + seed)
    whose prompts never occur in training."""
    data = [tasks.examples(k, n_train, seed) for k in range(len(tasks.names))]
    evals = [tasks.examples(k, n_eval, 10_000 + seed, exclude=data[k]) for k in range(len(tasks.names))]
    return data, evals


def make_tasks(cfg: Any):
    """(tasks, pad id) for an experiment config (factorlab.mixer.config.MixerExperimentConfig: its
    ``model`` and ``tasks``); typed loosely because the config module builds on this one."""
    if cfg.model == "tiny":
        return SyntheticTasks(cfg.tasks), 0
    from factorlab.models import load_causal_lm

    tokenizer = load_causal_lm(cfg.model)[1]
    return GymTasks(cfg.tasks, tokenizer), tokenizer.pad_token_id
