"""Hostile and careless inputs: either a clean factorlab error naming the fix, or a correct result.
Never a silently wrong result, a traceback from the CLI, or a model changed by a failed load."""

import json
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import factorlab
from factorlab.errors import AdapterLoadError, ConfigError, FactorlabError
from factorlab.inject.world import load_relations
from factorlab.methods.base import config_from_dict
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


def test_merged_adapter_blocks_switching_and_unloaded_model_refuses_to_save(tmp_path):
    adapted = factorlab.adapt(
        build("llama"), factorlab.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    )
    adapted.add_adapter("b", factorlab.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    adapted.set_adapter("default")
    adapted.merge_adapter()
    with pytest.raises(ConfigError, match="unmerge_adapter"):
        adapted.set_adapter("b")
    with pytest.raises(ConfigError, match="unmerge_adapter"):
        adapted.delete_adapter("default")
    with pytest.raises(ConfigError, match="unmerge_adapter"), adapted.disable_adapters():
        pass
    adapted.unmerge_adapter()
    adapted.set_adapter("b")  # fine once unmerged
    adapted.unload()
    with pytest.raises(ConfigError, match="nothing to save"):
        adapted.save_pretrained(tmp_path)


def test_peft_style_adapter_api_answers_clearly():
    adapted = factorlab.adapt(build("llama"), factorlab.LoraConfig(r=2, target_modules=["q_proj"]))
    adapted.add_adapter("b", factorlab.LoraConfig(r=2, target_modules=["q_proj"]))
    assert set(adapted.peft_config) == {"default", "b"} and adapted.active_adapters == ["default"]
    adapted.set_adapter(["b"])
    assert adapted.active_adapters == ["b"]
    with pytest.raises(ConfigError, match="one adapter at a time"):
        adapted.set_adapter(["default", "b"])
    with pytest.raises(ConfigError, match="LoraMixerConfig"):
        adapted.add_weighted_adapter(["default", "b"], [0.5, 0.5], "merged")


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
    ],
)
def test_cli_bad_values_give_one_line_and_exit_2(args, tmp_path):
    result = _cli(*args, "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "error" in result.stderr.lower()


def test_cli_unwritable_out_is_a_clean_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = _cli("ocr", "run", "--steps", "3", "--out", str(blocker / "sub"))
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
