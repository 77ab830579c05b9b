"""Hostile and careless inputs: either a clean factorlab error naming the fix, or a correct result.
Never a silently wrong result, a traceback from the CLI, or a model changed by a failed load."""

import contextlib
import json
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import factorlab
from factorlab.core.method import config_from_dict
from factorlab.errors import AdapterLoadError, ConfigError, FactorlabError
from factorlab.inject.world import load_relations
from tiny_models import build, inputs, logits

# ---- configs ---------------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
LORA_FIELDS = ["r", "lora_alpha", "lora_dropout", "use_rslora", "init_lora_weights", "target_modules"]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(LORA_FIELDS), JSON_VALUES, max_size=3))
@example({"lora_alpha": 3.4028235677973366e38})  # finite in float64, inf in float32: found in a CI-like run
def test_lora_config_from_json_is_valid_or_a_clean_error(fields):
    try:
        config = config_from_dict({"method": "lora", **fields})
    except ConfigError:
        return
    assert isinstance(config.r, int) and not isinstance(config.r, bool) and config.r > 0
    assert isinstance(config.use_rslora, bool)
    assert isinstance(config.lora_alpha, (int, float)) and torch.isfinite(
        torch.tensor(float(config.lora_alpha))
    )
    assert 0 <= config.lora_dropout < 1


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["temperature", "balance_coef", "specialization_coef", "preservation_coef", "top_k"]),
    JSON_VALUES,
)
def test_mixer_config_values_are_valid_or_a_clean_error(field, value):
    try:
        config = factorlab.LoraMixerConfig(**{field: value})
    except ConfigError:
        return
    got = getattr(config, field)
    assert not isinstance(got, bool) and isinstance(got, (int, float)) and float(got) == float(got)
    assert float(got) != float("inf")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"use_rslora": "false"}, "boolean, not a string"),
        ({"lora_alpha": float("nan")}, "finite"),
        ({"lora_alpha": float("inf")}, "finite"),
        ({"r": "8"}, "integer"),
        ({"r": None}, "integer"),
        ({"target_modules": [1, 2]}, "target_modules"),
    ],
)
def test_lora_config_names_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        factorlab.LoraConfig(**kwargs)


def test_relations_file_types_tags_and_size(tmp_path):
    base = {
        "name": "x",
        "fact": ["{subject} lives in {fact}."],
        "implication": ["{subject} speaks {implication}."],
        "pairs": [["A", "x"], ["B", "y"]],
    }
    (tmp_path / "r.json").write_text(json.dumps([{**base, "causal": "false"}]))
    with pytest.raises(ConfigError, match="true or false"):
        load_relations(tmp_path / "r.json")
    (tmp_path / "r.yaml").write_text("- !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid"):
        load_relations(tmp_path / "r.yaml")
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi")
    )
    (tmp_path / "bomb.yaml").write_text(bomb)
    with pytest.raises(ConfigError) as err:
        load_relations(tmp_path / "bomb.yaml")
    assert len(str(err.value)) < 500  # the error cuts the expanded value short
    (tmp_path / "big.json").write_text("[" + " " * 1_100_000 + "]")
    with pytest.raises(ConfigError, match="1 MB"):
        load_relations(tmp_path / "big.json")
    (tmp_path / "pairs.json").write_text(json.dumps([{**base, "causal": True, "pairs": [["A"], "B"]}]))
    with pytest.raises(ConfigError, match="pairs"):
        load_relations(tmp_path / "pairs.json")


# ---- adapter files ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = build("llama")
    adapted = factorlab.adapt(
        model, factorlab.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    )
    folder = tmp_path_factory.mktemp("lora")
    adapted.save_pretrained(folder)
    return folder, logits(adapted, inputs("llama"))


def _load_into_fresh(folder):
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        return factorlab.AdaptedModel.from_pretrained(model, folder), None
    except AdapterLoadError as err:
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # left exactly as it was
        assert not any(p.requires_grad is False for p in model.parameters())
        return None, err


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t.to(torch.int32), "dtype"),
        (lambda t: t.to(torch.int64), "dtype"),
        (lambda t: t > 0, "dtype"),
        (lambda t: t.double().fill_(1e39), "NaN or inf"),
        (lambda t: t.fill_(float("nan")), "NaN or inf"),
    ],
)
def test_adapter_tensors_of_the_wrong_kind_are_refused(saved, tmp_path, mutate, message):
    folder, _ = saved
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    key = sorted(tensors)[0]
    tensors[key] = mutate(tensors[key].clone())
    (tmp_path / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    model, err = _load_into_fresh(tmp_path)
    assert model is None and message in str(err)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8]),
    scale=st.sampled_from([0.0, 1.0, 1e5, 1e39]),
    index=st.integers(0, 3),
)
def test_mutated_adapter_files_load_exactly_or_fail_cleanly(saved, tmp_path_factory, dtype, scale, index):
    folder, reference = saved
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    key = sorted(tensors)[index % len(tensors)]
    original = tensors[key].clone()
    tensors[key] = (original.double() * scale).to(dtype) if scale != 1.0 else original.to(dtype)
    out = tmp_path_factory.mktemp("mut")
    (out / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    save_file(tensors, str(out / "adapter_model.safetensors"))
    model, err = _load_into_fresh(out)
    if model is None:
        assert isinstance(err, AdapterLoadError)
        return
    loaded = dict(model.adapter_state_dict("default"))
    expected = tensors[key].to(torch.float32)
    assert torch.isfinite(loaded[f"base_model.model.{key.split('base_model.model.', 1)[-1]}"]).all()
    if dtype in (torch.float32, torch.float64) and scale == 1.0:
        assert torch.allclose(logits(model, inputs("llama")), reference, atol=1e-5)
    assert expected.is_floating_point()


# ---- API misuse ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["/tmp/evil", "../up", "a.b", "__class__", "forward", "training", "", 3, "x" * 65]
)
def test_unsafe_adapter_names_are_refused(name):
    with pytest.raises(ConfigError, match="adapter name"):
        factorlab.adapt(
            build("llama"), factorlab.LoraConfig(r=2, target_modules=["q_proj"]), adapter_name=name
        )


def test_absurd_rank_is_refused_before_allocation():
    model = build("llama")
    with pytest.raises(ConfigError, match="exceeds"):
        factorlab.adapt(model, factorlab.LoraConfig(r=10**12, target_modules=["q_proj"]))
    assert all(p.requires_grad for p in model.parameters())  # left as it was


def _adapted_in(state: str):
    lora = dict(r=2, target_modules=["q_proj"], init_lora_weights=False)
    adapted = factorlab.adapt(build("llama"), factorlab.LoraConfig(**lora))
    adapted.add_adapter("b", factorlab.LoraConfig(**lora))
    if state == "empty":
        adapted.delete_adapter("default")
        adapted.delete_adapter("b")
    elif state == "merged":
        adapted.merge_adapter()
    elif state == "unloaded":
        adapted.unload()
    assert adapted.state.value == state
    return adapted


def _with_disabled(adapted):
    with adapted.disable_adapters():
        pass


STATE_OPERATIONS = {
    "forward": lambda m, d: m.eval()(**inputs("llama")),
    "generate": lambda m, d: m.generate(inputs("llama")["input_ids"][:1], max_new_tokens=2, do_sample=False),
    "add_adapter": lambda m, d: m.add_adapter("c", factorlab.LoraConfig(r=2, target_modules=["v_proj"])),
    "load_adapter": lambda m, d: m.load_adapter(d / "saved", "c"),
    "set_adapter": lambda m, d: m.set_adapter("b"),
    "delete_adapter": lambda m, d: m.delete_adapter("b"),
    "disable_adapters": lambda m, d: _with_disabled(m),
    "merge_adapter": lambda m, d: m.merge_adapter(),
    "unmerge_adapter": lambda m, d: m.unmerge_adapter(),
    "merge_and_unload": lambda m, d: m.merge_and_unload(),
    "unload": lambda m, d: m.unload(),
    "save_pretrained": lambda m, d: m.save_pretrained(d / "out"),
}
# (state, operation) pairs the state machine refuses; every other pair must just work.
REFUSED = {
    ("empty", "set_adapter"), ("empty", "delete_adapter"), ("empty", "merge_adapter"),
    ("empty", "merge_and_unload"), ("empty", "save_pretrained"),
    ("merged", "set_adapter"), ("merged", "disable_adapters"),
    *(("unloaded", op) for op in STATE_OPERATIONS),
}  # fmt: skip


@pytest.mark.parametrize("state", ["ready", "empty", "merged", "unloaded"])
def test_adapter_state_machine_every_operation_in_every_state(state, tmp_path):
    factorlab.adapt(build("llama"), factorlab.LoraConfig(r=2, target_modules=["k_proj"])).save_pretrained(
        tmp_path / "saved"
    )
    for op, run in STATE_OPERATIONS.items():
        adapted = _adapted_in(state)
        weights = {k: v.clone() for k, v in adapted.base_model.state_dict().items()}
        if (state, op) in REFUSED:
            with pytest.raises(ConfigError, match=r"unmerge_adapter|add_adapter|unloaded") as err:
                run(adapted, tmp_path)
            assert op in str(err.value)
            assert adapted.state.value == state, op  # a refused operation changes nothing
            after = adapted.base_model.state_dict()
            assert all(torch.equal(weights[k], after[k]) for k in weights), op
        else:
            run(adapted, tmp_path)


def test_merged_state_semantics(tmp_path):
    adapted = _adapted_in("ready")
    adapted.eval()
    expected = logits(adapted, inputs("llama"))
    adapted.merge_adapter()
    adapted.merge_adapter()  # idempotent, not merged twice
    torch.testing.assert_close(logits(adapted, inputs("llama")), expected, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="unmerge_adapter"):
        adapted.delete_adapter("default")  # would leave its update in the weights
    adapted.train()
    with pytest.raises(ConfigError, match="training with a merged adapter"):
        adapted(**inputs("llama"))
    with torch.no_grad():
        adapted(**inputs("llama"))  # a no-grad pass in train mode reads nothing it should not
    adapted.unmerge_adapter()
    assert adapted.state.value == "ready"
    adapted.set_adapter("b")
    adapted.unload()
    with pytest.raises(ConfigError, match="unloaded"):
        adapted.save_pretrained(tmp_path)


def test_peft_style_adapter_api_answers_clearly():
    adapted = factorlab.adapt(build("llama"), factorlab.LoraConfig(r=2, target_modules=["q_proj"]))
    adapted.add_adapter("b", factorlab.LoraConfig(r=2, target_modules=["q_proj"]))
    assert set(adapted.peft_config) == {"default", "b"} and adapted.active_adapters == ["default"]
    adapted.set_adapter(["b"])
    assert adapted.active_adapters == ["b"]
    adapted.set_adapter(["default", "b"])  # LoRA updates add up: several may be active
    assert adapted.active_adapters == ["default", "b"]
    with pytest.raises(ConfigError, match="combination_type"):
        adapted.add_weighted_adapter(["default", "b"], [0.5, 0.5], "merged", combination_type="ties")
    compacter = factorlab.adapt(
        build("llama"), factorlab.CompacterConfig(target_modules=["q_proj"], phm_dim=2)
    )
    compacter.add_adapter("b", factorlab.CompacterConfig(target_modules=["q_proj"], phm_dim=2))
    with pytest.raises(ConfigError, match="one at a time"):
        compacter.set_adapter(["default", "b"])


def test_adapting_a_peft_model_is_refused():
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(build("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="PEFT"):
        factorlab.adapt(wrapped, factorlab.LoraConfig(r=2, target_modules=["q_proj"]))


# ---- the command line ------------------------------------------------------------------------------


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "factorlab", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


@pytest.mark.parametrize(
    "args",
    [
        ["ocr", "sweep", "--d-h", "", "--no-combined", "--steps", "10"],
        ["ocr", "sweep", "--d-h", "4", "--seeds", "0", "--steps", "10"],
        ["ocr", "sweep", "--steps", "10", "--backend", "foo", "--d-h", "4", "--seeds", "0"],
        ["inject", "grid", "--methods", "", "--seeds", "0"],
        ["inject", "run", "--lr", "0", "--epochs", "1"],
        ["inject", "run", "--epochs", "0"],
        ["inject", "run", "--lr", "nan", "--epochs", "1"],
        ["mixer", "run", "--steps", "0"],
        ["mixer", "run", "--steps", "-3"],
        ["mixer", "run", "--tasks", "nosuch"],
        ["mixer", "run", "--skip", "experts"],
        ["mixer", "run", "--set", "nosuch=1"],
        ["mixer", "run", "--set", "router_lr=abc"],
        ["mixer", "run", "--set", "steps"],
        ["mixer", "run", "--model", "/not/a/model"],
        ["mixer", "plug", "--base", "/not/a/model", "--adapters", "first,last"],
        ["ocr", "theory", "--solver", "foo", "--steps", "2"],
    ],
)
def test_cli_bad_values_give_one_line_and_exit_2(args, tmp_path):
    result = _cli(*args, "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "error" in result.stderr.lower()


def test_cli_plug_names_what_is_not_an_adapter_or_a_model(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _cli("mixer", "plug", "--base", str(empty), "--adapters", f"{empty},{tmp_path / 'nope'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"--adapters: ['{empty}', '{tmp_path / 'nope'}'] are not PEFT LoRA folders" in result.stderr
    (empty / "adapter_config.json").write_text("{}")
    result = _cli("mixer", "plug", "--base", str(tmp_path), "--adapters", str(empty))
    assert (
        result.returncode == 2
        and f"--base {tmp_path} is not a model folder (no config.json)" in result.stderr
    )


@pytest.mark.parametrize("command", [["ocr", "run", "--steps", "3"], ["demo", "--quick"]])
def test_cli_unwritable_out_is_a_clean_error(tmp_path, command):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = _cli(*command, "--out", str(blocker / "sub"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "path" in result.stderr


def test_factorlab_errors_share_one_base():
    assert issubclass(ConfigError, FactorlabError) and issubclass(AdapterLoadError, FactorlabError)


NUMBERS = st.one_of(
    st.integers(-3, 4).map(str),
    st.sampled_from(["nan", "inf", "-inf", "0", "1e-3", "0.5", "abc", "", "1e309"]),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=NUMBERS, lr=NUMBERS, batch=st.sampled_from(["3", "6", "250", "0", "-3", "x"]), wd=NUMBERS)
def test_cli_generated_values_give_a_result_or_a_clean_error(tmp_path_factory, steps, lr, batch, wd):
    """Generated option values for `ocr run`: either a run (tiny: at most 4 steps) or exit status 2
    with a message; never a traceback."""
    from typer.testing import CliRunner

    from factorlab.cli import app

    out = tmp_path_factory.mktemp("cli")
    args = ["ocr", "run", "--steps", steps, "--lr", lr, "--batch-size", batch, "--weight-decay", wd]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    if result.exit_code == 0:
        summary = json.loads((out / "summary.json").read_text())
        assert summary["steps"] == int(steps) >= 1
    else:
        assert result.exit_code == 2, (args, result.output, result.exception)
        assert isinstance(result.exception, SystemExit), (args, result.exception)


# ---- generated argument lists for every command -----------------------------------------------------
# The recipe each command would start is replaced by a recorder, so a generated list either stops with
# a clean error (exit status 2, no traceback) or reaches the recipe with exactly the values it asked for
# (never a default silently taking the place of a given value, never a NaN or a non-positive count).

INTS = st.sampled_from(["-3", "-1", "0", "1", "2", "7", "1e3", "x", "", "nan", "99999999999999999999"])
FLOATS = st.sampled_from(["nan", "inf", "-inf", "0", "-1", "1e-3", "0.5", "1e309", "abc", ""])
INT_LISTS = st.sampled_from(["", ",", "0", "0,1", "a,b", "-1", "0,,2", "1e2", "3,4"])
TEXTS = st.sampled_from(["", "foo", "../x", "nan", " "])
COUNTS = st.sampled_from(["-1", "0", "1", "2", "x", ""])  # a count that is not itself recorded


def _choice(*valid: str):
    return st.sampled_from(valid) | TEXTS


COMMANDS = {
    ("ocr", "run"): ("factorlab.recipes.ocr.run", {
        "--steps": INTS, "--batch-size": INTS, "--lr": FLOATS, "--weight-decay": FLOATS, "--d-h": INTS,
        "--groups": INTS, "--subjects-per-group": INTS, "--train-fraction": FLOATS, "--noise-tokens": INTS,
        "--seq-len": INTS, "--eval-every": INTS, "--param": _choice("factorized", "combined"),
        "--init": _choice("default", "identity"), "--association": _choice("causal", "non-causal"),
    }),
    ("ocr", "sweep"): ("factorlab.recipes.ocr.sweep", {
        "--d-h": INT_LISTS, "--seeds": COUNTS, "--steps": INTS, "--lr": FLOATS, "--workers": INTS,
        "--backend": _choice("local", "ray"), "--train-fraction": FLOATS,
    }),
    ("ocr", "theory"): ("factorlab.recipes.ocr.theory", {
        "--groups": INTS, "--subjects-per-group": INTS, "--train-fraction": FLOATS, "--steps": INTS,
        "--lr": FLOATS, "--optimizer": _choice("gd", "adamw"),
        "--competitors": _choice("vocabulary", "answers", "relation"),
    }),
    ("mixer", "run"): ("factorlab.recipes.mixer.run_experiment", {
        "--preset": _choice("quick", "smollm2"), "--tasks": _choice("first,last", "max"), "--r": INTS,
        "--steps": INTS, "--router-steps": INTS, "--seeds": INT_LISTS, "--workers": INTS,
    }),
    ("mixer", "train"): ("factorlab.recipes.mixer.joint", {
        "--preset": _choice("quick"), "--r": INTS, "--steps": INTS, "--router-steps": INTS, "--seed": INTS,
    }),
    ("inject", "run"): ("factorlab.recipes.inject.run", {
        "--method": _choice("full", "lora", "compacter++", "lora-mixer"),
        "--relation": _choice("city-language", "sport-music"), "--r": INTS, "--lr": FLOATS,
        "--epochs": INTS, "--pretrain-seed": INTS, "--model": _choice("tiny"),
    }),
    ("inject", "grid"): ("factorlab.recipes.inject.grid", {
        "--relations": _choice("city-language", "city-language,sport-music"),
        "--methods": _choice("full,lora", "compacter++"), "--seeds": INT_LISTS, "--r": INTS,
        "--rank-sweep": INT_LISTS, "--epochs": INTS, "--pretrain-seeds": INT_LISTS,
    }),
}  # fmt: skip


class _Reached(Exception):
    pass


def _recorded_values(obj) -> list:
    if isinstance(obj, (list, tuple)):
        return [v for item in obj for v in _recorded_values(item)]
    if isinstance(obj, dict):
        return [v for item in obj.values() for v in _recorded_values(item)]
    if hasattr(obj, "__dataclass_fields__"):
        return _recorded_values(dict(obj.__dict__))
    return [obj]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), command=st.sampled_from(sorted(COMMANDS)))
def test_generated_argument_lists_for_every_command(monkeypatch, tmp_path_factory, data, command):
    import importlib
    import math

    from typer.testing import CliRunner

    from factorlab.cli import app

    target, options = COMMANDS[command]
    module, _, attr = target.rpartition(".")
    reached = {}

    def record(*args, **kwargs):
        reached["values"] = _recorded_values([args, kwargs])
        raise _Reached

    monkeypatch.setattr(importlib.import_module(module), attr, record)
    chosen = data.draw(st.lists(st.sampled_from(sorted(options)), max_size=4, unique=True))
    args = [*command]
    for option in chosen:
        args += [option, data.draw(options[option])]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path_factory.mktemp("cli"))])
    if isinstance(result.exception, _Reached):
        for value in reached["values"]:
            if isinstance(value, float):
                assert math.isfinite(value), (args, reached["values"])
        for option in chosen:
            given_value = args[args.index(option) + 1]
            if options[option] is INTS:
                assert int(given_value) in reached["values"], (args, reached["values"])
            elif options[option] is FLOATS:
                assert float(given_value) in reached["values"], (args, reached["values"])
        return
    assert result.exit_code == 2, (args, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), (args, repr(result.exception))
    assert result.output.strip(), args  # a message, not silence


# ---- issue 29's classes, generated ---------------------------------------------------------------------


def _replace_with(path, kind: str) -> None:
    """Put a file-system object of ``kind`` where the file ``path`` was."""
    import os

    if path.exists() or path.is_symlink():
        path.unlink()
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dangling-link":
        path.symlink_to(path.parent / "nowhere")
    elif kind == "link-loop":
        path.symlink_to(path)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "deep-json":
        path.write_text("[" * 100_000 + "]" * 100_000)
    else:  # "huge"
        with open(path, "wb") as f:
            f.truncate(50_000_000)


FS_KINDS = ["folder", "fifo", "dangling-link", "link-loop", "empty", "binary", "deep-json", "huge"]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    which=st.sampled_from(["adapter_config.json", "adapter_model.safetensors"]),
    kind=st.sampled_from(FS_KINDS),
)
def test_file_system_objects_in_place_of_adapter_files(saved, tmp_path_factory, which, kind):
    import shutil

    folder = tmp_path_factory.mktemp("fs") / "a"
    shutil.copytree(saved[0], folder)
    _replace_with(folder / which, kind)
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterLoadError):
        factorlab.AdaptedModel.from_pretrained(model, folder)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(type(m).__name__.startswith("LoRA") for m in model.modules())


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(FS_KINDS))
def test_file_system_objects_in_place_of_a_relations_file(tmp_path_factory, kind):
    path = tmp_path_factory.mktemp("rel") / "relations.yaml"
    _replace_with(path, kind)
    with pytest.raises(ConfigError):
        load_relations(path)


REGEX_TEXT = st.text(alphabet="qkvo_proj.*+?()[]{}|^$\\0123456789,-", min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(
    field=st.sampled_from(["target_modules", "exclude_modules", "rank_pattern", "alpha_pattern"]),
    pattern=REGEX_TEXT,
)
def test_generated_regular_expressions_adapt_or_fail_cleanly(field, pattern):
    """A pattern in any regex field: the config is refused with a ConfigError, or adapting works or is a
    TargetError (it matched nothing); never re.error or another raw exception."""
    fields = {"target_modules": ["q_proj"], field: {pattern: 2} if field.endswith("pattern") else pattern}
    try:
        config = factorlab.LoraConfig(r=4, **fields)
        factorlab.adapt(build("llama"), config)
    except (ConfigError, factorlab.TargetError):
        return


TENSORISH = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=3),
    st.lists(
        st.one_of(st.integers(-3, 5), st.none(), st.text(max_size=1), st.floats(), st.booleans()), max_size=3
    ),
    st.sampled_from(["int64", "int32", "float32", "bool", "uint8", "2d", "0d"]).map(
        lambda kind: {
            "int64": torch.tensor([0, 1]),
            "int32": torch.tensor([1, 0], dtype=torch.int32),
            "float32": torch.tensor([0.0, 1.0]),
            "bool": torch.tensor([True, False]),
            "uint8": torch.tensor([0, 1], dtype=torch.uint8),
            "2d": torch.zeros(2, 1, dtype=torch.long),
            "0d": torch.tensor(1),
        }[kind]
    ),
)


@settings(max_examples=120, deadline=None)
@given(key=st.sampled_from(["task_ids", "task_labels"]), value=TENSORISH)
def test_type_confusion_in_the_mixer_s_tensor_arguments(key, value):
    mixer = factorlab.adapt(build("llama"), factorlab.LoraMixerConfig(num_experts=2, r=2))
    try:
        out = mixer(**inputs("llama"), **{key: value})
    except ConfigError:
        return
    assert torch.isfinite(out.logits).all()


@settings(max_examples=60, deadline=None)
@given(value=TENSORISH, as_state_dict=st.booleans())
def test_type_confusion_in_loaded_state(value, as_state_dict):
    adapted = factorlab.adapt(build("llama"), factorlab.LoraConfig(r=2, target_modules=["q_proj"]))
    state = factorlab.get_peft_model_state_dict(adapted)
    key = sorted(state)[0]
    with pytest.raises(AdapterLoadError):
        if as_state_dict:
            adapted.load_state_dict({**adapted.state_dict(), "base_model.model.x": value})
        else:
            factorlab.set_peft_model_state_dict(adapted, {**state, key: value})


SIZES = st.sampled_from([1, 2, 3, 20, 1000, 10**5, 10**7, 10**9])


@settings(max_examples=60, deadline=None)
@given(groups=SIZES, subjects=SIZES, noise=SIZES, seq_len=SIZES, batch=SIZES, d_h=SIZES)
def test_generated_ocr_sizes_fit_or_are_refused_before_allocation(
    groups, subjects, noise, seq_len, batch, d_h
):
    """Any size: the config is refused, or the memory check passes or refuses it in well under a second
    (before a tensor exists)."""
    import time

    from factorlab.errors import ResourceError
    from factorlab.ocr.train import OCRConfig, check_group_memory

    try:
        config = OCRConfig(
            groups=groups,
            subjects_per_group=subjects,
            noise_tokens=noise,
            seq_len=max(3, seq_len),
            batch_size=3 * batch,
            d_h=d_h,
        )
    except ConfigError:
        return
    started = time.perf_counter()
    with contextlib.suppress(ResourceError):
        check_group_memory([config])
    assert time.perf_counter() - started < 1


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    field=st.sampled_from(["name", "causal", "fact", "implication", "pairs", "background", "description"]),
    width=st.integers(2, 12),
    depth=st.integers(1, 14),
)
def test_nested_yaml_aliases_in_every_field_are_bounded(tmp_path_factory, field, width, depth):
    import time

    from hostile import RELATION, alias_bomb

    lines = [f"  {k}: {json.dumps(v)}" for k, v in RELATION.items() if k != field]
    path = tmp_path_factory.mktemp("yaml") / "r.yaml"
    path.write_text("-\n" + "\n".join([*lines, f"  {field}: {alias_bomb(depth, width)}"]) + "\n")
    started = time.perf_counter()
    with pytest.raises(ConfigError):  # too many values, or the wrong type for the field
        load_relations(path)
    assert time.perf_counter() - started < 3
