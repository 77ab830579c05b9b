"""The max-margin programs behind the OCR paper's Theorems 1 and 2, solved exactly on small instances.

With attention fixed so that the last token attends to the subject and the relation token only,
the model's input for a query (s, r) is z = e_s + e_r and its logits are W_OV z. The margin of a
training pair ((s, r), a) against a competing answer a' of the same relation is

    h_{(s,r),a'}(W) = (e_a - e_a')^T W (e_s + e_r).

Theorem 1: gradient descent on the factorized model converges in direction to (a KKT point of)

    min ||W||_*   s.t.  h >= 1 on every training pair and competitor,

and on the combined model to the same program with the Frobenius norm. Theorem 2: the Frobenius
solution's margin on the unseen test implications is exactly 0 (by symmetry between groups),
while the nuclear-norm solution's is positive. This module solves both programs with cvxpy and
compares them with trained models.

Competitors (``competitors``): the training loss is cross-entropy over the whole vocabulary, so by
default every other token competes ("vocabulary"); "answers" keeps the 2G answer tokens, "relation"
only the same relation's answers (the form some summaries state the theorem in). With the whole
vocabulary (or all answers) the min-nuclear solution's test margin is sqrt(m_train / m_test) per
unit training margin, for m_train train and m_test test subjects per group.

W is solved on the block that matters: rows = answer tokens (facts, then implications; then every
other token for "vocabulary"), columns = subjects then the two relation tokens; minimum-norm
solutions are zero everywhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from factorlab.errors import ConfigError
from factorlab.ocr.task import OCRTaskConfig, OCRWorld

COMPETITORS = ("vocabulary", "answers", "relation")


@dataclass
class MarginProblem:
    """Index tables of the training and test margins on the answer x (subject, relation) block."""

    num_rows: int
    num_cols: int
    train: np.ndarray  # (K, 4): row of a, row of a', column of s, column of r
    test: np.ndarray  # (K', 4)
    train_per_group: list[int]
    test_per_group: list[int]
    competitors: str = "vocabulary"
    row_tokens: list[int] | None = None
    """Vocabulary id of each row (answers first)."""

    @classmethod
    def from_world(cls, world: OCRWorld, competitors: str = "vocabulary") -> MarginProblem:
        if competitors not in COMPETITORS:
            raise ConfigError(f"competitors must be one of {COMPETITORS}, got {competitors!r}.")
        g = world.config.groups
        n = world.config.num_subjects
        answers = torch.cat([world.fact_answers, world.implication_answers]).tolist()
        others = [t for t in range(world.vocab_size) if t not in set(answers)]
        row_tokens = answers + (others if competitors == "vocabulary" else [])
        all_rows = list(range(len(row_tokens)))
        fact_rows = list(range(g))  # row j <-> fact answer b_j
        impl_rows = list(range(g, 2 * g))  # row g + j <-> implication answer c_j
        if competitors != "relation":
            fact_rows = impl_rows = all_rows
        r1_col, r2_col = n, n + 1
        group = world.group.tolist()
        impl_group = (world.subject_implication - world.implication_answers[0]).tolist()
        train_subjects = set(world.train_subjects.tolist())

        def pairs(subjects, rows, answer_row, rel_col):
            return [
                (answer_row(s), other, s, rel_col)
                for s in subjects
                for other in rows
                if other != answer_row(s)
            ]

        train = pairs(range(n), fact_rows, lambda s: group[s], r1_col)
        train += pairs(sorted(train_subjects), impl_rows, lambda s: g + impl_group[s], r2_col)
        test = pairs(world.test_subjects.tolist(), impl_rows, lambda s: g + impl_group[s], r2_col)
        per_group_train = [sum(1 for s in train_subjects if group[s] == j) for j in range(g)]
        per_group_test = [sum(1 for s in world.test_subjects.tolist() if group[s] == j) for j in range(g)]
        return cls(
            len(row_tokens),
            n + 2,
            np.array(train),
            np.array(test),
            per_group_train,
            per_group_test,
            competitors,
            row_tokens,
        )

    def margins(self, w: np.ndarray, which: str = "train") -> np.ndarray:
        idx = self.train if which == "train" else self.test
        a, other, s, r = idx.T
        return w[a, s] + w[a, r] - w[other, s] - w[other, r]

    def constraint_matrix(self):
        """Sparse M with M @ vec(W) = training margins (vec in row-major order)."""
        from scipy.sparse import coo_matrix

        a, other, s, r = self.train.T
        k = np.arange(len(self.train))
        cols = self.num_cols
        rows = np.concatenate([k, k, k, k])
        entries = np.concatenate([a * cols + s, a * cols + r, other * cols + s, other * cols + r])
        values = np.concatenate([np.ones(len(k)), np.ones(len(k)), -np.ones(len(k)), -np.ones(len(k))])
        return coo_matrix((values, (rows, entries)), shape=(len(k), self.num_rows * cols)).tocsr()


def solve_max_margin(problem: MarginProblem, norm: str, solver: str | None = None) -> np.ndarray:
    """min ||W|| (norm = "nuclear" or "frobenius") subject to every training margin >= 1."""
    import cvxpy as cp

    w = cp.Variable((problem.num_rows, problem.num_cols))
    constraints = [problem.constraint_matrix() @ cp.vec(w, order="C") >= 1]
    if norm == "nuclear":
        objective = cp.normNuc(w)
    elif norm == "frobenius":
        objective = cp.sum_squares(w)
    else:
        raise ConfigError(f"norm must be 'nuclear' or 'frobenius', got {norm!r}.")
    solver = (solver or "CLARABEL").upper()
    if solver not in cp.installed_solvers():
        raise ConfigError(
            f"solver {solver!r} is not installed; installed: {', '.join(cp.installed_solvers())}."
        )
    prob = cp.Problem(cp.Minimize(objective), constraints)
    prob.solve(solver=solver)
    if prob.status not in ("optimal", "optimal_inaccurate") or w.value is None:
        raise ConfigError(
            f"the {norm} max-margin program did not solve (status {prob.status}); try another --solver "
            "(e.g. SCS) or a smaller instance."
        )
    return np.asarray(w.value)


def block_of(world: OCRWorld, w_ov: torch.Tensor, problem: MarginProblem | None = None) -> np.ndarray:
    """The rows x (subjects, relations)-columns block of a trained (d, d) W_OV (the problem's rows;
    without a problem, the answer rows)."""
    if problem is not None and problem.row_tokens is not None:
        rows = torch.tensor(problem.row_tokens)
    else:
        rows = torch.cat([world.fact_answers, world.implication_answers])
    cols = torch.cat([world.subjects, torch.tensor([world.fact_relation, world.implication_relation])])
    return w_ov[rows][:, cols].double().numpy()


def centred(w: np.ndarray, groups: int, competitors: str = "relation") -> np.ndarray:
    """Remove what the margins cannot see, so directions compare: a constant added to a column over
    all competing rows (every row, or, for "relation", each relation's answer rows) changes nothing.
    """
    out = w.copy()
    blocks = (slice(0, groups), slice(groups, 2 * groups)) if competitors == "relation" else (slice(None),)
    for rows in blocks:
        out[rows] -= out[rows].mean(axis=0, keepdims=True)
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def describe_solution(problem: MarginProblem, w: np.ndarray) -> dict[str, Any]:
    train = problem.margins(w, "train")
    test = problem.margins(w, "test")
    singular = np.linalg.svd(w, compute_uv=False)
    return {
        "min_train_margin": float(train.min()),
        "min_test_margin": float(test.min()),
        "mean_test_margin": float(test.mean()),
        # Test margin per unit of training margin: comparable between solutions and trained models.
        "normalized_test_margin": float(test.min() / train.min()),
        "nuclear_norm": float(singular.sum()),
        "frobenius_norm": float(np.sqrt((singular**2).sum())),
        "rank": int((singular > 1e-6 * singular[0]).sum()),
        "singular_values": singular[:12].tolist(),
    }


def theorem2_references(problem: MarginProblem) -> dict[str, float | None]:
    """The two forms of Theorem 2's lower bound that summaries of the paper give, when groups are even."""
    if len(set(problem.train_per_group)) != 1 or len(set(problem.test_per_group)) != 1:
        return {"sqrt_form": None, "ratio_form": None}
    m_train, m_test = problem.train_per_group[0], problem.test_per_group[0]
    return {
        "m_train": m_train,
        "m_test": m_test,
        "sqrt_form": min(math.sqrt(m_train / m_test), 1.0),
        "ratio_form": m_train / (m_train + m_test),
    }


def margin_table(
    cases: list[tuple[int, int]], groups: int = 4, competitors: str = "vocabulary", solver: str | None = None
) -> list[dict[str, Any]]:
    """The min-nuclear solution's test margin (per unit training margin) for each (m_train, m_test),
    beside min(sqrt(m_train/m_test), 1) and m_train/(m_train+m_test). The min-Frobenius one's is 0."""
    rows = []
    for m_train, m_test in cases:
        task = OCRTaskConfig(
            groups=groups, subjects_per_group=m_train + m_test, train_fraction=m_train / (m_train + m_test)
        )
        problem = MarginProblem.from_world(OCRWorld(task, 0), competitors)
        nuclear = describe_solution(problem, solve_max_margin(problem, "nuclear", solver))
        frobenius = describe_solution(problem, solve_max_margin(problem, "frobenius", solver))
        rows.append(
            {
                "m_train": m_train,
                "m_test": m_test,
                "nuclear_test_margin": nuclear["normalized_test_margin"],
                "frobenius_test_margin": frobenius["normalized_test_margin"],
                "sqrt_form": min(math.sqrt(m_train / m_test), 1.0),
                "ratio_form": m_train / (m_train + m_test),
            }
        )
    return rows


MARGIN_CASES = [(1, 3), (1, 2), (2, 2), (1, 1), (2, 1)]


def check_instance(task: OCRTaskConfig) -> None:
    if task.groups < 2:
        raise ConfigError(
            f"--groups {task.groups}: with one group every subject shares one fact and one implication, so "
            "the implication is the relation's only answer and no margin separates reasoning from "
            "guessing; the analysis needs --groups >= 2 (e.g. 4)."
        )
    if task.association != "causal":
        raise ConfigError(
            "the max-margin analysis is defined for the causal association; drop --association."
        )
    if task.num_subjects * 2 * task.groups > 20000:
        raise ConfigError(
            f"{task.groups} groups x {task.subjects_per_group} subjects gives a program too large for "
            "an exact convex solve; use a small instance (e.g. --groups 4 --subjects-per-group 4)."
        )
