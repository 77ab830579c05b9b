"""The synthetic factual-recall task of "Generalization or Hallucination? Understanding
Out-of-Context Reasoning in Transformers" (Huang et al., 2025).

Vocabulary (defaults give 128 tokens, laid out as in the paper's code):

    [r1, r2]            2 relation tokens: r1 asks for the fact, r2 for the implication
    [b_0 .. b_{G-1}]    G fact answers ("cities")
    [c_0 .. c_{G-1}]    G implication answers ("animals")
    [s_0 .. s_{N-1}]    N = G * subjects_per_group subjects ("names")
    [n_0 .. n_{K-1}]    K noise tokens
    [EOS]

Subject s_i has fact b_{i mod G}, and fact b_j implies c_j, so subjects fall into G groups.
The first ``round(train_fraction * N)`` subjects are TRAIN subjects (fact and implication seen);
the others are TEST subjects (only their fact is seen; their implication never is).

With ``association="spurious"`` the test subjects' true implication is drawn independently of
their group: a model that answers with the group's implication is then hallucinating, through
the very mechanism that makes it generalize when the association is causal.

A sequence has ``seq_len`` tokens: noise everywhere, the subject at a random position, the
relation token at a random later position, and EOS last. The label is one token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from factorlab.errors import ConfigError
from factorlab.runtime import generator
from factorlab.validation import check_fields

ASSOCIATIONS = ("causal", "spurious")
SPLITS = ("train_fact", "train_impl", "test_fact", "test_impl")


@dataclass(frozen=True)
class OCRTaskConfig:
    """The task's shape. Defaults are those of the paper's code."""

    groups: int = 20
    """Number of fact answers G (= implication answers; each fact implies one implication)."""
    subjects_per_group: int = 4
    """Subjects sharing each fact answer; N = groups * subjects_per_group."""
    train_fraction: float = 0.25
    """Fraction of subjects whose implication is shown in training (the first ones)."""
    noise_tokens: int = 5
    """Number of distinct noise token types filling the sequence."""
    seq_len: int = 16
    """Tokens per sequence, EOS included."""
    association: str = "causal"
    """"causal": test subjects' implication follows their group; "spurious": drawn independently."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.groups < 1:
            raise ConfigError(f"groups must be >= 1, got {self.groups}.")
        if self.subjects_per_group < 1:
            raise ConfigError(f"subjects_per_group must be >= 1, got {self.subjects_per_group}.")
        if self.seq_len < 3:
            raise ConfigError(
                f"seq_len={self.seq_len} is too short: a sequence must hold the subject, the relation "
                "token and EOS, so seq_len must be >= 3."
            )
        if self.noise_tokens < 0 or (self.noise_tokens == 0 and self.seq_len > 3):
            raise ConfigError(
                f"noise_tokens={self.noise_tokens}: sequences longer than 3 tokens are filled with noise, "
                "so use noise_tokens >= 1 (or seq_len=3)."
            )
        if self.association not in ASSOCIATIONS:
            raise ConfigError(f"association must be one of {ASSOCIATIONS}, got {self.association!r}.")
        n = self.num_subjects
        n_train = self.num_train_subjects
        if not 0 < n_train < n:
            lo, hi = 1 / n, (n - 1) / n
            raise ConfigError(
                f"train_fraction={self.train_fraction} gives {n_train} train and {n - n_train} test "
                f"subjects out of {n}; both must be >= 1, so choose train_fraction in [{lo:.3g}, {hi:.3g}]."
            )

    @property
    def num_subjects(self) -> int:
        return self.groups * self.subjects_per_group

    @property
    def num_train_subjects(self) -> int:
        return round(self.train_fraction * self.num_subjects)

    @property
    def vocab_size(self) -> int:
        return 2 + 2 * self.groups + self.num_subjects + self.noise_tokens + 1


class OCRWorld:
    """One seeded instance of the task: vocabulary, subject -> answer maps, and the split.

    All token-id tables are LongTensors indexed by subject number (0..N-1).
    """

    def __init__(self, config: OCRTaskConfig, seed: int):
        self.config = config
        self.seed = seed
        g, n = config.groups, config.num_subjects
        self.fact_relation, self.implication_relation = 0, 1
        self.fact_answers = torch.arange(2, 2 + g)
        self.implication_answers = torch.arange(2 + g, 2 + 2 * g)
        self.subjects = torch.arange(2 + 2 * g, 2 + 2 * g + n)
        self.noise = torch.arange(2 + 2 * g + n, 2 + 2 * g + n + config.noise_tokens)
        self.eos = config.vocab_size - 1
        self.vocab_size = config.vocab_size
        # Every token a sequence can hold (all but the answers), ascending.
        self.input_tokens = torch.cat(
            [torch.tensor([0, 1]), self.subjects, self.noise, torch.tensor([self.eos])]
        )
        self._input_numbers = torch.full((self.vocab_size,), -1, dtype=torch.long)
        self._input_numbers[self.input_tokens] = torch.arange(len(self.input_tokens))

        self.group = torch.arange(n) % g
        self.subject_fact = self.fact_answers[self.group]
        self.group_implication = self.implication_answers[self.group]
        self.subject_implication = self.group_implication.clone()
        n_train = config.num_train_subjects
        if config.association == "spurious":
            draw = torch.randint(0, g, (n - n_train,), generator=generator(seed, "spurious-world"))
            self.subject_implication[n_train:] = self.implication_answers[draw]
        self.train_subjects = torch.arange(n_train)
        self.test_subjects = torch.arange(n_train, n)

    # ---- sequences ---------------------------------------------------------------------------
    def sequences(
        self,
        subjects: torch.Tensor,
        relation: int,
        gen: torch.Generator,
        out: torch.Tensor | None = None,
        input_numbers: bool = False,
    ) -> torch.Tensor:
        """Token sequences (*subjects.shape, seq_len) for the given subject numbers and relation.

        ``out``, if given, receives them (any view whose row-major order is its memory order, e.g. a
        column block of a batch): the random draws, and so the sequences, do not depend on it.
        ``input_numbers``: each token as its position in ``input_tokens`` instead of its id.
        """
        seq_len = self.config.seq_len
        ids = self._input_numbers if input_numbers else torch.arange(self.vocab_size)
        tokens = torch.empty((*subjects.shape, seq_len), dtype=torch.long) if out is None else out
        if len(self.noise):
            # = ids[self.noise[randint(0, K, shape)]]: noise ids are consecutive in both numberings,
            # and randint draws with random_
            tokens.random_(0, len(self.noise), generator=gen).add_(int(ids[self.noise[0]]))
        subject_pos = torch.randint(0, seq_len - 2, subjects.shape, generator=gen)  # 0 .. T-3
        room = (seq_len - 2 - subject_pos).double()  # relation goes in subject_pos+1 .. T-2
        fraction = torch.rand(subjects.shape, generator=gen, dtype=torch.double)
        relation_pos = subject_pos + 1 + (fraction * room).long()
        tokens.scatter_(-1, subject_pos.unsqueeze(-1), ids[self.subjects[subjects]].unsqueeze(-1))
        tokens.scatter_(-1, relation_pos.unsqueeze(-1), int(ids[relation]))
        tokens[..., -1] = int(ids[self.eos])
        return tokens

    def training_batches(
        self,
        num_batches: int,
        batch_size: int,
        gen: torch.Generator,
        out: tuple[torch.Tensor, torch.Tensor] | None = None,
        input_numbers: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``num_batches`` "mixed fine-tuning" batches, as in the paper's code.

        Each batch is one third train-subject facts, one third train-subject implications and one
        third test-subject facts; subjects are drawn uniformly with replacement. No batch ever
        contains a test subject's implication.

        Returns tokens (num_batches, batch_size, seq_len) and labels (num_batches, batch_size),
        written into ``out`` = (tokens, labels) if given (e.g. one run's slice of a batched chunk,
        which saves the copies; the batches do not depend on it). ``input_numbers``: tokens as their
        positions in ``input_tokens`` (labels stay ids), as the training step takes them.
        """
        if batch_size % 3:
            raise ConfigError(
                f"batch_size={batch_size} must split into three equal parts (train facts, train "
                f"implications, test facts): use a multiple of 3, e.g. {3 * max(1, round(batch_size / 3))}."
            )
        if out is None:
            out = (
                torch.empty(num_batches, batch_size, self.config.seq_len, dtype=torch.long),
                torch.empty(num_batches, batch_size, dtype=torch.long),
            )
        tokens, labels = out
        part = batch_size // 3
        train, test = self.train_subjects, self.test_subjects
        for i, (subjects, relation, answers) in enumerate(
            (
                (train, self.fact_relation, self.subject_fact),
                (train, self.implication_relation, self.subject_implication),
                (test, self.fact_relation, self.subject_fact),
            )
        ):
            drawn = torch.randint(0, len(subjects), (num_batches * part,), generator=gen)
            chosen = subjects[drawn].view(num_batches, part)
            columns = slice(i * part, (i + 1) * part)
            self.sequences(chosen, relation, gen, out=tokens[:, columns], input_numbers=input_numbers)
            labels[:, columns] = answers[chosen]
        return tokens, labels

    def evaluation_set(self, samples_per_subject: int) -> EvaluationSet:
        """A fixed evaluation set: every subject, both relations, ``samples_per_subject`` sequences each."""
        gen = generator(self.seed, "evaluation-set")
        tokens, labels, group_labels, split_of = [], [], [], []
        for split_id, split in enumerate(SPLITS):
            subjects = self.train_subjects if split.startswith("train") else self.test_subjects
            subjects = subjects.repeat_interleave(samples_per_subject)
            if split.endswith("fact"):
                relation, answers, group_answers = self.fact_relation, self.subject_fact, self.subject_fact
            else:
                relation, answers = self.implication_relation, self.subject_implication
                group_answers = self.group_implication
            tokens.append(self.sequences(subjects, relation, gen))
            labels.append(answers[subjects])
            group_labels.append(group_answers[subjects])
            split_of.append(torch.full((len(subjects),), split_id))
        return EvaluationSet(
            torch.cat(tokens), torch.cat(labels), torch.cat(group_labels), torch.cat(split_of)
        )


@dataclass
class EvaluationSet:
    tokens: torch.Tensor  # (M, seq_len)
    labels: torch.Tensor  # (M,) the true answer
    group_labels: torch.Tensor  # (M,) the answer the subject's group implies (= labels when causal)
    split: torch.Tensor  # (M,) index into SPLITS
