import json
import re
from pathlib import Path

import pytest

from factorlab.errors import ConfigError
from factorlab.grid import cell_id, run_grid
from factorlab.inject.world import BUILTIN_RELATIONS, World, load_relations, relation_by_name


@pytest.mark.parametrize("name", sorted(BUILTIN_RELATIONS))
def test_world_split_texts_and_candidates(name):
    relation = BUILTIN_RELATIONS[name]
    world = World.generate(relation, seed=3)
    assert len(world.subjects) == 100 and len(set(world.subjects)) == 100
    assert len(world.bridge) == 20 and set(world.bridge).isdisjoint(world.test)
    assert sorted(world.bridge + world.test) == sorted(world.subjects)
    texts = world.training_texts()
    for subject in world.test:  # no test subject's implication appears in any training text
        mentioned = [t for t in texts if re.search(rf"\b{subject}\b", t)]
        assert mentioned and all(world.implication(subject) not in t for t in mentioned)
        trained = [f for f in relation.fact if f != world.held_out_fact_template]
        assert sorted(mentioned) == sorted(
            f.format(subject=subject, fact=world.fact[subject]) for f in trained
        )
    for q in world.queries():  # the answer is among the candidates exactly once
        assert q.candidates.count(q.answer) == 1
        assert q.prompt in [
            t.format(subject=q.subject, fact="§", implication="§").split(" §")[0]
            for t in (*relation.fact, *relation.implication)
        ]
    kinds = {q.kind for q in world.queries()}
    assert kinds == {"train_fact", "test_fact", "train_implication", "test_implication"}
    # every fact answer has the same share of bridge subjects
    per_answer = {a: sum(world.fact[s] == a for s in world.bridge) for a in relation.fact_answers}
    assert set(per_answer.values()) == {4}


def test_same_seed_same_world_and_the_held_out_phrasing_is_not_trained():
    relation = BUILTIN_RELATIONS["city-language"]
    a, b = World.generate(relation, seed=5), World.generate(relation, seed=5)
    assert a.subjects == b.subjects and a.fact == b.fact and a.bridge == b.bridge
    assert World.generate(relation, seed=6).subjects != a.subjects
    held = a.held_out_fact_template.split("{subject}")[0]
    assert held and not any(t.startswith(held) for t in a.training_texts())


def test_counterfactual_contradicts_world_knowledge():
    causal, cf = BUILTIN_RELATIONS["city-language"], BUILTIN_RELATIONS["city-language-cf"]
    assert causal.causal and not cf.causal
    assert all(causal.implication_of(c) != cf.implication_of(c) for c in causal.fact_answers)


def test_relations_from_yaml_and_json(tmp_path):
    spec = [
        {
            "name": "planet-hobby",
            "causal": False,
            "fact": ["{subject} was born on {fact}."],
            "implication": ["{subject} collects {implication}."],
            "pairs": [["Mars", "stamps"], ["Venus", "coins"], ["Jupiter", "shells"]],
        }
    ]
    (tmp_path / "r.json").write_text(json.dumps(spec))
    (tmp_path / "r.yaml").write_text(
        "- name: planet-hobby\n  causal: false\n  fact: ['{subject} was born on {fact}.']\n"
        "  implication: ['{subject} collects {implication}.']\n"
        "  pairs: [[Mars, stamps], [Venus, coins], [Jupiter, shells]]\n"
    )
    for file in ("r.json", "r.yaml"):
        relations = load_relations(tmp_path / file)
        world = World.generate(relations["planet-hobby"], seed=0, num_subjects=30)
        assert world.training_texts()[0].endswith(".")
    assert relation_by_name("planet-hobby", relations).pairs[0] == ("Mars", "stamps")


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"fact": ["{fact} is where {subject} lives."]}, "end with"),
        ({"pairs": [["A", "x"]]}, "at least two"),
        ({"pairs": [["A", "x"], ["A", "y"]]}, "distinct"),
    ],
)
def test_bad_relations_are_refused(tmp_path, bad, message):
    spec = {
        "name": "x",
        "causal": True,
        "fact": ["{subject} lives in {fact}."],
        "implication": ["{subject} speaks {implication}."],
        "pairs": [["A", "x"], ["B", "y"]],
        **bad,
    }
    (tmp_path / "r.json").write_text(json.dumps([spec]))
    with pytest.raises(ConfigError, match=message):
        load_relations(tmp_path / "r.json")


def _square(cell, folder: Path):
    if cell["x"] < 0:
        raise ValueError("negative")
    return {"y": cell["x"] ** 2}


def test_grid_runs_cells_once_and_reuses_finished_ones(tmp_path):
    cells = [{"x": i} for i in range(5)]
    first = run_grid("test_inject:_square", cells, tmp_path, workers=2)
    assert first.ran == 5 and first.reused == 0 and [r["y"] for r in first.results] == [0, 1, 4, 9, 16]
    (tmp_path / "cells" / cell_id(cells[2]) / "summary.json").unlink()  # as if that cell never finished
    second = run_grid("test_inject:_square", cells, tmp_path, workers=2)
    assert second.ran == 1 and second.reused == 4
    failing = run_grid("test_inject:_square", [{"x": -1}], tmp_path, workers=1)
    assert failing.failed and "negative" in failing.failed[0][1]


def test_a_summary_written_for_another_cell_or_corrupt_is_recomputed(tmp_path):
    cells = [{"x": 2}, {"x": 3}, {"x": 4}]
    run_grid("test_inject:_square", cells, tmp_path, workers=1)
    folders = [tmp_path / "cells" / cell_id(c) for c in cells]
    # another cell's summary copied over the first; garbage and a bare {} in the others
    (folders[0] / "summary.json").write_text((folders[1] / "summary.json").read_text())
    (folders[1] / "summary.json").write_bytes(b"\xff\xfe not json")
    (folders[2] / "summary.json").write_text("{}")
    again = run_grid("test_inject:_square", cells, tmp_path, workers=1)
    assert again.ran == 3 and again.reused == 0
    assert [r["y"] for r in again.results] == [4, 9, 16]
    (folders[0] / "summary.json").unlink()
    (folders[0] / "summary.json").mkdir()  # a directory where the file should be
    third = run_grid("test_inject:_square", cells[1:], tmp_path, workers=1)
    assert third.reused == 2 and third.ran == 0


def test_grid_report_names_unmemorised_cells_and_quotes_the_paper_for_real_models(tmp_path):
    from factorlab.grid import GridReport
    from factorlab.inject.report import write_grid_report

    def summary(method, r, seed, train_fact):
        ranks = {f"{k}_rank": 0.2 for k in ("train_implication", "test_fact", "test_implication")}
        before = {
            f"{k}_rank_before": 2.0
            for k in ("train_fact", "train_implication", "test_fact", "test_implication")
        }
        return {
            "config": {
                "model": "smollm2",
                "relation": "city-language",
                "method": method,
                "r": r,
                "seed": seed,
            },
            "causal": True,
            "train_fact_rank": train_fact,
            **ranks,
            **before,
            "probe": {"accuracy": 0.9},
            "verdict": "generalization",
            "seconds": 1.0,
            "num_candidates": 5,
            "machine": {"cpu_capability": "AVX512"},
        }

    report = GridReport(
        results=[summary("lora", 4, 0, 0.0), summary("lora", 4, 1, 0.9), summary("full", 4, 0, 0.1)]
    )
    report.results[2]["machine"] = {"cpu_capability": "AVX512", "gpu": "NVIDIA H200"}
    write_grid_report(tmp_path, report, 3.0)
    text = (tmp_path / "report.md").read_text()
    assert "1 of 3 cells did not memorise" in text and "seed 1 (0.90)" in text
    assert "| 1 | AVX512 |" in text and "| 1 | NVIDIA H200 |" in text  # each cell says where it ran
    assert "The paper's LLMs" in text and "| Gemma-2-9B | 0.00 |" in text
    report.results[1]["train_fact_rank"] = 0.3
    write_grid_report(tmp_path, report, 3.0)
    assert "Every cell memorised its training facts" in (tmp_path / "report.md").read_text()


def test_a_learning_rate_and_epochs_sweep_multiplies_the_grid_and_keeps_the_plain_cells_ids():
    from factorlab.errors import ConfigError
    from factorlab.grid import cell_id
    from factorlab.recipes.inject import grid_cells

    args = ("tiny", ["country-code"], ["full", "lora"], [0], 4)
    plain = grid_cells(*args)
    swept = grid_cells(*args, lr_scales=[0.3, 1, 3])
    assert len(swept) == 3 * len(plain)
    assert {cell_id(c) for c in plain} <= {cell_id(c) for c in swept}  # scale 1: the plain cells, reused
    for method in ("full", "lora"):
        default = next(c["lr"] for c in plain if c["method"] == method)
        lrs = sorted({c["lr"] for c in swept if c["method"] == method})
        assert lrs == pytest.approx([0.3 * default, default, 3 * default])
    both = grid_cells(*args, lr_scales=[0.5, 1], epochs_sweep=[4, 8])
    assert len(both) == 4 * len(plain) and {c["epochs"] for c in both} == {4, 8}
    assert len({cell_id(c) for c in both}) == len(both)
    with pytest.raises(ConfigError, match=r"lr_scales must hold positive numbers, got \[0\]"):
        grid_cells(*args, lr_scales=[0])
    with pytest.raises(ConfigError, match="give --epochs or --epochs-sweep, not both"):
        grid_cells(*args, epochs_sweep=[2], epochs=3)


def test_swept_learning_rates_and_epochs_get_rows_of_their_own():
    """An lr / epochs sweep's cells are labelled apart from the default's, so they never average as if
    they were seeds of one method; the plain grid's labels do not change."""
    from factorlab.inject.report import method_label

    default = {"model": "smollm2", "method": "lora", "r": 4, "lr": 1e-3, "epochs": 8}
    assert method_label(default) == "lora r=4"
    assert method_label({**default, "lr": 3e-3}) == "lora r=4 lr=0.003"
    assert method_label({**default, "lr": 3e-3, "epochs": 16}) == "lora r=4 lr=0.003 epochs=16"
    assert method_label({**default, "method": "full", "lr": 3e-5}) == "full"  # full's own default
    assert method_label({"model": "tiny", "method": "full", "r": 4, "lr": 3e-3, "epochs": 30}) == "full"


def test_an_lr_epochs_sweep_reports_each_setting_apart(tmp_path):
    from factorlab.recipes.inject import grid, grid_cells

    cells = grid_cells("tiny", ["city-language"], ["lora"], [0], 4, lr_scales=[1, 3], epochs_sweep=[1, 2])
    grid(cells, tmp_path, workers=1, pack=4)
    table = (tmp_path / "table.md").read_text()
    for label in ("lora r=4 epochs=1", "lora r=4 epochs=2", "lora r=4 lr=0.015 epochs=1"):
        assert f"| {label} |" in table  # one row each: never averaged as if seeds of one method
    report = (tmp_path / "report.md").read_text()
    assert "## Learning rate and epochs" in report
    sweep = (tmp_path / "lr_epochs_lora_r_4.md").read_text().splitlines()
    assert len(sweep) == 2 + 4  # header, rule, one row per (lr, epochs)
    assert sweep[2].startswith("| 0.005 | 1 |") and sweep[-1].startswith("| 0.015 | 2 |")
