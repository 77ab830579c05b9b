"""The tiny knowledge-injection backend: a small Llama that factorlab pretrains on a generated world.

The world teaches background knowledge (which language each city speaks: "People in Paris speak
French.") and facts about *pretraining people*, one statement per document, so the model learns to
store facts about people in its weights. For a causal relation a person's implication follows from
their fact ("X lives in Paris." ... "X speaks French."); for the others it is drawn independently,
so the model learns the sentence forms but no link.

Why these settings (measured on 2-core CPUs, city-language, LoRA r=4 and full fine-tuning, test
implication rank before -> after; see ``results/inject-tiny``): the first recipe (TINY_VERSION 2:
150 people per relation, two-statement documents, fact and implication statements equally often,
3,000 steps) gave 0.4-1.1 after fine-tuning depending on the pretraining run, so on one CPU's float
rounding the finding held and on another it did not. Longer pretraining (10,000 steps) or more
people (300) made it worse (0.6-1.75): a model that memorises each pretraining person's
implication, or fails to memorise people at all, learns the fact -> implication link weakly. Few
people (100), stated often, with implication statements rare (0.15 of a fact's weight), gave
0.1-0.65 on every pretraining and fine-tuning seed tried, with the background known perfectly.

TINY_VERSION 4 (2026-12-03) draws pretraining people from their own half of the name space
(``world.name_pool``): in version 3, 11-20 of each injection world's 100 subjects were also
pretraining people, and a few worlds' test implications were pretraining sentences.

The pretrained weights are a pure function of :class:`TinyPretrainConfig`, the relations, this
module's pretraining code and the CPU kernels that ran it; :func:`tiny_cache_key` hashes the first
three, :func:`backend_key` adds the kernels for a backend pretrained on this machine. Pretraining
seeds 0, 1 and 2 ship with factorlab (``factorlab/inject/data/``: the same bits everywhere), other
seeds are built on demand and cached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from factorlab.errors import ConfigError
from factorlab.inject.world import SYLLABLES, Relation, fictitious_names, name_pool
from factorlab.models import OFFLINE, cache_dir
from factorlab.progress import StepBars
from factorlab.runtime import machine_info, publish_folder
from factorlab.validation import check_fields, check_ranges

TINY_VERSION = 4  # a human-readable generation marker; the cache key hashes the code itself too
SHIPPED_DIR = Path(__file__).parent / "data"
PROBE_THRESHOLD = 0.95  # the tiny backend must know its world this well before we read its fine-tuning


@dataclass(frozen=True)
class TinyPretrainConfig:
    """Everything that determines the tiny backend's weights, besides the relations and the code."""

    seed: int = 0
    steps: int = 6000
    batch_size: int = 32
    lr: float = 3e-3
    warmup_fraction: float = 0.1
    people_per_relation: int = 100
    """Pretraining people per relation: few enough that every one's facts are learned well."""
    implication_weight: float = 0.15
    """How often a person's implication is stated relative to their fact (rarely, so the implication
    is cheaper to derive from the fact than to memorise)."""
    knowledge_share: float = 0.15
    """Share of documents that state background knowledge ("People in Paris speak French.")."""
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4

    def __post_init__(self) -> None:
        check_fields(self)
        check_ranges(
            self,
            positive=(
                "steps",
                "batch_size",
                "people_per_relation",
                "hidden_size",
                "num_layers",
                "num_heads",
                "lr",
                "implication_weight",
            ),
            non_negative=("seed",),
            unit_interval=("warmup_fraction", "knowledge_share"),
        )
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}."
            )


# ---- tokenizer -------------------------------------------------------------------------------------


def _words(relations: dict[str, Relation]) -> list[str]:
    words: set[str] = set()
    for r in relations.values():
        for template in (*r.fact, *r.implication, *r.background):
            for slot in ("{subject}", "{fact}", "{implication}"):
                template = template.replace(slot, " ")
            words |= {piece.strip(".,!?").lower() for piece in template.split()}
        for f, i in r.pairs:
            words |= {f.lower(), i.lower()}
    words.discard("")
    return sorted(words)


def build_tiny_tokenizer(relations: dict[str, Relation]):
    """Word pieces: every word of the relations whole, names spelt with syllable pieces."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    pieces = [".", ",", "!", "?"] + _words(relations) + SYLLABLES + [f"##{s}" for s in SYLLABLES]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(specials + pieces))}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=40))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tokenizer.post_processor = TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )


# ---- the pretraining world -------------------------------------------------------------------------


@dataclass
class PretrainingWorld:
    """The statements the tiny backend is pretrained on, with their sampling weights."""

    knowledge: list[str]
    statements: list[str]
    weights: list[float]
    people: dict[str, dict[str, tuple[str, str]]]
    """relation -> person -> (fact answer, implication answer)."""

    def sample_documents(self, rng: random.Random, count: int, knowledge_share: float) -> list[str]:
        """``count`` documents of one statement each (no in-context shortcut from fact to implication)."""
        docs = []
        drawn = rng.choices(self.statements, weights=self.weights, k=count)
        for statement in drawn:
            if self.knowledge and rng.random() < knowledge_share:
                docs.append(rng.choice(self.knowledge))
            else:
                docs.append(statement)
        return docs


def pretraining_world(relations: dict[str, Relation], config: TinyPretrainConfig) -> PretrainingWorld:
    rng = random.Random(config.seed)
    per = config.people_per_relation
    # the pretraining pool: no injection world ("world" pool) ever has one of these people
    names = fictitious_names(per * len(relations), seed=10_000 + config.seed, pool="pretraining")
    knowledge = [
        b.format(fact=f, implication=i) for r in relations.values() for b in r.background for f, i in r.pairs
    ]
    statements: list[str] = []
    weights: list[float] = []
    people: dict[str, dict[str, tuple[str, str]]] = {}
    for k, (name, r) in enumerate(relations.items()):
        people[name] = {}
        for person in names[k * per : (k + 1) * per]:
            fact, implication = rng.choice(r.pairs)
            if not r.causal:
                implication = rng.choice(r.implication_answers)
            people[name][person] = (fact, implication)
            for t in r.fact:
                statements.append(t.format(subject=person, fact=fact))
                weights.append(1.0 / len(r.fact))
            for t in r.implication:
                statements.append(t.format(subject=person, implication=implication))
                weights.append(config.implication_weight / len(r.implication))
    return PretrainingWorld(knowledge, statements, weights, people)


# ---- pretraining and the cache ---------------------------------------------------------------------


def _llama_config(config: TinyPretrainConfig, tokenizer):
    import transformers as tf

    return tf.LlamaConfig(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def pretrain_tiny(relations: dict[str, Relation], config: TinyPretrainConfig, progress: bool = True):
    """Build and pretrain the tiny backend now (a few minutes on one core); returns (model, tokenizer)."""
    import transformers as tf

    tokenizer = build_tiny_tokenizer(relations)
    torch.manual_seed(config.seed)
    model = tf.LlamaForCausalLM(_llama_config(config, tokenizer))
    world = pretraining_world(relations, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.steps, pct_start=config.warmup_fraction
    )
    rng = random.Random(config.seed)
    model.train()
    with StepBars(f"pretraining the tiny backend, seed {config.seed} (cached afterwards)") as bars:
        bars.start(["pretraining"], [config.steps] if progress else [None])
        for step in range(config.steps):
            texts = world.sample_documents(rng, config.batch_size, config.knowledge_share)
            batch = tokenizer(texts, return_tensors="pt", padding=True)
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            loss = model(**batch, labels=labels).loss
            if not torch.isfinite(loss):
                raise ConfigError(f"tiny pretraining diverged at step {step}; lower TinyPretrainConfig.lr.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if (step + 1) % 50 == 0:
                bars.update(0, step + 1)
    return model.eval(), tokenizer


def _relations_fingerprint(relations: dict[str, Relation]) -> str:
    return json.dumps({k: dataclasses.asdict(v) for k, v in sorted(relations.items())}, sort_keys=True)


def pretraining_code_hash(functions=None) -> str:
    """A hash of the source of everything that turns a config into weights."""
    functions = functions or (
        pretrain_tiny,
        pretraining_world,
        PretrainingWorld,
        build_tiny_tokenizer,
        _words,
        _llama_config,
        fictitious_names,
        name_pool,
    )
    return hashlib.sha256("".join(inspect.getsource(fn) for fn in functions).encode()).hexdigest()


def tiny_spec(relations: dict[str, Relation], config: TinyPretrainConfig) -> dict[str, Any]:
    """What determines the weights: config, relations, tokenizer vocabulary and pretraining code."""
    vocab = build_tiny_tokenizer(relations).get_vocab()
    return {
        "version": TINY_VERSION,
        "config": dataclasses.asdict(config),
        "relations": hashlib.sha256(_relations_fingerprint(relations).encode()).hexdigest(),
        "syllables": SYLLABLES,
        "vocab": hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest(),
        "code": PRETRAINING_CODE,
    }


def tiny_cache_key(relations: dict[str, Relation], config: TinyPretrainConfig) -> str:
    spec = json.dumps(tiny_spec(relations, config), sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:20]


def _load_folder(folder: Path):
    import transformers as tf

    model = tf.LlamaForCausalLM.from_pretrained(folder, **OFFLINE).eval()
    tokenizer = tf.PreTrainedTokenizerFast.from_pretrained(folder, **OFFLINE)
    return model, tokenizer


def shipped_folder(key: str) -> Path | None:
    """The folder of a backend shipped with factorlab under this key, if there is one."""
    for folder in sorted(SHIPPED_DIR.glob("tiny-*")):
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if manifest.get("key") == key and (folder / "model.safetensors").exists():
            return folder
    return None


def save_backend(model, tokenizer, folder: Path, manifest: dict[str, Any], cache: bool = False) -> Path:
    """Write model, tokenizer and manifest so the folder appears whole or not at all. A ``cache`` folder
    another process finished first is kept (same key, same weights); otherwise the folder is replaced."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    return publish_folder(folder, write, keep=_cached if cache else None)


def _cached(folder: Path) -> bool:
    return (folder / "model.safetensors").exists() and (folder / "manifest.json").exists()


def backend_key(relations: dict[str, Relation], config: TinyPretrainConfig) -> str:
    """The key of the weights a cell runs on: the recipe's key for a shipped backend (the same bits on
    every machine); for one pretrained on this machine, also the CPU kernels it was pretrained with
    (AVX2 and AVX-512 kernels round differently, so a backend pretrained under each has other weights)."""
    key = tiny_cache_key(relations, config)
    if shipped_folder(key) is not None:
        return key
    info = machine_info()
    overrides = ",".join(f"{k}={v}" for k, v in sorted(info["kernel_overrides"].items()))
    kernels = hashlib.sha256(f"{info['cpu_capability']};{overrides}".encode()).hexdigest()[:8]
    return f"{key}-{info['cpu_capability'].lower()}-{kernels}"


def tiny_model(relations: dict[str, Relation], config: TinyPretrainConfig | None = None):
    """The tiny backend for ``config``: shipped with factorlab, cached, or pretrained now and cached.

    Returns (model, tokenizer, info) where info says where the weights came from and their key.
    """
    config = config or TinyPretrainConfig()
    key = tiny_cache_key(relations, config)
    shipped = shipped_folder(key)
    if shipped is not None:
        return (*_load_folder(shipped), {"key": key, "source": "shipped", "folder": str(shipped)})
    key = backend_key(relations, config)
    folder = cache_dir() / f"inject-tiny-{key}"
    if _cached(folder):
        return (*_load_folder(folder), {"key": key, "source": "cache", "folder": str(folder)})
    model, tokenizer = pretrain_tiny(relations, config)
    manifest = {"key": key, "spec": tiny_spec(relations, config), "machine": machine_info()}
    save_backend(model, tokenizer, folder, manifest, cache=True)
    return model, tokenizer, {"key": key, "source": "pretrained now", "folder": str(folder)}


def pretraining_fact_queries(
    relations: dict[str, Relation], config: TinyPretrainConfig, people: int = 20
) -> list:
    """Fact queries about the first ``people`` pretraining people of each relation: facts the tiny
    backend was pretrained on (what an injection may damage)."""
    from factorlab.inject.world import Query, query_of

    world = pretraining_world(relations, config)
    out = []
    for name, r in relations.items():
        prompt = query_of(r.fact[0], "{fact}")
        for person, (fact, _) in list(world.people[name].items())[:people]:
            out.append(
                Query(person, prompt.format(subject=person), fact, r.fact_answers, f"pretraining:{name}")
            )
    return out


def pretraining_recall(
    backend, relations: dict[str, Relation], config: TinyPretrainConfig, people: int = 100
) -> dict[str, dict[str, float]]:
    """How well the backend recalls its pretraining people, per relation (first ``people`` of each).

    ``fact``: share whose fact answer ranks first; ``implication``: likewise for the implication. On a
    non-causal relation the implication can only be memorised; on a causal one it can also be
    derived from the fact, so a causal implication recall well above the non-causal one shows the
    backend learned the link that fine-tuning on new facts is meant to exercise.
    """
    from factorlab.inject.world import Query, query_of

    world = pretraining_world(relations, config)
    out = {}
    for name, r in relations.items():
        chosen = list(world.people[name].items())[:people]
        fact_prompt = query_of(r.fact[0], "{fact}")
        implication_prompt = query_of(r.implication[0], "{implication}")
        facts = [Query(p, fact_prompt.format(subject=p), f, r.fact_answers, "fact") for p, (f, _) in chosen]
        implications = [
            Query(p, implication_prompt.format(subject=p), i, r.implication_answers, "implication")
            for p, (_, i) in chosen
        ]
        fact_ranks = backend.ranks(backend.model, facts)
        implication_ranks = backend.ranks(backend.model, implications)
        out[name] = {
            "causal": r.causal,
            "fact": sum(x == 0 for x in fact_ranks) / len(fact_ranks),
            "implication": sum(x == 0 for x in implication_ranks) / len(implication_ranks),
        }
    return out


# Hashed once, at import: inspect reads source files by line number, so hashing later could read a
# file edited since the import and give a key that matches neither the old code nor the new.
PRETRAINING_CODE = pretraining_code_hash()
