"""Inputs that raised a raw exception from the standard library, torch, transformers or Ray, or silently
made a wrong experiment: each is now one factorlab error naming the fix, raised before any work, and a
refusal leaves model and files as they were (the attacker's report behind issue 29, class by class)."""

import errno
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

import factorlab
from factorlab.errors import (
    AdapterLoadError,
    AdapterSaveError,
    ConfigError,
    FactorlabError,
    ResourceError,
    TargetError,
    explain,
)
from hostile import RELATION, alias_bomb
from tiny_models import build, inputs

CLI = [sys.executable, "-m", "factorlab"]


def cli(*args, timeout=120, env=None):
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def assert_one_line(result, *needles):
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    for needle in needles:
        assert needle in result.stderr, result.stderr[-2000:]


def snapshot(model):
    return [n for n, _ in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model, before):
    names, state = before
    after = model.state_dict()
    return [n for n, _ in model.named_modules()] == names and all(
        torch.equal(state[k], after[k]) for k in state
    )


@pytest.fixture
def saved(tmp_path):
    adapted = factorlab.adapt(build("llama"), factorlab.LoraConfig(r=2, target_modules=["q_proj"]))
    adapted.save_pretrained(tmp_path / "a")
    return tmp_path / "a"


# ---- file-system objects in place of files ----------------------------------------------------------


@pytest.mark.parametrize("what", ["config-dir", "weights-dir", "config-fifo", "config-huge", "config-binary"])
def test_file_system_objects_in_place_of_adapter_files_are_refused(saved, what):
    config, weights = saved / "adapter_config.json", saved / "adapter_model.safetensors"
    if what == "config-dir":
        config.unlink()
        config.mkdir()
        message = "is a folder where a file is expected"
    elif what == "weights-dir":
        weights.unlink()
        weights.mkdir()
        message = "is a folder, not a weights file"
    elif what == "config-fifo":  # opening a pipe for reading would wait forever
        config.unlink()
        os.mkfifo(config)
        message = "not a regular file"
    elif what == "config-huge":
        config.write_text(" " * 10_000_001)
        message = "at most 10,000,000 bytes (10 MB) are read"
    else:
        config.write_bytes(b"\xff\xfe{}")
        message = "not UTF-8"
    model = build("llama")
    before = snapshot(model)
    with pytest.raises(AdapterLoadError, match=re.escape(message)):
        factorlab.AdaptedModel.from_pretrained(model, saved)
    assert unchanged(model, before)


@pytest.mark.parametrize("where", ["a-file", "under-a-file", "weights-name-is-a-folder"])
def test_saving_where_a_file_or_folder_is_in_the_way_is_refused_and_writes_nothing(tmp_path, where):
    adapted = factorlab.adapt(build("llama"), factorlab.LoraConfig(r=2, target_modules=["q_proj"]))
    (tmp_path / "file").write_text("keep")
    if where == "a-file":
        target, message = tmp_path / "file", "it is a file, and an adapter is a folder"
    elif where == "under-a-file":
        target, message = tmp_path / "file" / "sub", "has a file where a folder is expected"
    else:
        target = tmp_path / "folder"
        (target / "adapter_model.safetensors").mkdir(parents=True)
        message = "adapter_model.safetensors is a folder"
    with pytest.raises(AdapterSaveError, match=re.escape(message)):
        adapted.save_pretrained(target)
    assert (tmp_path / "file").read_text() == "keep"
    assert not list(tmp_path.rglob("adapter_config.json")) and not list(tmp_path.rglob("*.tmp"))


# ---- regular expressions ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: factorlab.LoraConfig(target_modules="q_pr(oj"),
        lambda: factorlab.LoraConfig(target_modules=["q_proj"], exclude_modules="[v"),
        lambda: factorlab.LoraConfig(target_modules=["q_proj"], rank_pattern={"q_pr(oj": 2}),
        lambda: factorlab.LoraConfig(target_modules=["q_proj"], alpha_pattern={"*": 2.0}),
        lambda: factorlab.CompacterConfig(target_modules="(?P<x"),
        lambda: factorlab.LoraMixerConfig(target_modules="a{2,1}"),
    ],
)
def test_an_invalid_regular_expression_is_a_config_error_naming_the_field(make):
    with pytest.raises(ConfigError, match=r"is not a valid regular expression .* re\.escape"):
        make()


def test_targeting_resolution_refuses_a_bad_pattern_from_any_config():
    from factorlab.core.targeting import resolve_targets

    with pytest.raises(ConfigError, match="target_modules='q_pr\\(oj' is not a valid regular expression"):
        resolve_targets(build("llama"), "q_pr(oj")


# ---- LoRA-Mixer inputs that made a wrong experiment or a raw exception -------------------------------


@pytest.mark.parametrize("task_ids", [["a", "b"], "01", [0, None], [True, False], {"x": 1}, 3, [2**70, 0]])
def test_mixer_task_ids_of_the_wrong_type_are_a_clean_error(task_ids):
    mixer = factorlab.adapt(build("llama"), factorlab.LoraMixerConfig(num_experts=2, r=2))
    with pytest.raises(ConfigError, match="task_ids"):
        mixer(**inputs("llama"), task_ids=task_ids)
    mixer(**inputs("llama"), task_ids=[0, 1])  # a list of ints is fine, as a tensor is


@pytest.mark.parametrize(
    "experts, message",
    [
        ([{"name": "a", "rr": 3}], r"experts\[0\] has unknown field\(s\) \['rr'\]"),
        ([{"r": 3}], r"experts\[0\] has no 'name'"),
        (["a"], r"experts\[0\] must be an ExpertSpec or a mapping"),
        ("ab", "experts must be a list"),
    ],
)
def test_a_malformed_expert_spec_is_a_clean_error(experts, message):
    with pytest.raises(ConfigError, match=message):
        factorlab.LoraMixerConfig(experts=experts)


def test_an_expert_whose_targets_match_nothing_is_refused_and_changes_nothing():
    model = build("llama")
    before = snapshot(model)
    config = factorlab.LoraMixerConfig(experts=[{"name": "a"}, {"name": "b", "target_modules": ["q_prj"]}])
    with pytest.raises(TargetError, match="expert 'b': its target_modules \\['q_prj'\\] match none"):
        factorlab.adapt(model, config)
    assert unchanged(model, before) and all(p.requires_grad for p in model.parameters())
    partial = factorlab.LoraMixerConfig(experts=[{"name": "a"}, {"name": "b", "target_modules": ["q_proj"]}])
    factorlab.adapt(build("llama"), partial)  # an expert on some of the projections is fine


def test_plugging_one_peft_folder_twice_or_a_copy_of_it_is_refused(tmp_path):
    import shutil

    lora = factorlab.adapt(build("llama"), factorlab.LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "math")
    with pytest.raises(ConfigError, match="is given twice"):
        factorlab.LoraMixerConfig.from_peft_adapters([tmp_path / "math", tmp_path / "x" / ".." / "math"])
    shutil.copytree(tmp_path / "math", tmp_path / "code")
    with pytest.raises(ConfigError, match="holds the same weights as"):
        factorlab.LoraMixerConfig.from_peft_adapters([tmp_path / "math", tmp_path / "code"])


# ---- sizes, degenerate instances ---------------------------------------------------------------------


def test_an_ocr_run_too_large_for_memory_is_refused_before_allocation():
    from factorlab.ocr.train import OCRConfig, train_batched

    started = time.perf_counter()
    with pytest.raises(ResourceError, match=r"needs about .* of memory, and .* is available; lower --groups"):
        train_batched([OCRConfig(groups=400_000, steps=2)])
    assert time.perf_counter() - started < 5


def test_cli_sizes_and_degenerate_theory_are_one_line():
    assert_one_line(
        cli("ocr", "run", "--seq-len", "1000000000", "--steps", "2", "--out", "/tmp/fl-x"), "memory"
    )
    assert_one_line(cli("ocr", "theory", "--groups", "1"), "--groups >= 2")


def test_allocation_failures_deep_in_torch_are_translated():
    mapped = explain(
        RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")
    )
    assert isinstance(mapped, ResourceError) and "not enough memory" in str(mapped)
    assert isinstance(explain(MemoryError()), ResourceError)
    assert explain(RuntimeError("shape mismatch")) is None  # a bug keeps its traceback
    assert explain(KeyError("x")) is None


@pytest.mark.parametrize(
    "code, needle",
    [
        (errno.EISDIR, "is a folder where a file is expected"),
        (errno.ENOTDIR, "has a file where a folder is expected"),
        (errno.EACCES, "is not readable/writable"),
        (errno.ENOENT, "does not exist"),
        (errno.EROFS, "is on a read-only file system"),
    ],
)
def test_os_errors_become_one_line_naming_the_path(code, needle):
    mapped = explain(OSError(code, os.strerror(code), "/some/path"), "reading x")
    assert isinstance(mapped, ConfigError) and str(mapped).startswith("reading x: /some/path " + needle)
    assert isinstance(explain(OSError(errno.ENOSPC, "full", "/d")), ResourceError)


# ---- relations files ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, phrasing, needle",
    [
        ("fact", "{subject} {home} on {fact}.", "the placeholder '{home}'"),
        ("implication", "{subject} collects {implication!r}.", "the placeholder '{implication!r}'"),
        ("fact", "{subject} was born on {fact:>10}.", "the placeholder '{fact:>10}'"),
        ("fact", "{subject} {0} on {fact}.", "the placeholder '{0}'"),
        ("fact", "{subject} was { born on {fact}.", "unbalanced braces"),
        ("background", "People on {planet} collect {implication}.", "the placeholder '{planet}'"),
    ],
)
def test_a_relation_template_with_an_unknown_placeholder_is_refused(tmp_path, field, phrasing, needle):
    from factorlab.inject.world import load_relations

    relation = {**RELATION, field: [phrasing]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps([relation]))
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_relations(path)


@pytest.mark.parametrize("field", ["fact", "implication", "pairs", "background", "description", "name"])
def test_a_yaml_alias_bomb_inside_any_field_is_refused_quickly(tmp_path, field):
    from factorlab.inject.world import load_relations

    lines = [f"  {key}: {json.dumps(value)}" for key, value in RELATION.items() if key != field]
    path = tmp_path / "r.yaml"
    path.write_text("-\n" + "\n".join([*lines, f"  {field}: {alias_bomb()}"]) + "\n")
    assert path.stat().st_size < 1000
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="expands to more than 200,000 values"):
        load_relations(path)
    assert time.perf_counter() - started < 5


# ---- model folders -----------------------------------------------------------------------------------


@pytest.fixture
def model_folder(tmp_path):
    import transformers as tf
    from tokenizers import Tokenizer, models

    folder = tmp_path / "model"
    build("llama").save_pretrained(folder)
    tokenizer = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    tf.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="a").save_pretrained(folder)
    return folder


def test_model_folders_holding_pickles_or_remote_code_are_refused_before_loading(model_folder, tmp_path):
    from factorlab.models import load_causal_lm, resolve_model_path

    assert resolve_model_path(model_folder) == model_folder
    load_causal_lm(str(model_folder))
    (model_folder / "model.safetensors").rename(tmp_path / "weights")
    (model_folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(
        ConfigError, match=r"no safetensors weights: it holds \['pytorch_model.bin'\], pickle"
    ):
        load_causal_lm(str(model_folder))
    (tmp_path / "weights").rename(model_folder / "model.safetensors")
    config = json.loads((model_folder / "config.json").read_text())
    (model_folder / "config.json").write_text(
        json.dumps({**config, "model_type": "evil", "auto_map": {"AutoModelForCausalLM": "x.Evil"}})
    )
    with pytest.raises(
        ConfigError, match="'evil' is not one this transformers knows and asks to run its own code"
    ):
        resolve_model_path(model_folder)
    result = cli("inject", "run", "--model", str(model_folder), "--out", str(tmp_path / "o"))
    assert_one_line(result, "never runs code from a model folder")


def test_a_damaged_model_folder_is_one_config_error(model_folder):
    from factorlab.models import load_causal_lm

    (model_folder / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ConfigError, match="cannot load AutoModelForCausalLM from"):
        load_causal_lm(str(model_folder))


# ---- grids: Ray, checks before work, damaged summaries ----------------------------------------------


def test_an_unreachable_ray_address_is_refused_quickly_before_any_work(tmp_path):
    pytest.importorskip("ray")
    from factorlab.grid_ray import check_address

    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"cannot reach the Ray cluster at 127\.0\.0\.1:1"):
        check_address("127.0.0.1:1")
    with pytest.raises(ConfigError, match="use ray://HOST:10001"):
        check_address("nonsense://x:1")
    with pytest.raises(ConfigError, match="has no HOST:PORT"):
        check_address("ray://head")
    assert time.perf_counter() - started < 20
    result = cli(
        "inject", "grid", "--backend", "ray", "--address", "ray://127.0.0.1:1", "--out", str(tmp_path / "g")
    )
    assert_one_line(result, "cannot reach the Ray cluster")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["inject", "grid", "--backend", "foo"], "--backend must be 'local' or 'ray'"),
        (["inject", "grid", "--workers", "0"], "--workers must be a positive integer"),
        (["inject", "grid", "--address", "h:1"], "applies to --backend ray only"),
        (["ocr", "sweep", "--backend", "foo"], "--backend must be"),
        (["mixer", "run", "--backend", "foo"], "--backend must be"),
    ],
)
def test_grid_options_are_checked_before_any_work(tmp_path, args, needle):
    cache = tmp_path / "cache"
    started = time.perf_counter()
    result = cli(*args, "--out", str(tmp_path / "out"), env={"FACTORLAB_CACHE": str(cache)})
    assert_one_line(result, needle)
    assert time.perf_counter() - started < 60
    assert not cache.exists() and not (tmp_path / "out").exists()  # nothing pretrained, nothing written


def test_a_grid_summary_whose_runs_were_emptied_is_recomputed(tmp_path):
    from factorlab.grid import run_grid
    from factorlab.ocr.train import OCRConfig
    from factorlab.recipes.ocr import group_cells

    cells = group_cells([OCRConfig(steps=3, eval_every=3, seed=s) for s in (0, 1)])
    first = run_grid("factorlab.recipes.ocr:train_group_cell", cells, tmp_path, workers=1)
    assert first.ran == 1
    summary_file = next(tmp_path.glob("cells/*/summary.json"))
    summary = json.loads(summary_file.read_text())
    for damage in ([], [summary["runs"][0]], [{"summary": None, "history": []}] * 2):
        summary_file.write_text(json.dumps({**summary, "runs": damage}))
        again = run_grid("factorlab.recipes.ocr:train_group_cell", cells, tmp_path, workers=1)
        assert (again.ran, again.reused) == (1, 0) and len(again.results[0]["runs"]) == 2
    assert run_grid("factorlab.recipes.ocr:train_group_cell", cells, tmp_path, workers=1).reused == 1


def test_threads_default_to_one_as_grid_workers_and_are_checked():
    result = cli("inject", "run", "--help")
    assert "--threads" in result.stdout and "Default 1" in result.stdout
    assert_one_line(cli("inject", "run", "--threads", "0"), "--threads must be >= 1")


def test_errors_that_name_the_fix_are_factorlab_errors():
    assert issubclass(ResourceError, FactorlabError) and issubclass(ResourceError, MemoryError)
