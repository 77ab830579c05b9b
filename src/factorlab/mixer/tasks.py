"""Multi-task data for LoRA-Mixer: synthetic tasks with their own symbols (the quick preset) and
reasoning-gym tasks graded by their own scorers (the smollm2 preset)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from factorlab.errors import ConfigError

if TYPE_CHECKING:
    from factorlab.mixer.config import MixerExperimentConfig


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

    def examples(self, task: int, n: int, seed: int) -> list[Example]:
        g = torch.Generator().manual_seed(seed * 1009 + task)
        x = torch.randint(0, self.symbols, (n, self.length), generator=g)
        y = self.RULES[self.names[task]](x) % self.symbols
        offset, sep = task * self.symbols, len(self.names) * self.symbols + task
        return [Example([*(row + offset).tolist(), sep], [int(a) + offset], task) for row, a in zip(x, y)]

    def score(self, example: Example, predicted: list[int]) -> float:
        return float(predicted[:1] == example.answer[:1])


class GymTasks:
    """reasoning-gym tasks as prompt -> answer text, graded by each dataset's own scorer."""

    def __init__(self, names: Sequence[str], tokenizer, max_answer_tokens: int = 24):
        try:
            import reasoning_gym  # noqa: F401
        except ImportError:
            raise ConfigError("the smollm2 preset needs reasoning-gym: pip install reasoning-gym") from None
        self.names, self.tokenizer, self.max_answer_tokens = list(names), tokenizer, max_answer_tokens
        self._datasets: dict[tuple[int, int, int], Any] = {}

    def examples(self, task: int, n: int, seed: int) -> list[Example]:
        import reasoning_gym

        dataset = reasoning_gym.create_dataset(self.names[task], size=n, seed=seed * 1009 + task)
        self._datasets[(task, seed, n)] = dataset
        out = []
        for entry in dataset:
            prompt = self.tokenizer(f"Question: {entry['question']}\nAnswer:")["input_ids"]
            answer = self.tokenizer(f" {entry['answer']}")["input_ids"][: self.max_answer_tokens]
            out.append(Example(prompt, [*answer, self.tokenizer.eos_token_id], task, (dataset, entry)))
        return out

    def score(self, example: Example, predicted: list[int]) -> float:
        dataset, entry = example.meta
        text = self.tokenizer.decode(predicted, skip_special_tokens=True).strip()
        return float(dataset.score_answer(text, entry) >= 1.0)


def make_tasks(cfg: MixerExperimentConfig):
    if cfg.model == "tiny":
        return SyntheticTasks(cfg.tasks), 0
    from factorlab.models import load_causal_lm

    tokenizer = load_causal_lm(cfg.model)[1]
    return GymTasks(cfg.tasks, tokenizer), tokenizer.pad_token_id
