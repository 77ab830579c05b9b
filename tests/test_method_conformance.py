"""One conformance suite for every registered method, the README's third-party example included: adapt,
train a step, save and load bit-exactly, a Trainer-style checkpoint, the state dict round trip,
merge / unmerge / merge_and_unload where the layers can merge, disabling, a second adapter added, set and
deleted, and the state machine's refusals. A new method gets all of it by registering."""

import re
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import factorlab
from factorlab.core.method import METHODS
from factorlab.errors import ConfigError, FactorlabError
from tiny_models import build, inputs

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> types.ModuleType:
    """The README's "Write your own method" code, run as it is, in a module of its own."""
    text = README.read_text()
    block = text[text.index("<!-- example: scale method -->") : text.index("<!-- end example -->")]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    module = types.ModuleType("scale_method")
    sys.modules["scale_method"] = module
    if "scale" in METHODS:  # registered by an earlier import in this process: the same code again
        del METHODS["scale"]
    exec(compile(code, "README.md (scale method)", "exec"), module.__dict__)
    return module


SCALE = readme_example()

# A small config per method for the tiny Llama, weights that change the output from the start.
CONFIGS = {
    "lora": lambda: factorlab.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "compacter": lambda: factorlab.CompacterConfig(reduction_factor=4, phm_dim=2),
    "compacter++": lambda: factorlab.CompacterPlusPlusConfig(reduction_factor=4, phm_dim=2),
    "phm_adapter": lambda: factorlab.PHMAdapterConfig(reduction_factor=4, phm_dim=2),
    "lora_mixer": lambda: factorlab.LoraMixerConfig(num_experts=2, r=2, init_lora_weights=False),
    "scale": lambda: SCALE.ScaleConfig(init=1.5),
    "mixlora": lambda: factorlab.MixLoraConfig(r=2, num_experts=3, init_lora_weights=False),
    "hydralora": lambda: factorlab.HydraLoraConfig(r=2, num_experts=3, init_lora_weights=False),
}


def config_for(name: str):
    return CONFIGS[name]() if name in CONFIGS else METHODS[name].config_cls()


def logits(model, batch=None):
    with torch.no_grad():
        return model(**(batch or inputs("llama"))).logits


def nudge(adapted, seed: int = 7):
    """Move every trainable weight a little, so an adapter that starts as the identity (zero-initialised
    Compacter up-projections, scales of 1) changes the output."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.fixture(params=sorted(METHODS))
def method(request):
    return request.param


def test_the_readme_example_registers_and_refuses_a_taken_name():
    assert METHODS["scale"] is SCALE.SCALE
    with pytest.raises(ConfigError, match=r"'lora' is already registered \(by factorlab\.methods\.lora"):
        factorlab.register_method(
            factorlab.Method(
                "lora", SCALE.ScaleConfig, SCALE.ScaleLayer, SCALE.build_scale_layer, lambda f: ()
            )
        )
    assert METHODS["lora"].config_cls is factorlab.LoraConfig  # unchanged
    factorlab.register_method(SCALE.SCALE)  # the same method again is fine


def test_adapt_and_train_a_step(method):
    base = build("llama")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    adapted = factorlab.adapt(base, config_for(method))
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    assert trainable and all(not p.requires_grad for p in adapted.get_base_model().parameters() if p not in
                             set(trainable))  # fmt: skip
    start = [p.detach().clone() for p in trainable]
    ids = inputs("llama")["input_ids"]
    adapted.train()
    loss = adapted(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.optim.SGD(trainable, lr=0.1).step()
    assert any(not torch.equal(a, p) for a, p in zip(start, trainable))  # the adapter trained
    with factorlab.AdaptedModel.disable_adapters(adapted):
        after = adapted.get_base_model()
    base_weights = {k: v for k, v in after.state_dict().items() if k in before}
    assert all(torch.equal(before[k], base_weights[k]) for k in base_weights if "base_layer" not in k)


def test_save_load_bit_exact_and_trainer_checkpoint(method, tmp_path):
    adapted = factorlab.adapt(build("llama"), config_for(method))
    nudge(adapted)
    expected = logits(adapted.eval())
    adapted.save_pretrained(tmp_path / "a")
    loaded = factorlab.AdaptedModel.from_pretrained(build("llama"), tmp_path / "a")
    assert torch.equal(logits(loaded), expected)
    ours = {k: v for k, v in adapted.state_dict().items() if v.is_floating_point()}
    theirs = loaded.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in ours.items())
    checkpoint = tmp_path / "checkpoint-1"  # what transformers.Trainer writes for a model it does not know
    checkpoint.mkdir()
    save_file(
        {k: v.contiguous() for k, v in adapted.state_dict().items()}, str(checkpoint / "model.safetensors")
    )
    resumed = factorlab.AdaptedModel.from_pretrained(build("llama"), checkpoint)
    assert torch.equal(logits(resumed), expected)
    fresh = factorlab.adapt(build("llama"), config_for(method))
    assert fresh.load_state_dict(adapted.state_dict()).missing_keys == []
    assert torch.equal(logits(fresh.eval()), expected)


def test_merge_unmerge_and_unload_or_a_clean_refusal(method):
    adapted = factorlab.adapt(build("llama"), config_for(method))
    nudge(adapted)
    adapted.eval()
    expected = logits(adapted)
    mergeable = all(layer.can_merge for _, layer in adapted.adapter_layers())
    if not mergeable:
        with pytest.raises(FactorlabError, match="cannot be merged"):
            adapted.merge_adapter()
        assert torch.equal(logits(adapted), expected)
        return
    adapted.merge_adapter()
    assert adapted.state.value == "merged"
    torch.testing.assert_close(logits(adapted), expected, atol=1e-4, rtol=1e-4)
    adapted.train()
    ids = inputs("llama")["input_ids"]
    with pytest.raises(ConfigError, match="unmerge_adapter"):
        adapted(input_ids=ids, labels=ids)
    adapted.eval()
    adapted.unmerge_adapter()
    torch.testing.assert_close(logits(adapted), expected, atol=1e-5, rtol=1e-5)
    plain = adapted.merge_and_unload()
    assert not any(isinstance(m, factorlab.AdapterLayer) for m in plain.modules())
    torch.testing.assert_close(logits(plain), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="unloaded"):
        adapted.add_adapter("again", config_for(method))


def test_disable_and_a_second_adapter(method):
    base_logits = logits(build("llama"))
    adapted = factorlab.adapt(build("llama"), config_for(method))
    nudge(adapted)
    adapted.eval()
    first = logits(adapted)
    with adapted.disable_adapters():
        assert torch.equal(logits(adapted), base_logits)
    adapted.add_adapter("second", config_for(method))
    assert adapted.active_adapters == ["default"] and torch.equal(logits(adapted), first)
    adapted.set_adapter("second")
    nudge(adapted, seed=8)
    adapted.eval()
    second = logits(adapted)
    assert not torch.equal(second, first)
    adapted.delete_adapter("second")
    assert adapted.active_adapters == ["default"]
    assert torch.equal(logits(adapted), first)
    with pytest.raises(ConfigError, match="no adapter named 'second'"):
        adapted.set_adapter("second")


def test_core_names_no_method():
    """The core calls methods through their hooks only: no method's name, label, config class or
    per-call keyword appears in factorlab/core/ (code, comments or messages)."""
    core = Path(factorlab.__file__).parent / "core"
    text = {p.name: p.read_text().lower() for p in core.glob("*.py")}
    for method in METHODS.values():
        words = {method.name, method.label, method.config_cls.__name__, *method.forward_keywords} - {""}
        for word in words:
            found = [
                name for name, source in text.items() if re.search(rf"\b{re.escape(word.lower())}\b", source)
            ]
            assert not found, f"{word!r} ({method.name}) appears in core/{found}"
