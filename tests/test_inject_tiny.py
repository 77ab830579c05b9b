"""The tiny knowledge-injection backend: cache keys that cannot go stale, the shipped reference
backend, the background-knowledge probe, and causal generalization that holds on any CPU."""

import dataclasses
import json
import time

import pytest
import torch

from factorlab.inject import tiny
from factorlab.inject.backends import background_queries, weights_fingerprint
from factorlab.inject.tiny import PROBE_THRESHOLD, TinyPretrainConfig, shipped_folder, tiny_cache_key
from factorlab.inject.world import BUILTIN_RELATIONS, Relation


def test_cache_key_covers_every_config_field_the_relations_and_the_code(monkeypatch):
    base = TinyPretrainConfig()
    key = tiny_cache_key(BUILTIN_RELATIONS, base)
    assert key == tiny_cache_key(dict(BUILTIN_RELATIONS), TinyPretrainConfig())  # stable
    keys = {key}
    for f in dataclasses.fields(TinyPretrainConfig):
        value = getattr(base, f.name)
        changed = value + 1 if isinstance(value, int) else value / 2
        if f.name in ("num_heads", "hidden_size"):
            changed = {"num_heads": 2, "hidden_size": 132}[f.name]  # heads must divide the hidden size
        keys.add(tiny_cache_key(BUILTIN_RELATIONS, dataclasses.replace(base, **{f.name: changed})))
    assert len(keys) == 1 + len(dataclasses.fields(TinyPretrainConfig))
    city = BUILTIN_RELATIONS["city-language"]
    edited = {**BUILTIN_RELATIONS, "city-language": dataclasses.replace(city, background=city.background[:1])}
    assert tiny_cache_key(edited, base) != key
    # the key covers the pretraining code: its hash is in the spec, and another recipe hashes apart
    assert tiny.tiny_spec(BUILTIN_RELATIONS, base)["code"] == tiny.pretraining_code_hash()

    def pretrain_tiny(relations, config, progress=True):  # a different recipe
        return None

    other = tiny.pretraining_code_hash((pretrain_tiny,))
    assert other != tiny.pretraining_code_hash((tiny.pretrain_tiny,))
    monkeypatch.setattr(tiny, "PRETRAINING_CODE", other)
    assert tiny_cache_key(BUILTIN_RELATIONS, base) != key


def test_pretraining_config_refuses_bad_values():
    from factorlab.errors import ConfigError

    for bad in (
        {"steps": 0},
        {"lr": float("nan")},
        {"knowledge_share": 1.5},
        {"num_heads": 3},
        {"seed": "0"},
    ):
        with pytest.raises(ConfigError):
            TinyPretrainConfig(**bad)


def test_probe_asks_the_true_world_knowledge_and_nothing_for_arbitrary_relations():
    cf = background_queries(BUILTIN_RELATIONS["city-language-cf"], BUILTIN_RELATIONS)
    causal = background_queries(BUILTIN_RELATIONS["city-language"], BUILTIN_RELATIONS)
    assert [(q.prompt, q.answer) for q in cf] == [(q.prompt, q.answer) for q in causal]
    assert ("People in Paris speak", "French") in [(q.prompt, q.answer) for q in causal]
    assert len(causal) == 10  # 2 background sentences x 5 cities
    assert background_queries(BUILTIN_RELATIONS["country-code"], BUILTIN_RELATIONS) == []
    odd = Relation(
        "odd", True, ("{subject} is in {fact}.",), ("{subject} says {implication}.",),
        (("A", "x"), ("B", "y")), ("{implication} is said in {fact}.",),
    )  # fmt: skip
    assert background_queries(odd, {"odd": odd}) == []  # the implication comes first: cannot be asked


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_shipped_backend_is_the_current_recipe_and_knows_its_world(seed):
    """Seeds 0, 1 and 2 ship with factorlab (every machine runs the grid on the same bits). If this
    fails after a change to the pretraining recipe, rebuild: `factorlab inject pretrain --seed N --ship`
    (a few minutes each), and commit the folders."""
    from factorlab.recipes.inject import cached_backend

    key = tiny_cache_key(BUILTIN_RELATIONS, TinyPretrainConfig(seed=seed))
    folder = shipped_folder(key)
    assert folder is not None, (
        f"the shipped tiny backend is stale: run `factorlab inject pretrain --seed {seed} --ship`"
    )
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["spec"]["config"] == dataclasses.asdict(TinyPretrainConfig(seed=seed))
    backend = cached_backend("tiny", None, seed)
    assert backend.info["source"] == "shipped"
    for name in ("city-language", "city-language-cf"):
        probe = backend.probe(BUILTIN_RELATIONS[name], BUILTIN_RELATIONS)
        assert probe["accuracy"] >= PROBE_THRESHOLD, probe["wrong"]
    assert backend.probe(BUILTIN_RELATIONS["country-code"], BUILTIN_RELATIONS)["accuracy"] is None


@pytest.mark.parametrize(
    ("method", "seed"),
    [
        ("lora", 5),
        pytest.param("lora", 17, marks=pytest.mark.slow),  # a second unseen seed: `pytest -m slow`
        ("full", 5),
        pytest.param("full", 17, marks=pytest.mark.slow),
    ],
)
def test_the_causal_relation_generalizes_on_the_shipped_backend(tmp_path, method, seed):
    """Fine-tuning on new facts generalizes the causal link: the test-implication rank (never shown)
    at most halves, with the training facts memorised.

    Measured spread of after / before (city-language, 3 pretraining x 3 fine-tuning seeds, the
    committed grids): AVX-512 full 0.01-0.14, LoRA r=4 0.09-0.35; AVX2 kernels full 0.06-0.32, LoRA
    0.15-0.44; training-fact rank <= 0.11 everywhere. On the shipped backend with these seeds: LoRA
    0.15 / 0.26-0.27, full 0.08-0.15 / 0.17 on both kernel sets. The assertion (<= 0.5, the
    requirement) leaves 0.06 above the worst run of any seed pair and 0.23 above this backend's.
    """
    from factorlab.recipes.inject import inject_cell

    cell = {"model": "tiny", "relation": "city-language", "method": method, "seed": seed}
    s = inject_cell(cell, tmp_path, save_adapter=tmp_path / "adapter" if method == "lora" else None)
    assert s["probe"]["accuracy"] >= PROBE_THRESHOLD and s["probe_ok"]
    assert s["train_fact_rank"] < 0.1  # memorised (rank 0 is best; guessing gives 2.0)
    assert s["test_implication_rank"] <= 0.5 * s["test_implication_rank_before"]
    assert s["verdict"] == "generalization"
    assert s["machine"]["cpu_capability"] and s["backend"]["source"] == "shipped"
    ranks = json.loads((tmp_path / "ranks.json").read_text())
    assert {r["kind"] for r in ranks} == {"train_fact", "test_fact", "train_implication", "test_implication"}
    assert all(r["answer"] in r["candidates"] for r in ranks)
    if method == "lora":  # the saved adapter reproduces every rank
        import copy

        from factorlab import AdaptedModel
        from factorlab.inject.world import World
        from factorlab.recipes.inject import InjectConfig, cached_backend

        backend = cached_backend("tiny", None, 0)
        cfg = InjectConfig(**cell)
        world = World.generate(BUILTIN_RELATIONS[cfg.relation], seed, cfg.num_subjects, cfg.bridge_fraction)
        loaded = AdaptedModel.from_pretrained(copy.deepcopy(backend.model), tmp_path / "adapter")
        assert backend.ranks(loaded, world.queries()) == [r["rank"] for r in ranks]


def test_a_cell_that_changes_the_shared_base_model_fails_and_the_next_cell_reloads_it(tmp_path, monkeypatch):
    """Grid workers reuse one loaded model across cells; a run that modified it in place would corrupt
    every later cell of that worker, so the cell fails and the model is loaded afresh."""
    from factorlab.errors import SharedModelChangedError
    from factorlab.recipes import inject

    cell = {"model": "tiny", "relation": "city-language", "method": "lora", "seed": 0, "epochs": 1}
    shared = inject.cached_backend("tiny", None, 0)
    assert inject.cached_backend("tiny", None, 0, "cpu") is shared  # defaults spelt out: one model
    real_fine_tune = inject.fine_tune

    def fine_tune_that_touches_the_base(backend, world, settings, progress=None, **watching):
        model, losses = real_fine_tune(backend, world, settings, progress, **watching)
        with torch.no_grad():
            backend.model.get_input_embeddings().weight[3, 0] += 1e-3
        return model, losses

    monkeypatch.setattr(inject, "fine_tune", fine_tune_that_touches_the_base)
    with pytest.raises(SharedModelChangedError, match="changed during lora on city-language, seed 0"):
        inject.inject_cell(cell, tmp_path / "bad")
    monkeypatch.setattr(inject, "fine_tune", real_fine_tune)
    fresh = inject.cached_backend("tiny", None, 0)
    assert fresh is not shared
    assert not torch.equal(fresh.fingerprint, weights_fingerprint(shared.model))
    inject.inject_cell(cell, tmp_path / "good")  # the reloaded model passes its own check
    fresh.check_weights_unchanged("a later cell")


def test_cells_of_one_world_share_the_base_models_ranks(tmp_path, monkeypatch):
    """The ranks before fine-tuning depend on the world and the (unchanged) base model only, so a
    process computes them once per world; they equal a fresh computation."""
    from factorlab.recipes import inject

    backend = inject.cached_backend("tiny", None, 0)
    computed = []
    real_ranks = type(backend).ranks

    def counting_ranks(self, model, queries, batch_size=64):
        computed.append(model is self.model)
        return real_ranks(self, model, queries, batch_size)

    monkeypatch.setattr(type(backend), "ranks", counting_ranks)
    base = {"model": "tiny", "relation": "sport-music", "seed": 11, "epochs": 1}
    first = inject.inject_cell({**base, "method": "lora"}, tmp_path / "a")
    after_first = computed.count(True)
    second = inject.inject_cell({**base, "method": "compacter++"}, tmp_path / "b")
    after_second = computed.count(True)
    other_world = inject.inject_cell({**base, "seed": 12, "method": "lora"}, tmp_path / "c")
    # base model: once per world, and once per process for the known facts unless an earlier cell of
    # this process asked them (the probe's background queries are none here); trained models: at every
    # curve point, at the end, and on the known facts
    assert after_first in (1, 2) and after_second == after_first and computed.count(True) == after_first + 1
    assert computed.count(False) == sum(len(c["curve"]) - 1 + 2 for c in (first, second, other_world))
    for kind in ("train_fact", "test_implication"):
        assert first[f"{kind}_rank_before"] == second[f"{kind}_rank_before"]
    world = inject.World.generate(BUILTIN_RELATIONS["sport-music"], 12, 100, 0.2)
    fresh = real_ranks(backend, backend.model, world.queries())
    rows = json.loads((tmp_path / "c" / "ranks.json").read_text())
    assert [r["rank_before"] for r in rows] == fresh
    assert other_world["test_implication_rank_before"] is not None


def test_a_model_folder_or_relations_file_changed_on_disk_is_loaded_anew(tmp_path):
    """The per-process backend cache is keyed on what the files hold, not only on their names."""
    from factorlab.recipes import inject

    tiny = inject.cached_backend("tiny", None, 0)
    folder = tmp_path / "model"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    first = inject.cached_backend(str(folder), None, 0)
    assert inject.cached_backend(str(folder), None, 0) is first
    with torch.no_grad():
        changed = type(tiny.model)(tiny.model.config)
        changed.load_state_dict(tiny.model.state_dict())
        changed.get_input_embeddings().weight[5, 0] += 1.0
    time.sleep(0.01)  # a later modification time even on coarse-clock file systems
    changed.save_pretrained(folder)
    second = inject.cached_backend(str(folder), None, 0)
    assert second is not first
    assert (
        second.model.get_input_embeddings().weight[5, 0]
        == first.model.get_input_embeddings().weight[5, 0] + 1
    )

    relations = tmp_path / "relations.json"
    assert inject._on_disk("tiny", None) == (None, ())
    relations.write_text('{"a": 1}')
    before = inject._on_disk("tiny", str(relations))
    relations.write_text('{"a": 2}')  # same size, other content
    assert inject._on_disk("tiny", str(relations)) != before
