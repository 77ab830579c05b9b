"""Training OCR models: many runs at once.

Runs whose models have the same shapes and optimiser settings (they may differ in seed and in
association) are trained as ONE batched model: their weights are stacked along a leading run
dimension and every step is a few batched matmuls. Each run still sees exactly the data, initial
weights and AdamW updates it would see alone (AdamW is elementwise; each run's loss is its own
mean), so batched and one-at-a-time training give the same numbers up to float rounding.

Groups of different shapes run in parallel as grid cells (factorlab.grid, via the sweep recipe).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from factorlab.errors import ConfigError, TrainingDivergedError
from factorlab.ocr.model import INITS, PARAMETRIZATIONS, BatchedAttentionOnly, attention_step
from factorlab.ocr.task import SPLITS, OCRTaskConfig, OCRWorld
from factorlab.runtime import check_memory, generator

OPTIMIZERS = ("adamw", "gd")
DATA_CHUNK_STEPS = 100  # batches generated per call; fixed so every run's data stream is the same
EVAL_SAMPLES_PER_SUBJECT = 8


@dataclass(frozen=True)
class OCRConfig(OCRTaskConfig):
    """One OCR training run. Defaults follow the official code's two scripts (OCR-Theory ``scripts/``):

    * both scripts: batch 252, lr 5e-3, weight decay 0.03, 80 names / 20 cities / 20 animals / 5 noise
      tokens, d = 128, sequence length 16, EOS, train/test split 0.25, linear attention, one head;
    * ``steps=2000`` from ``train_attn1_1heads.sh`` (which trains the *combined* model
      (``--reparameterize_ov``) with ``identity`` init, i.e. ``param="combined", init="identity"`` here);
    * ``param="factorized"``, ``init="default"`` from ``sweep_rank_attn1_1heads.sh`` (factorized,
      d_h in 3..128, default init), whose 20,000 steps are ``ocr sweep``'s default.
    """

    param: str = "factorized"
    """"factorized" (W_O W_V^T) or "combined" (one W_OV)."""
    d_h: int | None = None
    """Inner dimension of the factorized W_O W_V^T; None means d (the vocabulary size, 128)."""
    steps: int = 2000
    batch_size: int = 252
    lr: float = 5e-3
    weight_decay: float = 0.03
    init: str = "default"
    """"default": N(0, 1/d) weights; "identity": the paper's 1e-4 init."""
    seed: int = 42
    # groups, subjects_per_group, train_fraction, noise_tokens, seq_len, association: OCRTaskConfig's
    eval_every: int | None = None
    """Steps between evaluations; None means steps // 50 (at least 1)."""
    fixed_attention: bool = False
    """Freeze attention to score 1 on the subject and relation tokens only (the paper's Theorem 1)."""
    optimizer: str = "adamw"
    """"adamw" (the paper's code) or "gd": plain gradient descent (no momentum; set weight_decay=0 for
    the gradient-flow setting of Theorem 1), on the same fresh batches."""
    record_w_ov: bool = False
    """Keep W_OV at every evaluation (RunResult.w_ov_history), e.g. for cosine trajectories."""

    def __post_init__(self) -> None:
        super().__post_init__()  # the task's fields
        task = self.task
        if self.param not in PARAMETRIZATIONS:
            raise ConfigError(f"param must be one of {PARAMETRIZATIONS}, got {self.param!r}.")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {INITS}, got {self.init!r}.")
        if self.d_h is not None and self.d_h < 1:
            raise ConfigError(f"d_h must be >= 1 (the inner dimension of W_O W_V^T), got {self.d_h}.")
        if self.d_h is not None and self.param == "combined" and self.d_h != task.vocab_size:
            raise ConfigError(
                f"d_h={self.d_h} only applies to param='factorized'; the combined W_OV is d x d "
                f"(d={task.vocab_size}). Leave d_h unset for combined runs."
            )
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}.")
        if self.batch_size < 3 or self.batch_size % 3:
            raise ConfigError(
                f"batch_size={self.batch_size} must split into three equal parts (train facts, train "
                f"implications, test facts): use a positive multiple of 3, e.g. "
                f"{3 * max(1, round(self.batch_size / 3))}."
            )
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ConfigError(f"lr must be a positive number, got {self.lr}.")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}.")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}.")
        if self.eval_every is not None and self.eval_every < 1:
            raise ConfigError(f"eval_every must be >= 1, got {self.eval_every}.")

    @property
    def task(self) -> OCRTaskConfig:
        return OCRTaskConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(OCRTaskConfig)})

    @property
    def hidden_dim(self) -> int:
        """d_h actually used: d for combined runs and when d_h is unset."""
        d = self.task.vocab_size
        return d if self.param == "combined" or self.d_h is None else self.d_h

    @property
    def eval_interval(self) -> int:
        return self.eval_every or max(1, self.steps // 50)

    @property
    def label(self) -> str:
        """Short human name of the model configuration (seed and association excluded)."""
        if self.param == "combined":
            return "combined"
        return f"factorized d_h={self.hidden_dim}"

    def batch_key(self) -> tuple:
        """Runs with equal keys train as one batched model: everything but seed and association."""
        fields = [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)]
        shared = [(name, value) for name, value in fields if name not in ("seed", "association", "d_h")]
        return (*shared, ("hidden_dim", self.hidden_dim))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["d_h"] = self.hidden_dim
        out["vocab_size"] = self.task.vocab_size
        out["eval_every"] = self.eval_interval
        return out


@dataclass
class RunResult:
    config: OCRConfig
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    w_ov: torch.Tensor | None = None  # final effective W_OV (d, d)
    w_kq: torch.Tensor | None = None  # final W_KQ (d, d)
    w_ov_history: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # with record_w_ov


ProgressFn = Callable[[int], None]  # called with the number of steps done


def check_group_memory(configs: Sequence[OCRConfig]) -> None:
    """Refuse a batched group whose tensors would not fit in memory, before anything is allocated."""
    cfg = configs[0]
    d, d_h = cfg.task.vocab_size, cfg.hidden_dim
    # per run: W_KQ (d x d), W_O and W_V (d x d_h) or W_OV (d x d), each with its gradient and two Adam
    # moments, the product W_O W_V^T and the evaluation's logits (float32); the evaluation set's and a
    # chunk of batches' token ids (int64)
    weights = d * d + (2 * d * d_h if cfg.param == "factorized" else d * d)
    ids = (DATA_CHUNK_STEPS * cfg.batch_size + 4 * EVAL_SAMPLES_PER_SUBJECT * cfg.task.num_subjects) * (
        cfg.task.seq_len
    )
    check_memory(
        len(configs) * (4 * (4 * weights + 2 * d * d + cfg.task.num_subjects * d) + 8 * ids),
        f"training {len(configs)} OCR model(s) with a vocabulary of {d:,}",
        "lower --groups / --subjects-per-group / --noise-tokens (the vocabulary), --d-h, --batch-size or "
        "--seq-len",
    )


def train_batched(configs: Sequence[OCRConfig], progress: ProgressFn | None = None) -> list[RunResult]:
    """Train runs that share a batch key as one batched model. Returns results in input order."""
    if not configs:
        return []
    key = configs[0].batch_key()
    for c in configs[1:]:
        if c.batch_key() != key:
            raise ConfigError("train_batched needs runs that differ only in seed and association.")
    cfg = configs[0]
    check_group_memory(configs)
    started = time.perf_counter()
    worlds = [OCRWorld(c.task, c.seed) for c in configs]
    world0 = worlds[0]
    attention_tokens = None
    if cfg.fixed_attention:
        attention_tokens = torch.cat(
            [world0.subjects, torch.tensor([world0.fact_relation, world0.implication_relation])]
        )
    model = BatchedAttentionOnly(
        cfg.task.vocab_size, cfg.param, cfg.hidden_dim, [c.seed for c in configs], cfg.init, attention_tokens
    )
    # A sequence holds only input tokens (never an answer) and ends with EOS, so training reads and
    # changes only the slices of the weights those tokens reach: W_KQ[:, inputs, EOS], W_V's input
    # rows, W_OV's input columns (W_O whole). Each slice trains as its own compact tensor; the rest
    # of a weight gets no gradient, so AdamW (or GD) only decays it, by 1 - lr * weight_decay a step,
    # applied in one multiplication whenever the whole weights are read (evaluations, the end).
    inputs, query = world0.input_tokens, world0.eos
    everything = slice(None)
    slices = {"w_kq": (everything, inputs, query)} if model.w_kq.requires_grad else {}
    if cfg.param == "factorized":
        slices["w_v"] = (everything, inputs)
    else:
        slices["w_ov"] = (everything, everything, inputs)
    trained = {name: getattr(model, name).detach()[index].clone() for name, index in slices.items()}
    step_weights = {"kq": trained.get("w_kq", model.w_kq[everything, inputs, query])}
    if cfg.param == "factorized":
        step_weights |= {"w_o": model.w_o, "w_v": trained["w_v"]}
    else:
        step_weights["w_ov"] = trained["w_ov"]
    for tensor in trained.values():
        tensor.requires_grad_(True)
    optimizer = _optimizer([t for t in step_weights.values() if t.requires_grad], cfg)
    undecayed_steps = 0

    @torch.no_grad()
    def sync_weights() -> None:
        nonlocal undecayed_steps
        for name, index in slices.items():
            weight = getattr(model, name)
            weight.mul_((1 - cfg.lr * cfg.weight_decay) ** undecayed_steps)
            weight[index] = trained[name]
        undecayed_steps = 0

    evaluations = [w.evaluation_set(EVAL_SAMPLES_PER_SUBJECT) for w in worlds]
    eval_tokens = torch.stack([e.tokens for e in evaluations])

    # One data stream per seed: runs with the same seed (e.g. causal and spurious) share it.
    data_gens = {c.seed: generator(c.seed, "training-data") for c in configs}
    results = [RunResult(c) for c in configs]
    loss_sum = torch.zeros(len(configs))
    loss_count = 0
    interval = cfg.eval_interval

    def evaluate(step: int) -> None:
        nonlocal loss_sum, loss_count
        if not torch.isfinite(loss_sum).all():  # checked here, not every step: no per-step host sync
            bad = [
                f"{c.label} seed={c.seed}" for c, v in zip(configs, loss_sum.tolist()) if not math.isfinite(v)
            ]
            raise TrainingDivergedError(
                f"non-finite training loss at or before step {step} for {', '.join(bad)}; "
                f"lower the learning rate (lr={cfg.lr}) or use init='identity'."
            )
        train_loss = (loss_sum / loss_count).tolist() if loss_count else [None] * len(configs)
        sync_weights()
        metrics = _evaluate(model, eval_tokens, evaluations)
        for r, result in enumerate(results):
            row = {"step": step, "train_loss": train_loss[r], **metrics[r]}
            result.history.append(row)
        if cfg.record_w_ov:
            with torch.no_grad():
                w_ov = model.effective_w_ov()
            for r, result in enumerate(results):
                result.w_ov_history.append((step, w_ov[r].detach().clone()))
        loss_sum, loss_count = torch.zeros(len(configs)), 0

    evaluate(0)
    step = 0
    R = len(configs)
    tokens = torch.empty(DATA_CHUNK_STEPS, R, cfg.batch_size, cfg.task.seq_len, dtype=torch.long)
    labels = torch.empty(DATA_CHUNK_STEPS, R, cfg.batch_size, dtype=torch.long)
    while step < cfg.steps:
        chunk = min(DATA_CHUNK_STEPS, cfg.steps - step)
        # Every run generates whole chunks of DATA_CHUNK_STEPS, so a stream does not depend on steps.
        # Spurious worlds only relabel test implications, which never appear in training data, so
        # runs with the same seed share one stream's batches.
        first_run_of_seed: dict[int, int] = {}
        for r, (c, world) in enumerate(zip(configs, worlds)):
            if c.seed in first_run_of_seed:
                same = first_run_of_seed[c.seed]
                tokens[:, r], labels[:, r] = tokens[:, same], labels[:, same]
            else:
                first_run_of_seed[c.seed] = r
                out = (tokens[:, r], labels[:, r])
                world.training_batches(
                    DATA_CHUNK_STEPS, cfg.batch_size, data_gens[c.seed], out, input_numbers=True
                )
        for i in range(chunk):  # tokens are input numbers: positions in world.input_tokens
            per_run = attention_step(tokens[i], labels[i], **step_weights)  # gradients written, no graph
            optimizer.step()
            loss_sum += per_run
            loss_count += 1
            step += 1
            undecayed_steps += 1
            if step % interval == 0 or step == cfg.steps:
                evaluate(step)
                if progress is not None:
                    progress(step)

    seconds = time.perf_counter() - started
    sync_weights()  # a no-op after the final evaluation, which syncs too
    with torch.no_grad():
        w_ov = model.effective_w_ov()
    for r, result in enumerate(results):
        result.w_ov = w_ov[r].detach().clone()
        result.w_kq = model.w_kq[r].detach().clone()
        result.summary = _summarize(result, seconds, len(configs))
    return results


class FusedAdamW:
    """``torch.optim.AdamW(fused=True)``'s update (its defaults: betas 0.9/0.999, eps 1e-8), calling
    the same fused kernel directly: the generic optimizer's per-step Python cost a tenth of an OCR
    step. The kernel is elementwise, so batched runs still update exactly as they would alone.
    ``tests/test_ocr_train.py`` checks it equals torch.optim.AdamW bit for bit."""

    def __init__(self, params: list[torch.Tensor], lr: float, weight_decay: float):
        self.params = params
        self.lr, self.weight_decay = lr, weight_decay
        self.exp_avgs = [torch.zeros_like(p) for p in params]
        self.exp_avg_sqs = [torch.zeros_like(p) for p in params]
        self.steps = [torch.zeros((), dtype=torch.float32) for _ in params]

    @torch.no_grad()
    def step(self) -> None:
        torch._foreach_add_(self.steps, 1)
        torch._fused_adamw_(
            self.params,
            [p.grad for p in self.params],
            self.exp_avgs,
            self.exp_avg_sqs,
            [],
            self.steps,
            amsgrad=False,
            lr=self.lr,
            beta1=0.9,
            beta2=0.999,
            weight_decay=self.weight_decay,
            eps=1e-8,
            maximize=False,
            grad_scale=None,
            found_inf=None,
        )


def _optimizer(params: list[torch.Tensor], cfg: OCRConfig):
    if cfg.optimizer == "gd":  # elementwise too, so batched runs still update as they would alone
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.0, weight_decay=cfg.weight_decay)
    return FusedAdamW(params, cfg.lr, cfg.weight_decay)


@torch.no_grad()
def _evaluate(model: BatchedAttentionOnly, eval_tokens: torch.Tensor, evaluations) -> list[dict[str, Any]]:
    logits = model(eval_tokens)  # (R, M, d)
    prediction = logits.argmax(-1)
    log_probs = logits.log_softmax(-1)
    singular = torch.linalg.svdvals(model.effective_w_ov())  # (R, d)
    out = []
    for r, ev in enumerate(evaluations):
        row: dict[str, Any] = {}
        correct = prediction[r] == ev.labels
        nll = -log_probs[r].gather(1, ev.labels.unsqueeze(1)).squeeze(1)
        for split_id, split in enumerate(SPLITS):
            mask = ev.split == split_id
            row[f"{split}_acc"] = correct[mask].float().mean().item()
            row[f"{split}_loss"] = nll[mask].mean().item()
        test_impl = ev.split == SPLITS.index("test_impl")
        says_group = prediction[r][test_impl] == ev.group_labels[test_impl]
        row["group_impl_rate"] = says_group.float().mean().item()
        differs = ev.labels[test_impl] != ev.group_labels[test_impl]
        # Hallucination: answering with the group's implication where the truth differs from it.
        row["hallucination_rate"] = says_group[differs].float().mean().item() if differs.any() else None
        s = singular[r]
        row["nuclear_norm"] = s.sum().item()
        row["frobenius_norm"] = s.square().sum().sqrt().item()
        row["spectral_norm"] = s[0].item()
        out.append(row)
    return out


SUMMARY_KEYS = (
    "train_fact_acc",
    "train_impl_acc",
    "test_fact_acc",
    "test_impl_acc",
    "test_impl_loss",
    "train_loss",
    "hallucination_rate",
    "group_impl_rate",
    "nuclear_norm",
    "frobenius_norm",
    "spectral_norm",
)


def _summarize(result: RunResult, seconds: float, runs_in_batch: int) -> dict[str, Any]:
    last = result.history[-1]
    summary = {k: last[k] for k in SUMMARY_KEYS}
    singular = torch.linalg.svdvals(result.w_ov)
    summary["effective_rank"] = (singular.sum() / singular[0]).item()  # nuclear / spectral
    summary["top_singular_values"] = singular[:8].tolist()
    summary["steps"] = result.config.steps
    summary["seconds"] = seconds
    summary["runs_in_batch"] = runs_in_batch
    summary["config"] = result.config.to_dict()
    return summary


# ---- many groups, in parallel -------------------------------------------------------------------


def group_runs(configs: Sequence[OCRConfig], batch: bool = True) -> list[list[int]]:
    """Indices of ``configs`` grouped by batch key, in first-seen order (one group per run if not batch)."""
    if not batch:
        return [[i] for i in range(len(configs))]
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(configs):
        groups.setdefault(c.batch_key(), []).append(i)
    return list(groups.values())


def group_cost(configs: Sequence[OCRConfig]) -> float:
    """Rough work of one batched group: matmul width plus a per-step floor, times runs and steps."""
    c = configs[0]
    return c.steps * len(configs) * (c.hidden_dim + 32)


def train_runs(
    configs: Sequence[OCRConfig],
    on_progress: Callable[[int, int], None] | None = None,
    on_start: Callable[[list[list[OCRConfig]]], None] | None = None,
    batch: bool = True,
) -> list[RunResult]:
    """Train every config in this process, same-shape runs batched (``batch=False``: each alone, the
    baseline bench/ocr_sweep_speed.py measures). Parallel and resumable runs go through
    ``factorlab.recipes.ocr.sweep`` (one grid cell per batched group).

    ``on_start(groups)`` is called once with the runs of each group; ``on_progress(group, step)``
    as groups advance. Results come back in input order.
    """
    index_groups = group_runs(configs, batch)
    groups = [[configs[i] for i in g] for g in index_groups]
    if on_start is not None:
        on_start(groups)
    out: list[RunResult | None] = [None] * len(configs)
    for gid, (g, group) in enumerate(zip(index_groups, groups)):
        progress = None if on_progress is None else (lambda s, gid=gid: on_progress(gid, s))
        for i, result in zip(g, train_batched(group, progress)):
            out[i] = result
    return out  # type: ignore[return-value]
