"""LoRA adapters move between factorlab and the real `peft` package with the same logits."""

import peft
import pytest
import torch

from factorlab import AdaptedModel, AdapterLoadError, LoraConfig, adapt
from factorlab.interop.peft import load_peft_lora, save_as_peft
from tiny_models import build, inputs, logits

TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj"],  # Conv1D: fan_in_fan_out
    "t5": ["q", "v", "wo"],
    "bert": ["query", "value"],
    "mamba": ["in_proj", "x_proj"],  # PEFT refuses out_proj on Mamba
}
CASES = [(arch, rslora) for arch in TARGETS for rslora in (False, True)]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("arch", "rslora"), CASES)
def test_factorlab_adapter_loads_in_peft_with_the_same_logits(arch, rslora, tmp_path):
    batch = inputs(arch)
    adapted = adapt(
        build(arch),
        LoraConfig(
            r=4,
            lora_alpha=16,
            use_rslora=rslora,
            target_modules=TARGETS[arch],
            rank_pattern={TARGETS[arch][0]: 2},
            init_lora_weights=False,
        ),
    )
    expected = logits(adapted, batch)
    save_as_peft(adapted, tmp_path)
    # is_trainable: the same requires_grad flags on both sides (Mamba's CPU path rounds differently
    # when no parameter requires grad)
    peft_model = peft.PeftModel.from_pretrained(build(arch), tmp_path, is_trainable=True)
    got = logits(peft_model, batch)
    assert not torch.allclose(got, logits(build(arch), batch), atol=1e-3)  # the adapter acts in PEFT too
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("arch", "rslora"), CASES)
def test_peft_adapter_loads_in_factorlab_with_the_same_logits(arch, rslora, tmp_path):
    batch = inputs(arch)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        use_rslora=rslora,
        target_modules=TARGETS[arch],
        rank_pattern={TARGETS[arch][-1]: 6},
        alpha_pattern={TARGETS[arch][0]: 3},
        init_lora_weights=False,
    )
    peft_model = peft.get_peft_model(build(arch), config)
    expected = logits(peft_model, batch)
    peft_model.save_pretrained(tmp_path / "peft")
    adapted = load_peft_lora(build(arch), tmp_path / "peft", is_trainable=True)
    torch.testing.assert_close(logits(adapted, batch), expected, atol=1e-5, rtol=0)
    # and back again: factorlab -> PEFT format -> PEFT
    save_as_peft(adapted, tmp_path / "again")
    back = peft.PeftModel.from_pretrained(build(arch), tmp_path / "again", is_trainable=True)
    torch.testing.assert_close(logits(back, batch), expected, atol=1e-5, rtol=0)


def test_peft_adapter_can_be_trained_further_and_merged(tmp_path):
    batch = inputs("llama")
    peft_model = peft.get_peft_model(
        build("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path)
    adapted = load_peft_lora(build("llama"), tmp_path, is_trainable=True)
    assert {n for n, p in adapted.named_parameters() if p.requires_grad}
    expected = logits(adapted, batch)
    merged = adapted.merge_and_unload()
    torch.testing.assert_close(logits(merged, batch), expected, atol=1e-5, rtol=0)


def test_non_lora_peft_folder_is_refused(tmp_path):
    ia3 = peft.get_peft_model(
        build("llama"),
        peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    )
    ia3.save_pretrained(tmp_path)
    model = build("llama")
    with pytest.raises(AdapterLoadError, match="PEFT IA3 adapter"):
        load_peft_lora(model, tmp_path)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(
        AdapterLoadError, match=r"holds a PEFT IA3 adapter; factorlab reads PEFT LORA adapters"
    ):
        AdaptedModel.from_pretrained(model, tmp_path)  # not read as the first PEFT method factorlab knows
    assert all(p.requires_grad for p in model.parameters())


def test_one_lora_format_for_both_and_native_methods_are_marked(tmp_path):
    """A PEFT folder loads with AdaptedModel.from_pretrained; factorlab's LoRA folder is PEFT's format;
    a Compacter folder says it is factorlab's own and load_peft_lora refuses it."""
    import json

    from factorlab import CompacterConfig

    peft_model = peft.get_peft_model(
        build("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path / "p")
    loaded = AdaptedModel.from_pretrained(build("llama"), tmp_path / "p")
    torch.testing.assert_close(logits(loaded, inputs("llama")), logits(peft_model, inputs("llama")))
    adapt(build("llama"), LoraConfig(r=2)).save_pretrained(tmp_path / "f")
    written = json.loads((tmp_path / "f" / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["task_type"] == "CAUSAL_LM"
    assert written["factorlab"]["method"] == "lora"
    adapt(build("llama"), CompacterConfig(target_modules=["q_proj"], phm_dim=2)).save_pretrained(
        tmp_path / "c"
    )
    native = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert "peft_type" not in native and "no PEFT equivalent" in native["format"]
    with pytest.raises(AdapterLoadError, match="not a PEFT adapter"):
        load_peft_lora(build("llama"), tmp_path / "c")


def test_peft_rank_mismatch_is_reported(tmp_path):
    import json

    peft.get_peft_model(build("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(
        tmp_path
    )
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["r"] = 8
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterLoadError, match=r"holds shape \(4, 64\).*expects \(8, 64\)"):
        load_peft_lora(build("llama"), tmp_path)
