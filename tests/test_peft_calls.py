"""The PEFT calls users make, on an AdaptedModel: PEFT's layout (``base_model.model`` is the model),
``save_pretrained``'s keywords, ``get/set_peft_model_state_dict``, merging a trained copy of a tied
module, and folders re-saved by PEFT that meet a deeper model."""

import warnings

import peft
import pytest
import torch

import factorlab
from factorlab.errors import AdapterLoadError, ConfigError, PeftOnlyError
from tiny_models import build, inputs

TARGETS = ["q_proj", "v_proj"]


def lora(model=None, **config):
    config = {"r": 4, "target_modules": TARGETS, "init_lora_weights": False, **config}
    return factorlab.adapt(model if model is not None else build("llama"), factorlab.LoraConfig(**config))


def peft_lora(model=None, **config):
    config = {"r": 4, "target_modules": TARGETS, "init_lora_weights": False, **config}
    return peft.get_peft_model(model if model is not None else build("llama"), peft.LoraConfig(**config))


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_the_layout_is_peft_s():
    ours, theirs = lora(), peft_lora()
    assert type(ours.base_model.model) is type(theirs.base_model.model)  # LlamaForCausalLM in both
    assert ours.get_base_model() is ours.base_model.model
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj  # a PEFT script's path
    assert hasattr(layer, "lora_A") and ours.model is ours.base_model.model  # PeftModel.model too
    ours_keys = {k for k in ours.state_dict() if "lora_" in k}
    theirs_keys = {k for k in theirs.state_dict() if "lora_" in k}
    assert (
        ours_keys == theirs_keys
    )  # e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight


def test_save_pretrained_takes_peft_s_keywords(tmp_path):
    adapted = lora()
    adapted.save_pretrained(tmp_path / "a", safe_serialization=True, selected_adapters=["default"])
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    adapted.save_pretrained(tmp_path / "rank1", is_main_process=False)  # another rank: writes nothing
    assert not (tmp_path / "rank1").exists()
    with pytest.warns(UserWarning, match="safetensors only"):
        adapted.save_pretrained(tmp_path / "b", safe_serialization=False, save_embedding_layers=False)
    assert not list((tmp_path / "b").glob("*.bin"))
    with pytest.raises(ConfigError, match="modules_to_save=\\['embed_tokens', 'lm_head'\\]"):
        adapted.save_pretrained(tmp_path / "c", save_embedding_layers=True)
    with pytest.raises(ConfigError, match="unknown keyword\\(s\\) \\['max_shard_size'\\]"):
        adapted.save_pretrained(tmp_path / "d", max_shard_size="1GB")
    with pytest.raises(ConfigError, match="PiSSA"):
        adapted.save_pretrained(tmp_path / "e", path_initial_model_for_weight_conversion="x")
    assert not any((tmp_path / n).exists() for n in "cde")
    peft.PeftModel.from_pretrained(build("llama"), tmp_path / "a")  # PEFT reads what was written


def test_peft_model_state_dicts_move_between_peft_and_factorlab():
    batch = inputs("llama")
    ours, theirs = lora(), peft_lora()
    mine = factorlab.get_peft_model_state_dict(ours)
    assert mine.keys() == peft.get_peft_model_state_dict(theirs).keys()
    peft.set_peft_model_state_dict(theirs, mine)
    torch.testing.assert_close(logits(theirs, batch), logits(ours, batch), atol=1e-5, rtol=0)
    fresh = lora(init_lora_weights=True)
    result = factorlab.set_peft_model_state_dict(fresh, peft.get_peft_model_state_dict(theirs))
    assert result.missing_keys == [] and result.unexpected_keys == []
    torch.testing.assert_close(logits(fresh, batch), logits(ours, batch), atol=0, rtol=0)
    # values from a state dict keyed as model.state_dict() (e.g. gathered from shards)
    doubled = {k: v * 2 for k, v in ours.state_dict().items() if v.is_floating_point()}
    picked = factorlab.get_peft_model_state_dict(ours, state_dict=doubled)
    assert all(torch.equal(picked[k], mine[k] * 2) for k in mine)


def test_a_bad_peft_state_dict_changes_nothing_and_peft_s_own_call_names_factorlab_s():
    adapted = lora()
    before = {k: v.clone() for k, v in adapted.state_dict().items() if v.is_floating_point()}
    good = factorlab.get_peft_model_state_dict(adapted)
    key = sorted(good)[-1]
    for bad in (
        {**good, key: torch.full_like(good[key], float("nan"))},
        {k: v for k, v in good.items() if k != key},
    ):
        with pytest.raises(AdapterLoadError):
            factorlab.set_peft_model_state_dict(
                adapted, {k: torch.zeros_like(v) for k, v in bad.items()} | bad
            )
        after = adapted.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ConfigError, match="no adapter named 'other'"):
        factorlab.get_peft_model_state_dict(adapted, adapter_name="other")
    with pytest.raises(PeftOnlyError, match=r"use factorlab\.get_peft_model_state_dict"):
        peft.get_peft_model_state_dict(adapted)
    with pytest.raises(PeftOnlyError, match=r"factorlab\.set_peft_model_state_dict"):
        peft.set_peft_model_state_dict(adapted, good)


def test_a_folder_re_saved_by_peft_is_refused_by_a_deeper_model(tmp_path):
    adapted = lora()
    adapted.save_pretrained(tmp_path / "ours")
    peft.PeftModel.from_pretrained(build("llama"), tmp_path / "ours").save_pretrained(tmp_path / "theirs")
    batch = inputs("llama")
    again = factorlab.AdaptedModel.from_pretrained(build("llama"), tmp_path / "theirs")  # no factorlab record
    torch.testing.assert_close(logits(again, batch), logits(adapted, batch), atol=1e-5, rtol=0)
    deeper = build("llama", num_hidden_layers=4)
    names = [n for n, _ in deeper.named_modules()]
    with pytest.raises(AdapterLoadError, match=r"holds no tensors for 4 of the 8 modules .* another depth"):
        factorlab.AdaptedModel.from_pretrained(deeper, tmp_path / "theirs")
    assert [n for n, _ in deeper.named_modules()] == names


@pytest.mark.parametrize("targeting", [{"target_roles": ["attn_q"]}, {"target_modules": "all-linear"}])
def test_targeting_peft_cannot_express_falls_back_to_names_it_matches_exactly(tmp_path, targeting):
    import json

    adapted = factorlab.adapt(build("llama"), factorlab.LoraConfig(r=2, init_lora_weights=False, **targeting))
    adapted.save_pretrained(tmp_path / "a")
    written = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"]
    theirs = peft.PeftModel.from_pretrained(build("llama"), tmp_path / "a")
    adapted_names = {n for n, _ in adapted.adapter_layers()}
    peft_names = {
        n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")
    }
    assert peft_names == adapted_names, written


def test_merging_a_trained_copy_of_a_tied_head_unties_it_as_peft_does():
    batch = inputs("llama")
    model = build("llama", tie_word_embeddings=True)
    embeddings = model.model.embed_tokens.weight.detach().clone()
    adapted = lora(model, modules_to_save=["lm_head"])
    with torch.no_grad():
        adapted.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)
    expected = logits(adapted, batch)
    with pytest.raises(ConfigError, match=r"tied to \['model\.embed_tokens\.weight'\]; merging would change"):
        adapted.merge_adapter()
    assert adapted.state.value == "ready"
    with pytest.warns(UserWarning, match="untied"):
        merged = adapted.merge_and_unload()
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight
    assert torch.equal(merged.model.embed_tokens.weight, embeddings)  # the input side did not move
    assert merged.config.tie_word_embeddings is False
    torch.testing.assert_close(logits(merged, batch), expected, atol=1e-5, rtol=0)

    theirs = peft_lora(build("llama", tie_word_embeddings=True), modules_to_save=["lm_head"])
    again = lora(build("llama", tie_word_embeddings=True), modules_to_save=["lm_head"])
    with torch.no_grad():
        again.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)
    peft.set_peft_model_state_dict(theirs, factorlab.get_peft_model_state_dict(again))
    torch.testing.assert_close(logits(theirs, batch), expected, atol=1e-5, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_merged = theirs.merge_and_unload()
    assert peft_merged.lm_head.weight is not peft_merged.model.embed_tokens.weight  # PEFT unties too
    torch.testing.assert_close(logits(peft_merged, batch), logits(merged, batch), atol=1e-5, rtol=0)


def test_a_checkpoint_of_factorlab_0_1_still_loads():
    source = lora()
    old = {k.replace("base_model.model.", "base_model.", 1): v for k, v in source.state_dict().items()}
    target = lora(init_lora_weights=True)
    assert target.load_state_dict(old).missing_keys == []
    batch = inputs("llama")
    torch.testing.assert_close(logits(target, batch), logits(source, batch), atol=0, rtol=0)
