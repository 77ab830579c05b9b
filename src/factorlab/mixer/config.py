"""One multi-task comparison: its config (with the quick and smollm2 presets) and its base model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from factorlab.errors import ConfigError
from factorlab.methods.compacter.config import PAPER_LR
from factorlab.methods.lora_mixer.config import PRESERVATION_COEF, LoraMixerConfig
from factorlab.mixer.tasks import SyntheticTasks
from factorlab.models import resolve_model_path
from factorlab.precision import check_precision
from factorlab.training import LoopOptions
from factorlab.validation import check_fields, check_ranges

PEERS = {"HydraLoRA": 0, "MixLoRA": 0, "LoRAHub": 1, "MoLE": 1, "Arrow": 1}
"""Peers of LoRA-Mixer that ``mixer run --peers`` adds (issue 34), each a unit of the phase given: those
trained from scratch join the first, those built on the experts the second."""

SKIPPABLE = ("full", "multi-task LoRA", "Compacter++", "X-LoRA", "base", "plug")
"""Units of the comparison that ``skip`` may leave out (the experts and the joint mixer always run)."""


@dataclass
class MixerExperimentConfig:
    """One multi-task comparison. Defaults are the quick preset."""

    preset: str = "quick"
    tasks: list[str] = field(default_factory=lambda: ["first", "last", "max", "min"])
    model: str = "tiny"
    """"tiny" (quick preset's random tiny Llama), "smollm2", or a local causal-LM folder."""
    seeds: list[int] = field(default_factory=lambda: [0])
    r: int = 2
    lora_alpha: float = 4
    target_modules: list[str] | None = None
    """None: LoRA-Mixer's default, the attention input and output projections (same for the single LoRA)."""
    lr: float = 3e-3
    steps: int = 1500
    """Training steps of the single LoRA and of stage 1 (all experts at once, hard routing)."""
    router_lr: float = 1e-2
    router_steps: int = 600
    router_examples_per_task: int = 500
    """Size of stage 2's small mixed set, per task."""
    train_examples_per_task: int = 4000
    eval_examples_per_task: int = 512
    batch_size: int = 64
    top_k: int = 3
    """Experts per token at inference (top-k routing; the paper's K = 3, at most the task count)."""
    preservation_coef: float = PRESERVATION_COEF
    """beta of stage 2's preservation penalty; experts train beside the routers when > 0."""
    balance_coef: float = 0.01
    specialization_coef: float = 0.1
    route_label_coef: float = 1.0
    """Ours: the supervised routing term while the routers train, since every recipe here has task
    labels (0: the paper's losses only; on SmolLM2 they leave two of four tasks unrouted, see README)."""
    compacter_lr: float = PAPER_LR
    """Compacter++ (multi-task) learning rate."""
    full_lr: float = 1e-3
    """Full fine-tuning (multi-task) learning rate."""
    full_seeds: list[int] | None = None
    """Seeds on which full fine-tuning runs (None: every seed); the smollm2 preset runs the first only."""
    max_new_tokens: int = 1
    precision: str = "float32"
    """"float32", "bfloat16" or "float16" for every system's training (factorlab.precision): the base
    stored in it, adapters float32, full fine-tuning with float32 master weights."""
    gradient_checkpointing: bool = False
    lorahub_budget: int = 40
    """LoRAHub's loss evaluations (the original's default)."""
    lorahub_examples_per_task: int = 5
    """Examples per task in LoRAHub's objective (the original: 5 of the target task), the first of the
    router set, so it sees a subset of what the routed systems train on."""
    peers: list[str] = field(default_factory=list)
    """Mixture-of-LoRA peers run beside the comparison, from the same frozen experts (``PEERS``); like
    ``seeds`` they only choose which cells exist."""
    skip: list[str] = field(default_factory=list)
    """Baselines left out of this run (``SKIPPABLE``): their cells are not run and their rows are absent
    from the table; every other cell keeps its id. The experts and the joint LoRA-Mixer always run."""

    def __post_init__(self) -> None:
        check_fields(self)
        unknown = [p for p in self.peers if p not in PEERS]
        if unknown:
            raise ConfigError(f"unknown peer(s) {unknown}; peers: {', '.join(PEERS)}.")
        unknown = [u for u in self.skip if u not in SKIPPABLE]
        if unknown:
            raise ConfigError(f"cannot skip {unknown}; skippable baselines: {', '.join(SKIPPABLE)}.")
        check_precision(self.precision)
        for name in ("tasks", "seeds"):
            if not getattr(self, name):
                raise ConfigError(f"give at least one of {name}.")
        check_ranges(
            self,
            positive=(
                "r",
                "steps",
                "router_steps",
                "router_examples_per_task",
                "train_examples_per_task",
                "eval_examples_per_task",
                "batch_size",
                "top_k",
                "max_new_tokens",
                "lr",
                "router_lr",
                "compacter_lr",
                "full_lr",
                "lora_alpha",
                "lorahub_budget",
                "lorahub_examples_per_task",
            ),
            non_negative=("balance_coef", "specialization_coef", "preservation_coef", "route_label_coef"),
        )
        # Names and paths are checked here, not in a grid worker, so a typo is one line before any work.
        if self.model == "tiny":
            SyntheticTasks(self.tasks)
        else:
            resolve_model_path(self.model)

    def loop_options(self) -> LoopOptions:
        return LoopOptions(self.precision, self.gradient_checkpointing)

    def mixer_config(self) -> LoraMixerConfig:
        """One expert per task (named after it), soft routing, this experiment's routing loss."""
        return LoraMixerConfig(
            experts=[{"name": n, "r": self.r, "lora_alpha": self.lora_alpha} for n in self.tasks],
            target_modules=self.target_modules,
            routing="soft",
            top_k=min(self.top_k, len(self.tasks)),
            balance_coef=self.balance_coef,
            specialization_coef=self.specialization_coef,
            preservation_coef=self.preservation_coef,
            route_label_coef=self.route_label_coef,
        )

    @classmethod
    def preset_config(cls, name: str, **overrides: Any) -> MixerExperimentConfig:
        if name == "quick":
            base = cls()
        elif name == "smollm2":
            base = cls(
                preset="smollm2",
                model="smollm2",
                # arithmetic, counting, logic, conversion: short exact answers (GYM_TASK_OPTIONS)
                tasks=["basic_arithmetic", "letter_counting", "syllogism", "base_conversion"],
                r=8,
                lora_alpha=16,
                lr=1e-3,
                steps=400,
                router_lr=5e-3,
                router_steps=100,
                router_examples_per_task=400,  # 1,600 mixed samples (the paper's LoRAHub setting: <= 2k)
                train_examples_per_task=400,
                eval_examples_per_task=200,
                batch_size=8,
                max_new_tokens=9,  # <= 8 answer tokens and the end-of-turn token
                compacter_lr=2e-3,  # as the SmolLM2 fact-injection grid (factorlab.inject.train)
                full_lr=3e-5,
                full_seeds=[0],  # ~2x a LoRA cell's time; the issue allows one seed
            )
        else:
            raise ConfigError(f"unknown preset {name!r}; choose quick or smollm2.")
        return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


def build_base(cfg: MixerExperimentConfig, tasks, seed: int) -> nn.Module:
    if cfg.model == "tiny":
        import transformers as tf

        torch.manual_seed(seed)
        config = tf.LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=tasks.vocab_size,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        return tf.LlamaForCausalLM(config).eval()
    from factorlab.models import load_causal_lm

    return load_causal_lm(cfg.model)[0]
