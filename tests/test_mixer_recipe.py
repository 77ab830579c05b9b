"""The quick preset end to end: every system of the comparison, the router separates the tasks, routing
matters, and the exported PEFT experts plug back in (seed 0)."""

import dataclasses
import json

import pytest
import torch

from factorlab.errors import ConfigError
from factorlab.mixer.config import MixerExperimentConfig
from factorlab.mixer.tasks import SyntheticTasks
from factorlab.recipes.mixer import plug, run_experiment


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("mixer")
    # the baselines trained like any model (multi-task LoRA, Compacter++, full) are a short test of
    # their own below; here the systems that route, merge or plug the experts
    skip = ["full", "multi-task LoRA", "Compacter++"]
    cfg = MixerExperimentConfig.preset_config(
        "quick", seeds=[0], peers=["LoRAHub", "MoLE", "Arrow"], skip=skip
    )
    return cfg, out, run_experiment(cfg, out)


def test_quick_preset_runs_its_systems_and_the_router_separates_tasks(quick):
    from factorlab.mixer.report import SYSTEMS

    cfg, out, result = quick
    assert result["router_accuracy"] > 0.95  # chance: 0.25; the supervised routing term is on by default
    rows = {r["system"]: r for r in result["rows"]}
    short = {  # trained from scratch on the mixed data: the short tests further down
        "HydraLoRA (shared A, routed Bs)",
        "MixLoRA (top-2 FFN experts)",
        "multi-task LoRA (equal total rank)",
        "Compacter++ (multi-task)",
        "full fine-tuning (multi-task)",
    }
    assert list(rows) == [s for s in SYSTEMS if s not in short]
    assert "no verdict" in result["verdict"]  # the multi-task LoRA, its yardstick, was skipped
    mixer = rows["LoRA-Mixer joint (soft)"]
    assert rows["uniform average of experts"]["mean"].mean < mixer["mean"].mean - 0.2  # routing matters
    assert rows["per-task LoRA (oracle)"]["mean"].mean > 0.95
    assert rows["base"]["mean"].mean < 0.2
    hub = rows["LoRAHub (gradient-free merge)"]
    assert hub["trainable"] == len(cfg.tasks)  # one weight per expert
    # one static composition of four single-task experts cannot route: better than the base, well below
    # the routed mixer (the quick tasks' answers conflict, so no single weighting serves them all)
    assert rows["base"]["mean"].mean < hub["mean"].mean < mixer["mean"].mean - 0.2
    mole = rows["MoLE (layer gates)"]
    assert mole["trainable"] < mixer["trainable"]  # gates only, one per layer
    assert mole["mean"].mean > rows["base"]["mean"].mean
    arrow = rows["Arrow (training-free)"]
    assert arrow["trainable"] == 0 and arrow["mean"].mean > rows["base"]["mean"].mean
    for name in ("LoRA-Mixer joint (soft)", "LoRA-Mixer plug-and-play (top-k)", "X-LoRA (peft)"):
        assert rows[name]["routed"].mean > 0.9, name
    # cost columns measured in each cell: training peak memory (systems that train) and evaluation speed
    assert mixer["peak_mb"].mean > 100 and rows["base"].get("peak_mb") is None  # the base trains nothing
    assert all(r["eval_tok_s"].mean > 0 for r in rows.values())
    usage = result["usage"]
    assert torch.equal(usage.argmax(1), torch.arange(len(cfg.tasks)))  # each task mostly uses its expert
    for name in ("report.md", "table.md", "table.csv", "results.json", "accuracy.png", "routing.png"):
        assert (out / name).stat().st_size > 0
    records = json.loads((out / "results.json").read_text())["records"]
    assert len(records) == len(rows) * len(cfg.tasks)


def test_report_from_cells_rebuilds_the_same_table(quick, tmp_path):
    """`factorlab report` on a copy of the cells writes the table the run wrote."""
    import shutil

    from factorlab.recipes.mixer import report_from_cells

    _, out, _ = quick
    shutil.copytree(out / "cells", tmp_path / "cells")
    report_from_cells(tmp_path)
    assert (tmp_path / "table.md").read_text() == (out / "table.md").read_text()


def test_plug_and_play_with_the_exported_peft_experts(quick):
    cfg, out, experiment = quick
    folders = [out / "experts" / t for t in cfg.tasks]
    assert all((f / "adapter_config.json").exists() for f in folders)
    result = plug(dataclasses.replace(cfg, router_steps=300), out / "base", folders, out / "plug")
    records = experiment["records"]
    oracle = {r["task"]: r["accuracy"] for r in records if r["system"] == "per-task LoRA (oracle)"}
    # Each exported PEFT expert, routed alone, is the experiment's oracle: the same weights (the export
    # is exact: test_lora_mixer.py::test_an_exported_expert_is_that_expert_in_peft_and_plugs_back_exactly),
    # so the same accuracy up to greedy choices decided by float rounding. The plugged experts are frozen,
    # the oracle's were trainable, and PyTorch picks its matmul kernels by requires_grad; measured on the
    # 512 test prompts per task: 0 answers differ with AVX-512 kernels, 1 with AVX2 (one task), 0 with SSE.
    flipped = [round(abs(result["oracle"][t] - oracle[t]) * cfg.eval_examples_per_task) for t in cfg.tasks]
    assert max(flipped) <= 2, flipped
    assert result["router_accuracy"] > 0.75
    assert sum(result["accuracy"].values()) / len(cfg.tasks) > 0.9


def test_supervised_routing_term_routes_every_sample_with_few_router_steps(quick, tmp_path):
    """Ours (route_label_coef): with task labels, 30 router steps route every held-out sample of the
    quick preset to its task's expert. Measured on seeds 0 and 1: 1.000 with the term, 0.814-0.881
    with the paper's losses alone; the bounds leave 0.03 and 0.07 of room."""
    cfg, out, _ = quick
    folders = [out / "experts" / t for t in cfg.tasks]
    short = dataclasses.replace(cfg, router_steps=30, route_label_coef=0.0)
    paper = plug(short, out / "base", folders, tmp_path / "paper")
    supervised = plug(
        dataclasses.replace(short, route_label_coef=1.0), out / "base", folders, tmp_path / "ours"
    )
    assert supervised["router_accuracy"] >= 0.97
    assert paper["router_accuracy"] < supervised["router_accuracy"] - 0.05
    again = plug(short, out / "base", folders, tmp_path / "again")
    assert again["router_accuracy"] == paper["router_accuracy"]  # seeded: the same run twice


def test_train_router_on_peft_supervises_routing_by_default(quick):
    """Its data are per task, so the labels exist: the recipes' default (route_label_coef 1) applies."""
    from transformers import AutoModelForCausalLM

    from factorlab.mixer.tasks import make_tasks, train_and_eval_sets
    from factorlab.mixer.train import train_router_on_peft

    cfg, out, _ = quick
    tasks, pad_id = make_tasks(cfg)
    data, _ = train_and_eval_sets(tasks, 8, 1, seed=0)
    folders = [out / "experts" / t for t in cfg.tasks]
    for given, expected in (({}, 1.0), ({"route_label_coef": 0.0}, 0.0)):
        base = AutoModelForCausalLM.from_pretrained(out / "base")
        adapted = train_router_on_peft(base, folders, data, 1, 1e-3, 4, pad_id=pad_id, **given)
        assert adapted.adapter_configs[adapted.active_adapter].route_label_coef == expected


def test_plug_needs_one_task_per_adapter(quick, tmp_path):
    cfg, out, _ = quick
    with pytest.raises(ConfigError, match="one task per adapter"):
        plug(cfg, out / "base", [out / "experts" / cfg.tasks[0]], tmp_path)


def test_synthetic_tasks_are_seeded_and_disjoint():
    tasks = SyntheticTasks(["first", "max"])
    a, b = tasks.examples(0, 5, seed=3), tasks.examples(0, 5, seed=3)
    assert [e.prompt for e in a] == [e.prompt for e in b]
    first, maxi = tasks.examples(0, 50, 1), tasks.examples(1, 50, 1)
    assert {t for e in first for t in e.prompt}.isdisjoint({t for e in maxi for t in e.prompt})
    assert all(e.answer[0] == e.prompt[0] for e in first)
    assert all(e.answer[0] == max(e.prompt[:-1]) for e in maxi)
    with pytest.raises(ConfigError, match="unknown synthetic task"):
        SyntheticTasks(["first", "median"])


def test_gym_tasks_are_chat_prompts_with_short_answers_and_disjoint_splits():
    pytest.importorskip("reasoning_gym")
    from factorlab.mixer.tasks import GymTasks, train_and_eval_sets
    from factorlab.models import OFFLINE, smollm2_available, smollm2_folder

    if smollm2_available():
        pytest.skip(smollm2_available())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder(), **OFFLINE)
    cfg = MixerExperimentConfig.preset_config("smollm2")
    tasks = GymTasks(cfg.tasks, tokenizer)
    data, evals = train_and_eval_sets(tasks, 300, 200, seed=0)
    start = tokenizer("<|im_start|>", add_special_tokens=False)["input_ids"]
    for k in range(len(cfg.tasks)):
        train_q = [e.meta[1]["question"] for e in data[k]]
        test_q = [e.meta[1]["question"] for e in evals[k]]
        assert len(set(train_q)) == 300 and len(set(test_q)) == 200 and not set(train_q) & set(test_q)
        for e in evals[k]:
            assert e.prompt[: len(start)] == start  # SmolLM2-Instruct's chat template
            assert len(e.answer) <= 9 and e.answer[-1] == tokenizer.eos_token_id
            assert tasks.score(e, e.answer) == 1.0  # the task's own scorer accepts the true answer
    again = train_and_eval_sets(tasks, 300, 200, seed=0)[1]
    assert [e.prompt for e in again[0]] == [e.prompt for e in evals[0]]  # seeded


def _tiny_gym_like():
    cfg = MixerExperimentConfig.preset_config("quick", seeds=[0])
    from factorlab.mixer.config import build_base
    from factorlab.mixer.tasks import train_and_eval_sets

    tasks = SyntheticTasks(cfg.tasks)
    data, evals = train_and_eval_sets(tasks, 40, 8, seed=0)
    return cfg, tasks, data, evals, build_base(cfg, tasks, 0)


def test_packed_training_equals_padded_training():
    """Batches without task ids train as one packed row: the same weights as the padded batches."""
    from factorlab.mixer.systems import multitask_lora
    from factorlab.mixer.train import train

    torch.set_num_threads(1)
    cfg, _, data, _, base = _tiny_gym_like()
    # unequal prompt lengths, so the padded batches really hold padding
    data = [[dataclasses.replace(e, prompt=e.prompt[: 3 + i % 4]) for i, e in enumerate(d)] for d in data]
    runs = {}
    for packed in (True, False):
        torch.manual_seed(0)
        model = multitask_lora(cfg, base)
        trained = [p for p in model.parameters() if p.requires_grad]
        start = [p.detach().clone() for p in trained]
        losses = train(model, data, 3, 1e-2, 8, 0, hard=False, pad_id=0, pack_batches=packed)
        runs[packed] = (losses, [p.detach() - p0 for p, p0 in zip(trained, start)])
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-5, atol=1e-6)
    # Each tensor's update as a whole: the packed and padded sums round differently and Adam carries that
    # into single entries (up to 1.3e-5 with SSE kernels). Measured ||packed - padded|| / ||padded||, worst
    # tensor: 8.3e-6 (AVX-512), 1.4e-5 (AVX2), 3.7e-5 (SSE).
    for a, b in zip(runs[True][1], runs[False][1]):
        assert float(b.norm()) > 0.1
        assert float((a - b).norm() / b.norm()) < 3e-4


def test_greedy_decoding_without_a_cache_equals_generate():
    """The loop for cache-less models (X-LoRA) returns generate()'s tokens up to and including the end."""
    import copy

    from factorlab.mixer.evaluate import predict

    torch.set_num_threads(1)
    _, _, _, evals, base = _tiny_gym_like()
    examples = [
        dataclasses.replace(e, prompt=e.prompt[: 2 + i % 5]) for i, e in enumerate(evals[0] + evals[1])
    ]
    free = predict(base, examples, pad_id=0, max_new_tokens=6, batch_size=5)
    # end texts at a token greedy decoding reaches at step 2 somewhere, so texts end at different steps
    stop = max({row[1] for row in free}, key=lambda t: sum(row[1] == t for row in free))
    base.generation_config.eos_token_id = stop
    cached = predict(base, examples, pad_id=0, max_new_tokens=6, batch_size=5)
    no_cache = copy.deepcopy(base)
    no_cache.config.use_cache = False
    looped = predict(no_cache, examples, pad_id=0, max_new_tokens=6, batch_size=5)
    ended = 0
    for full, short in zip(cached, looped):
        cut = full.index(stop) + 1 if stop in full else len(full)
        assert short == full[:cut]
        ended += cut < len(full)
    assert ended  # some text stopped early, so dropping finished texts was exercised


def test_a_phase_two_cell_without_its_experts_cell_is_a_clear_error(tmp_path):
    from factorlab.recipes.mixer import comparison_cell, comparison_cells

    cfg = MixerExperimentConfig.preset_config("quick", seeds=[0], eval_examples_per_task=8)
    joint = next(c for c in comparison_cells(cfg)[1] if c["unit"] == "joint")
    with pytest.raises(ConfigError, match="needs the same seed's experts cell first"):
        comparison_cell(joint, tmp_path / "cells" / "joint")


def test_full_fine_tuning_runs_on_the_chosen_seeds_only():
    from factorlab.recipes.mixer import comparison_cells

    quick = MixerExperimentConfig.preset_config("quick", seeds=[0, 1, 2], full_seeds=[1])
    first, second = comparison_cells(quick)
    assert [c["seed"] for c in first if c["unit"] == "full"] == [1]
    assert sum(c["unit"] == "experts" for c in first) == 3 and len(second) == 9
    # which seeds exist is not part of a cell, so adding a seed reuses every finished cell
    fewer = comparison_cells(MixerExperimentConfig.preset_config("quick", seeds=[0], full_seeds=[1]))
    assert all(c in first + second for c in fewer[0] + fewer[1])


def test_a_phase_two_cell_whose_expert_weights_are_gone_says_how_to_recover(tmp_path):
    """A clean clone has the experts cell's summary but not its weights (results/ keeps them out of git)."""
    from factorlab.grid import cell_id
    from factorlab.recipes.mixer import comparison_cell, comparison_cells

    cfg = MixerExperimentConfig.preset_config("quick", seeds=[0], eval_examples_per_task=8)
    first, second = comparison_cells(cfg)
    experts = next(c for c in first if c["unit"] == "experts")
    folder = tmp_path / "cells" / cell_id(experts)
    (folder / "experts" / cfg.tasks[0]).mkdir(parents=True)
    (folder / "experts" / cfg.tasks[0] / "adapter_config.json").write_text("{}")
    (folder / "summary.json").write_text(json.dumps({"cell": experts, "records": [], "systems": {}}))
    plug_cell = next(c for c in second if c["unit"] == "plug")
    with pytest.raises(ConfigError, match=r"adapter_model\.safetensors is missing: delete .* and rerun"):
        comparison_cell(plug_cell, tmp_path / "cells" / cell_id(plug_cell))


def test_the_peers_trained_from_scratch_run_as_cells_of_the_comparison(tmp_path):
    """HydraLoRA and MixLoRA as units of `mixer run` (a short run: their math is tests/test_peers.py's):
    each learns the tasks, with the parameter counts of its design."""
    from factorlab.recipes.mixer import comparison_cell, comparison_cells

    cfg = MixerExperimentConfig.preset_config(
        "quick", seeds=[0], steps=300, eval_examples_per_task=32, peers=["HydraLoRA", "MixLoRA"]
    )
    cells = {c["unit"]: c for c in comparison_cells(cfg)[0]}
    hydra = comparison_cell(cells["HydraLoRA"], tmp_path / "hydra")
    mix = comparison_cell(cells["MixLoRA"], tmp_path / "mix")
    h = hydra["systems"]["HydraLoRA (shared A, routed Bs)"]
    m = mix["systems"]["MixLoRA (top-2 FFN experts)"]
    E, r = len(cfg.tasks), cfg.r
    hidden, inter, layers = 64, 128, 2  # the quick preset's tiny Llama
    outs = [64, 32, 32, 64]  # q, k, v, o (two key/value heads of 16): LoRA-Mixer's default targets
    # HydraLoRA per projection: one A (r x in), E Bs (out x r), a router (E x in)
    assert h["trainable"] == layers * sum(r * hidden + E * out * r + E * hidden for out in outs)
    # MixLoRA: a LoRA per attention projection; per FFN a router and E experts on gate, up and down
    ffn_expert = r * (hidden + inter) * 2 + r * (inter + hidden)
    attention = sum(r * (hidden + out) for out in outs)
    assert m["trainable"] == layers * (attention + E * hidden + E * ffn_expert)
    for out in (hydra, mix):
        mean = sum(r["accuracy"] for r in out["records"]) / len(out["records"])
        assert mean > 0.3, out["records"]  # the base model: ~0.03


def test_the_baselines_trained_like_any_model_run_as_cells_of_the_comparison(tmp_path):
    """The multi-task LoRA (the mixer's yardstick), Compacter++ and full fine-tuning as units of
    `mixer run` (a short run): each learns the tasks, with the parameter count of its design."""
    from factorlab.mixer.config import build_base
    from factorlab.mixer.tasks import make_tasks
    from factorlab.recipes.mixer import comparison_cell, comparison_cells

    cfg = MixerExperimentConfig.preset_config("quick", seeds=[0], steps=300, eval_examples_per_task=32)
    cells = {c["unit"]: c for c in comparison_cells(cfg)[0]}
    runs = {u: comparison_cell(cells[u], tmp_path / u) for u in ("multi-task LoRA", "Compacter++", "full")}
    single = runs["multi-task LoRA"]["systems"]["multi-task LoRA (equal total rank)"]
    E, r, hidden, layers = len(cfg.tasks), cfg.r, 64, 2
    outs = [64, 32, 32, 64]  # q, k, v, o of the quick preset's tiny Llama
    # one LoRA of rank E * r on each projection: as many weights as the E experts of rank r together
    assert single["trainable"] == layers * sum(E * r * (hidden + out) for out in outs)
    base = build_base(cfg, make_tasks(cfg)[0], 0)
    full = runs["full"]["systems"]["full fine-tuning (multi-task)"]
    assert full["trainable"] == sum(p.numel() for p in base.parameters())
    compacter = runs["Compacter++"]["systems"]["Compacter++ (multi-task)"]
    assert 0 < compacter["trainable"] < single["trainable"]
    # measured (AVX2, 32 prompts per task): multi-task LoRA 0.969, full 1.000, Compacter++ 0.344 (it
    # learns slowest: 0.54 after the preset's 1500 steps, 3 seeds); the base model: ~0.03
    floors = {"multi-task LoRA": 0.8, "full": 0.8, "Compacter++": 0.15}
    for unit, out in runs.items():
        mean = sum(r["accuracy"] for r in out["records"]) / len(out["records"])
        assert mean > floors[unit], (unit, out["records"])
