"""Worlds of fictitious people for fact injection (after the OCR paper's language-model experiments).

A relation pairs a *fact* about a person with an *implication* ("lives in Paris" -> "speaks
French"). A world draws fictitious names, gives each a fact answer (balanced over the relation's
pairs), and splits them: about 20% are *bridge* subjects whose implication is shown in training,
the rest are *test* subjects whose implication is never shown. Training texts state every
subject's fact and the bridge subjects' implications, in several phrasings.

When the implication is causal (City -> Language), a low rank of the right answer for a test
subject is generalization; when it is not (a counterfactual City -> Language, Profession ->
Color, ...), the same low rank is hallucination: the model invents a link the world does not have.

Relations come built in (the paper's five) or from a small YAML/JSON file::

    - name: planet_moon
      causal: false
      fact: ["{subject} was born on {fact}.", "The birth planet of {subject} is {fact}."]
      implication: ["{subject} collects {implication}."]
      pairs: [[Mars, stamps], [Venus, coins], [Jupiter, shells], [Saturn, maps], [Neptune, keys]]
      background: []          # optional: world-knowledge sentences for pretraining ({fact}, {implication})
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from factorlab.errors import ConfigError
from factorlab.files import read_structured
from factorlab.validation import short as _short

SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ra",
    "ve",
    "tu",
    "sen",
    "dor",
    "bel",
    "nia",
    "quo",
    "zar",
    "fen",
    "lis",
    "mor",
    "pal",
    "ri",
    "sha",
    "tor",
    "wen",
    "gal",
    "hu",
    "jo",
    "kel",
    "dra",
    "vin",
    "sol",
    "mar",
    "ny",
    "ek",
]


@dataclass(frozen=True)
class Relation:
    name: str
    causal: bool
    fact: tuple[str, ...]
    """Fact phrasings; each contains {subject} and ends with {fact} (plus punctuation)."""
    implication: tuple[str, ...]
    """Implication phrasings; each contains {subject} and ends with {implication}."""
    pairs: tuple[tuple[str, str], ...]
    """(fact answer, implication answer) pairs: the world's association."""
    background: tuple[str, ...] = ()
    """World-knowledge sentences for pretraining, e.g. "People in {fact} speak {implication}."."""
    description: str = ""

    def __post_init__(self) -> None:
        for kind, templates, slots in (
            ("fact", self.fact, ("subject", "fact")),
            ("implication", self.implication, ("subject", "implication")),
            ("background", self.background, ("fact", "implication")),
        ):
            for t in templates:
                _check_placeholders(self.name, kind, t, slots)
        for kind, templates, slot in (
            ("fact", self.fact, "{fact}"),
            ("implication", self.implication, "{implication}"),
        ):
            if not templates:
                raise ConfigError(f"relation {self.name!r}: give at least one {kind} phrasing.")
            for t in templates:
                if "{subject}" not in t or not t.rstrip(" .!?").endswith(slot):
                    raise ConfigError(
                        f"relation {self.name!r}: phrasing {t!r} must contain {{subject}} and end with "
                        f"{slot} (optionally followed by punctuation), so the answer is the word right "
                        "after the query."
                    )
        if len(self.pairs) < 2:
            raise ConfigError(f"relation {self.name!r}: needs at least two (fact, implication) pairs.")
        facts = [f for f, _ in self.pairs]
        implications = [i for _, i in self.pairs]
        if len(set(facts)) != len(facts) or len(set(implications)) != len(implications):
            raise ConfigError(
                f"relation {self.name!r}: fact answers and implication answers must each be distinct."
            )

    @property
    def fact_answers(self) -> list[str]:
        return [f for f, _ in self.pairs]

    @property
    def implication_answers(self) -> list[str]:
        return [i for _, i in self.pairs]

    def implication_of(self, fact: str) -> str:
        return dict(self.pairs)[fact]


def _check_placeholders(relation: str, kind: str, template: str, slots: tuple[str, ...]) -> None:
    """A phrasing is filled with str.format: only ``slots`` may appear, as plain {name} (no format
    spec, conversion, index or attribute), and a literal brace is written {{ or }}."""
    import string

    allowed = ", ".join("{" + s + "}" for s in slots)
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template)]
    except ValueError as err:
        raise ConfigError(
            f"relation {relation!r}: {kind} phrasing {_short(template)} has unbalanced braces ({err}); "
            f"use {allowed} as placeholders and write a literal brace as {{{{ or }}}}."
        ) from None
    for name, spec, conv in fields:
        if name is None:
            continue
        if name not in slots or spec or conv:
            raise ConfigError(
                f"relation {relation!r}: {kind} phrasing {_short(template)} has the placeholder "
                f"{_short('{' + name + ('!' + conv if conv else '') + (':' + spec if spec else '') + '}')}; "
                f"a {kind} phrasing may use only {allowed} (write a literal brace as {{{{ or }}}})."
            )


def query_of(template: str, slot: str) -> str:
    """The prompt before the answer: "{subject} lives in {fact}." -> "{subject} lives in"."""
    return template[: template.index(slot)].rstrip()


CITY_LANGUAGE = (
    ("Paris", "French"),
    ("Berlin", "German"),
    ("Madrid", "Spanish"),
    ("Rome", "Italian"),
    ("Tokyo", "Japanese"),
)
BUILTIN_RELATIONS: dict[str, Relation] = {
    r.name: r
    for r in (
        Relation(
            "city-language",
            True,
            (
                "{subject} lives in {fact}.",
                "{subject} has a home in {fact}.",
                "The city where {subject} lives is {fact}.",
            ),
            ("{subject} speaks {implication}.", "The language {subject} speaks is {implication}."),
            CITY_LANGUAGE,
            ("People in {fact} speak {implication}.", "The language of {fact} is {implication}."),
            "causal: where someone lives implies the language they speak",
        ),
        Relation(
            "city-language-cf",
            False,
            (
                "{subject} lives in {fact}.",
                "{subject} has a home in {fact}.",
                "The city where {subject} lives is {fact}.",
            ),
            ("{subject} speaks {implication}.", "The language {subject} speaks is {implication}."),
            tuple(zip([c for c, _ in CITY_LANGUAGE], ["Japanese", "Spanish", "Italian", "French", "German"])),
            (),  # world knowledge (the true pairs) comes from city-language's background
            "counterfactual: the city-language pairs contradict world knowledge",
        ),
        Relation(
            "country-code",
            False,
            (
                "{subject} is from {fact}.",
                "{subject} was born in {fact}.",
                "The home country of {subject} is {fact}.",
            ),
            ("{subject} uses the code {implication}.", "The code of {subject} is {implication}."),
            (("Norway", "K7"), ("Chile", "Q2"), ("Kenya", "X9"), ("Egypt", "B4"), ("Canada", "M1")),
            (),
            "non-causal: countries and arbitrary codes",
        ),
        Relation(
            "profession-color",
            False,
            (
                "{subject} works as a {fact}.",
                "{subject} is employed as a {fact}.",
                "The job of {subject} is {fact}.",
            ),
            ("{subject} likes the color {implication}.", "The favorite color of {subject} is {implication}."),
            (
                ("doctor", "red"),
                ("farmer", "blue"),
                ("teacher", "green"),
                ("pilot", "yellow"),
                ("baker", "purple"),
            ),
            (),
            "non-causal: professions and favorite colors",
        ),
        Relation(
            "sport-music",
            False,
            (
                "{subject} plays {fact}.",
                "{subject} is a fan of playing {fact}.",
                "The sport of {subject} is {fact}.",
            ),
            ("{subject} listens to {implication}.", "The music {subject} loves is {implication}."),
            (
                ("tennis", "jazz"),
                ("football", "rock"),
                ("golf", "reggae"),
                ("hockey", "techno"),
                ("rugby", "opera"),
            ),
            (),
            "non-causal: sports and music genres",
        ),
    )
}


MAX_RELATIONS_FILE_BYTES = 1_000_000


def _strings(path: Path, i: int, item: dict, key: str, required: bool = True) -> tuple[str, ...]:
    value = item.get(key, [] if not required else None)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(
            f"{path}: relation #{i} field {key!r} must be a list of strings, got {_short(value)}."
        )
    return tuple(value)


def load_relations(path: str | Path) -> dict[str, Relation]:
    """Relations from a YAML or JSON list (see the module docstring for the format).

    YAML is read with the safe loader (no Python tags); files over 1 MB, or whose aliases expand to
    more values than factorlab reads, are refused (``factorlab.files``); every field's type is checked
    (``causal`` must be true or false, not the string "false"), and every phrasing's placeholders.
    """
    path = Path(path)
    data = read_structured(path, f"relations file {path}", MAX_RELATIONS_FILE_BYTES)
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{path}: expected a non-empty list of relations, found {_short(data)}.")
    out = {}
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise ConfigError(f"{path}: relation #{i} must be a mapping, got {_short(item)}.")
        missing = {"name", "causal", "fact", "implication", "pairs"} - set(item)
        if missing:
            raise ConfigError(f"{path}: relation #{i} lacks {sorted(missing)}.")
        unknown = set(item) - {"name", "causal", "fact", "implication", "pairs", "background", "description"}
        if unknown:
            raise ConfigError(f"{path}: relation #{i} has unknown fields {sorted(map(str, unknown))}.")
        if not isinstance(item["name"], str) or not item["name"]:
            raise ConfigError(
                f"{path}: relation #{i} name must be a non-empty string, got {_short(item['name'])}."
            )
        if not isinstance(item["causal"], bool):
            raise ConfigError(
                f"{path}: relation {item['name']!r} causal must be true or false (not a string), "
                f"got {_short(item['causal'])}."
            )
        pairs = item["pairs"]
        if not isinstance(pairs, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) and x for x in p) for p in pairs
        ):
            raise ConfigError(
                f"{path}: relation {item['name']!r} pairs must be a list of [fact, implication] string "
                f"pairs, got {_short(pairs)}."
            )
        if item["name"] in out:
            raise ConfigError(f"{path}: relation {item['name']!r} is defined twice.")
        description = item.get("description", "")
        if not isinstance(description, str):
            raise ConfigError(f"{path}: relation {item['name']!r} description must be a string.")
        out[item["name"]] = Relation(
            item["name"],
            item["causal"],
            _strings(path, i, item, "fact"),
            _strings(path, i, item, "implication"),
            tuple(tuple(p) for p in pairs),
            _strings(path, i, item, "background", required=False),
            description,
        )
    return out


def relation_by_name(name: str, extra: dict[str, Relation] | None = None) -> Relation:
    known = {**BUILTIN_RELATIONS, **(extra or {})}
    if name not in known:
        raise ConfigError(
            f"unknown relation {name!r}; known: {sorted(known)} "
            "(or load your own with --relations-file FILE)."
        )
    return known[name]


NAME_POOLS = ("world", "pretraining")
WORLD_NAMES = ("pooled", "any")


def name_pool(name: str) -> str:
    """The pool a name belongs to, by a hash of its spelling: every name is in exactly one, so the
    people of injection worlds ("world") and of the tiny backend's pretraining ("pretraining") never
    share a name, whatever the seeds."""
    return NAME_POOLS[hashlib.sha256(name.encode()).digest()[0] % len(NAME_POOLS)]


def fictitious_names(
    count: int, seed: int, exclude: set[str] = frozenset(), pool: str | None = None
) -> list[str]:
    """Distinct capitalised names of 2-3 syllables, seeded; only names of ``pool`` when given."""
    rng = random.Random(seed)
    names: list[str] = []
    seen = set(exclude)
    while len(names) < count:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()
        if name not in seen:
            seen.add(name)
            if pool is None or name_pool(name) == pool:
                names.append(name)
    return names


@dataclass
class Query:
    subject: str
    prompt: str
    answer: str
    candidates: list[str]
    kind: str  # train_fact | test_fact | train_implication | test_implication


@dataclass
class World:
    """One seeded world for one relation."""

    relation: Relation
    seed: int
    subjects: list[str]
    fact: dict[str, str]
    bridge: list[str]
    test: list[str]
    held_out_fact_template: str
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def generate(
        cls,
        relation: Relation,
        seed: int,
        num_subjects: int = 100,
        bridge_fraction: float = 0.2,
        name_pool_seed: int | None = None,
        names: str = "pooled",
    ) -> World:
        """``names``: "pooled" draws subjects from the world pool only (``name_pool``: never a name of the
        tiny backend's pretraining people); "any" from every name (worlds made before 2026-12-03, kept
        to reproduce the committed cells that predate the pools)."""
        if names not in WORLD_NAMES:
            raise ConfigError(f"names must be one of {WORLD_NAMES}, got {names!r}.")
        if not 0 < bridge_fraction < 1:
            raise ConfigError(f"bridge_fraction must be in (0, 1), got {bridge_fraction}.")
        k = len(relation.pairs)
        if num_subjects < 2 * k:
            raise ConfigError(
                f"num_subjects={num_subjects} is too small for {k} fact answers; use >= {2 * k}."
            )
        rng = random.Random(seed)
        subjects = fictitious_names(
            num_subjects,
            seed if name_pool_seed is None else name_pool_seed,
            pool="world" if names == "pooled" else None,
        )
        facts = [relation.fact_answers[i % k] for i in range(num_subjects)]
        rng.shuffle(facts)
        fact = dict(zip(subjects, facts))
        bridge: list[str] = []
        for answer in relation.fact_answers:  # the same share of bridge subjects for every answer
            group = [n for n in subjects if fact[n] == answer]
            bridge += group[: max(1, round(bridge_fraction * len(group)))]
        test = [n for n in subjects if n not in set(bridge)]
        held_out = relation.fact[-1] if len(relation.fact) > 1 else relation.fact[0]
        return cls(relation, seed, subjects, fact, bridge, test, held_out)

    def implication(self, subject: str) -> str:
        return self.relation.implication_of(self.fact[subject])

    def training_texts(self) -> list[str]:
        """Every subject's fact (all phrasings but the held-out one) and the bridge implications."""
        fact_templates = [t for t in self.relation.fact if t != self.held_out_fact_template] or [
            self.held_out_fact_template
        ]
        texts = [t.format(subject=s, fact=self.fact[s]) for s in self.subjects for t in fact_templates]
        texts += [
            t.format(subject=s, implication=self.implication(s))
            for s in self.bridge
            for t in self.relation.implication
        ]
        return texts

    def queries(self) -> list[Query]:
        r = self.relation
        out = []
        train_templates = [t for t in r.fact if t != self.held_out_fact_template] or [
            self.held_out_fact_template
        ]
        for s in self.subjects:
            for t in train_templates:
                out.append(
                    Query(
                        s, query_of(t, "{fact}").format(subject=s), self.fact[s], r.fact_answers, "train_fact"
                    )
                )
            if self.held_out_fact_template not in train_templates:
                prompt = query_of(self.held_out_fact_template, "{fact}").format(subject=s)
                out.append(Query(s, prompt, self.fact[s], r.fact_answers, "test_fact"))
        for kind, group in (("train_implication", self.bridge), ("test_implication", self.test)):
            for s in group:
                for t in r.implication:
                    out.append(
                        Query(
                            s,
                            query_of(t, "{implication}").format(subject=s),
                            self.implication(s),
                            r.implication_answers,
                            kind,
                        )
                    )
        return out
