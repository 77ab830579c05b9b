"""What every injection cell measures beside its final ranks (issue 33): the curves during training,
the facts the base model knew, and worlds that share nothing with the tiny backend's pretraining."""

import pytest

from factorlab.inject.tiny import TinyPretrainConfig, backend_key, pretraining_world, tiny_cache_key
from factorlab.inject.world import BUILTIN_RELATIONS, World, name_pool


def test_no_pretraining_name_or_sentence_appears_in_any_injection_world():
    pretraining = [pretraining_world(BUILTIN_RELATIONS, TinyPretrainConfig(seed=s)) for s in range(3)]
    people = {p for w in pretraining for by_person in w.people.values() for p in by_person}
    sentences = {t for w in pretraining for t in w.statements}
    assert people and all(name_pool(p) == "pretraining" for p in people)
    for relation in BUILTIN_RELATIONS.values():
        for seed in range(10):
            world = World.generate(relation, seed)
            assert not set(world.subjects) & people, (relation.name, seed)
            texts = set(world.training_texts()) | {f"{q.prompt} {q.answer}." for q in world.queries()}
            assert not texts & sentences, (relation.name, seed)


def test_worlds_made_before_the_pools_are_still_reproducible():
    relation = BUILTIN_RELATIONS["city-language"]
    old = World.generate(relation, 0, names="any")
    assert {name_pool(n) for n in old.subjects} == {"world", "pretraining"}  # the whole name space
    assert all(name_pool(n) == "world" for n in World.generate(relation, 0).subjects)
    with pytest.raises(Exception, match="names must be one of"):
        World.generate(relation, 0, names="some")


def test_a_backend_pretrained_here_is_keyed_by_its_kernels(monkeypatch):
    import factorlab.inject.tiny as tiny

    shipped = TinyPretrainConfig(seed=0)
    assert backend_key(BUILTIN_RELATIONS, shipped) == tiny_cache_key(BUILTIN_RELATIONS, shipped)
    local = TinyPretrainConfig(seed=7)
    keys = {}
    for capability, overrides in (
        ("AVX512", {}),
        ("AVX2", {}),
        ("AVX2", {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}),
    ):
        info = {"cpu_capability": capability, "kernel_overrides": overrides}
        monkeypatch.setattr(tiny, "machine_info", lambda info=info: info)
        keys[(capability, str(overrides))] = backend_key(BUILTIN_RELATIONS, local)
    assert len(set(keys.values())) == 3
    assert all(k.startswith(tiny_cache_key(BUILTIN_RELATIONS, local)) for k in keys.values())


def test_a_cell_keeps_its_curves_and_the_known_facts_before_and_after(tmp_path):
    from factorlab.recipes.inject import CURVE_POINTS, inject_cell

    summary = inject_cell(
        {"model": "tiny", "relation": "city-language", "method": "lora", "epochs": 2}, tmp_path
    )
    curve = summary["curve"]
    steps = [p["step"] for p in curve]
    assert steps[0] == 0 and steps[-1] == summary["steps"] and steps == sorted(set(steps))
    assert len(curve) == CURVE_POINTS + 1
    assert curve[0]["train_fact"] == pytest.approx(
        summary["train_fact_rank_before"], abs=2.0
    )  # a subset of the queries: the same scale
    assert all(
        set(p) == {"step", "train_fact", "test_fact", "train_implication", "test_implication"} for p in curve
    )
    known = summary["known"]
    assert known["queries"] >= 5 * 20 and 0 <= known["top1_after"] <= 1
    assert known["top1_drop"] == pytest.approx(known["top1_before"] - known["top1_after"])
    assert known["top1_before"] >= 0.9  # the tiny backend knows its background and its people


def test_intervals_use_the_backend_as_the_unit_when_runs_are_nested():
    from factorlab.reporting import aggregate

    # 3 backends x 3 seeds: the seeds of one backend agree closely, the backends do not
    records = [
        {"g": "a", "pretrain_seed": b, "seed": s, "x": b + 0.01 * s} for b in range(3) for s in range(3)
    ]
    flat = aggregate(records, ["g"], ["x"])[0]
    nested = aggregate(records, ["g"], ["x"], unit="pretrain_seed")[0]
    assert flat["x"].n == 9 and nested["x"].n == 3 and nested["seeds"] == 9
    assert nested["x"].mean == pytest.approx(flat["x"].mean)
    assert nested["x"].ci95 > 2 * flat["x"].ci95  # nested runs made the flat interval too narrow


def test_the_spectrum_correlation_and_its_reading():
    from factorlab.inject import analysis

    def cell(causal, nuclear, rank):
        return {
            "causal": causal,
            "config": {"method": "lora", "relation": "r"},
            "test_implication_rank": rank,
            "update": {"all": {"nuclear": nuclear, "frobenius": 1.0}},
            "world": {"subjects": 100},
        }

    rising = [cell(True, 1 + i, 0.1 * i) for i in range(12)]
    falling = [cell(False, 1 + i, 2 - 0.1 * i + 0.05 * (i % 2)) for i in range(12)]
    rows = analysis.spectrum_correlations(analysis.spectrum_points(rising + falling))
    by = {(r["method"], r["kind"], r["measure"]): r for r in rows}
    assert {r["method"] for r in rows} == {analysis.WITHIN, "all methods", "lora"}  # seeds, methods, each
    causal = by[("all methods", "causal", "nuclear / Frobenius")]
    assert causal["cells"] == 12 and causal["r"] == pytest.approx(1.0)
    assert analysis.verdict_of(causal).startswith("supports")
    assert analysis.verdict_of(by[("lora", "non-causal", "nuclear per training fact")]).startswith(
        "contradicts"
    )
    assert analysis.verdict_of({"r": None, "interval": None}).startswith("too few cells")
    # a perfect correlation over 3 cells still gets no interval, hence no reading
    few = analysis.spectrum_correlations(analysis.spectrum_points(rising[:3]))
    assert few[0]["r"] == pytest.approx(1.0) and few[0]["interval"] is None
    assert analysis.verdict_of(few[0]).startswith("too few cells")
    assert analysis.pearson([1, 2], [1, 2]) is None  # fewer than 3 cells


def test_the_within_setup_correlation_compares_seeds_of_one_setup_only():
    """Across methods a large-norm method that transfers most gives r < 0 (Simpson's paradox); within
    each (method, relation) the seeds with the lower norm have the lower rank: the centred rows see that."""
    from factorlab.inject import analysis

    points = []
    for method, (norm, rank) in {
        "full": (100.0, 0.2),
        "lora": (10.0, 1.0),
        "compacter++": (1.0, 1.8),
    }.items():
        for relation in ("a", "b"):
            for seed in range(4):
                points.append(
                    {"model": "m", "method": method, "relation": relation, "causal": False,
                     "nuclear / Frobenius": norm + seed, "test_implication_rank": rank + 0.01 * seed}
                )  # fmt: skip
    xs = [p["nuclear / Frobenius"] for p in points]
    assert analysis.pearson(xs, [p["test_implication_rank"] for p in points]) < -0.5
    assert analysis.centred_pearson(points, "nuclear / Frobenius") == pytest.approx(1.0)
    rows = analysis.spectrum_correlations(
        [{**p, "nuclear per training fact": p["nuclear / Frobenius"] / 100} for p in points]
    )
    within = next(r for r in rows if r["method"] == analysis.WITHIN and r["kind"] == "non-causal")
    assert within["cells"] == 24 and analysis.verdict_of(within).startswith("supports")


def test_watching_the_curves_does_not_change_what_is_trained():
    import torch

    from factorlab.inject.pack import Member, fine_tune_packed
    from factorlab.inject.train import FineTuneSettings, fine_tune
    from factorlab.recipes.inject import cached_backend

    backend = cached_backend("tiny", None, 0)
    world = World.generate(BUILTIN_RELATIONS["sport-music"], 4)
    settings = FineTuneSettings("lora", 4, 8.0, None, 1, None, seed=4)
    seen = []
    plain, _ = fine_tune(backend, world, settings)
    watched, _ = fine_tune(
        backend,
        world,
        settings,
        watch=lambda step, m: seen.append(backend.ranks(m, world.queries()[:8])),
        watch_steps=[3, 7],
    )
    assert len(seen) == 2
    for (name, a), (_, b) in zip(plain.named_parameters(), watched.named_parameters()):
        assert torch.equal(a, b), name
    members = [
        Member(world, settings),
        Member(World.generate(BUILTIN_RELATIONS["country-code"], 5), settings),
    ]
    quiet, _ = fine_tune_packed(backend, members)
    loud, _ = fine_tune_packed(
        backend,
        members,
        watch=lambda k, step, pack: seen.append(backend.ranks(pack, world.queries()[:8])),
        watch_steps=[[2], [5]],
    )
    assert len(seen) == 4
    for k in range(2):
        for name, (a, b, _) in quiet.factors(k).items():
            assert torch.equal(a, loud.factors(k)[name][0]) and torch.equal(b, loud.factors(k)[name][1]), name
