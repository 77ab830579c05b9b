"""PEFT's LoRA features (DoRA, bias, modules_to_save, task_type) round-trip with the real `peft`
both ways, logits within 1e-5, on Llama, GPT-2 (Conv1D) and BERT shapes."""

import json

import peft
import pytest
import torch

from factorlab import AdaptedModel, LoraConfig, adapt
from factorlab.errors import ConfigError
from tiny_models import build, inputs, logits

TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"]}
SAVED = {"llama": ["lm_head"], "gpt2": ["ln_f"], "bert": ["decoder"]}
FEATURES = {
    "dora": {"use_dora": True},
    "bias_all": {"bias": "all"},
    "bias_lora_only": {"bias": "lora_only"},
    "modules_to_save": {},
    "dora_bias_saved": {"use_dora": True, "bias": "lora_only"},
}
CASES = [(arch, feature) for arch in TARGETS for feature in FEATURES]


def options(arch: str, feature: str) -> dict:
    out = dict(FEATURES[feature], r=4, lora_alpha=8, target_modules=TARGETS[arch], init_lora_weights=False)
    if "saved" in feature or feature == "modules_to_save":
        out["modules_to_save"] = SAVED[arch]
    return out


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every trainable tensor (magnitudes, biases, saved modules), as training would."""
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters()):
        if p.requires_grad:
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def different(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.allclose(a, b, atol=1e-3)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("arch", "feature"), CASES)
def test_factorlab_feature_loads_in_peft_with_the_same_logits(arch, feature, tmp_path):
    batch = inputs(arch)
    adapted = adapt(build(arch), LoraConfig(**options(arch, feature)))
    perturb(adapted)
    expected = logits(adapted, batch)
    adapted.save_pretrained(tmp_path)
    peft_model = peft.PeftModel.from_pretrained(build(arch), tmp_path, is_trainable=True)
    got = logits(peft_model, batch)
    assert different(got, logits(build(arch), batch))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("arch", "feature"), CASES)
def test_peft_feature_loads_in_factorlab_with_the_same_logits(arch, feature, tmp_path):
    batch = inputs(arch)
    peft_model = peft.get_peft_model(build(arch), peft.LoraConfig(**options(arch, feature)))
    perturb(peft_model)
    expected = logits(peft_model, batch)
    peft_model.save_pretrained(tmp_path / "peft")
    adapted = AdaptedModel.from_pretrained(build(arch), tmp_path / "peft", is_trainable=True)
    torch.testing.assert_close(logits(adapted, batch), expected, atol=1e-5, rtol=0)
    peft_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert adapted.get_nb_trainable_parameters()[0] == peft_trainable
    adapted.save_pretrained(tmp_path / "again")  # and back to PEFT
    back = peft.PeftModel.from_pretrained(build(arch), tmp_path / "again", is_trainable=True)
    torch.testing.assert_close(logits(back, batch), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dora_merges_and_unmerges_exactly(arch):
    batch = inputs(arch)
    base_logits = logits(build(arch), batch)
    adapted = adapt(build(arch), LoraConfig(**options(arch, "dora")))
    perturb(adapted)
    expected = logits(adapted, batch)
    assert different(expected, base_logits)
    adapted.merge_adapter()
    torch.testing.assert_close(logits(adapted, batch), expected, atol=1e-5, rtol=0)
    adapted.unmerge_adapter()
    with adapted.disable_adapters():
        torch.testing.assert_close(logits(adapted, batch), base_logits, atol=1e-5, rtol=0)
    merged = adapted.merge_and_unload()
    torch.testing.assert_close(logits(merged, batch), expected, atol=1e-5, rtol=0)


def test_dora_starts_as_the_base_model_and_trains_its_magnitude():
    batch = inputs("llama")
    adapted = adapt(build("llama"), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    torch.testing.assert_close(logits(adapted, batch), logits(build("llama"), batch), atol=1e-5, rtol=0)
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert any(n.endswith("lora_magnitude_vector.default.weight") for n in trainable)
    loss = adapted(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    q_proj = adapted.base_model.model.model.layers[0].self_attn.q_proj
    magnitude = q_proj.lora_magnitude_vector["default"].weight
    assert magnitude.grad is not None and magnitude.grad.abs().sum() > 0


def bert_classifier():
    return build("bert-cls")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_task_type_trains_the_classifier_head_and_round_trips(tmp_path):
    batch = inputs("bert")
    with pytest.warns(UserWarning, match="task_type='SEQ_CLS'"):
        adapt(bert_classifier(), LoraConfig(target_modules=["query"]))  # the head would stay random
    adapted = adapt(bert_classifier(), LoraConfig(target_modules=["query"], task_type="SEQ_CLS"))
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert any("classifier.modules_to_save" in n for n in trainable)
    peft_model = peft.get_peft_model(
        bert_classifier(), peft.LoraConfig(target_modules=["query"], task_type="SEQ_CLS")
    )
    assert adapted.get_nb_trainable_parameters()[0] == sum(
        p.numel() for p in peft_model.parameters() if p.requires_grad
    )
    perturb(adapted)
    expected = logits(adapted, batch)
    adapted.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    back = peft.PeftModel.from_pretrained(bert_classifier(), tmp_path)
    assert type(back).__name__ == "PeftModelForSequenceClassification"
    torch.testing.assert_close(logits(back, batch), expected, atol=1e-5, rtol=0)


def test_peft_keywords_are_accepted_or_refused_with_the_alternative():
    config = LoraConfig(
        task_type="CAUSAL_LM", bias="none", use_dora=False, fan_in_fan_out=False, loftq_config={}
    )
    assert config.task_type == "CAUSAL_LM"
    with pytest.raises(ConfigError, match="LoftQ"):
        LoraConfig(loftq_config={"loftq_bits": 4})
    with pytest.raises(ConfigError, match="layers_to_transform alone"):
        LoraConfig(layers_pattern="blocks_x")
    with pytest.raises(ConfigError, match="one of 'none', 'all', 'lora_only'"):
        LoraConfig(bias="some")
    with pytest.raises(ConfigError, match="task_type"):
        LoraConfig(task_type="CLASSIFY")
    with pytest.raises(ConfigError, match="unknown to factorlab"):
        LoraConfig.from_dict({"r": 2, "use_future_trick": True})
    assert LoraConfig.from_dict({"r": 2, "use_future_trick": None}).r == 2


EMBEDDINGS = {"llama": "embed_tokens", "gpt2": "wte", "bert": "word_embeddings"}


class TinyCNN(torch.nn.Module):
    """A small model with Conv1d and Conv2d layers (PEFT adapts custom models by module name)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv2 = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.point = torch.nn.Conv2d(8, 8, 1)
        self.conv1 = torch.nn.Conv1d(8, 6, 3, padding=1)
        self.head = torch.nn.Linear(6, 4)

    def forward(self, x):
        h = torch.relu(self.point(torch.relu(self.conv2(x))))  # (B, 8, H, W)
        h = self.conv1(h.flatten(2))  # (B, 6, H*W)
        return self.head(h.mean(-1))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("arch", list(EMBEDDINGS))
def test_embedding_lora_round_trips_with_peft(arch, tmp_path):
    batch = inputs(arch)
    config = dict(
        r=4, lora_alpha=8, target_modules=[EMBEDDINGS[arch], TARGETS[arch][0]], init_lora_weights=False
    )
    adapted = adapt(build(arch), LoraConfig(**config))
    perturb(adapted)
    expected = logits(adapted, batch)
    adapted.save_pretrained(tmp_path / "f")
    peft_model = peft.PeftModel.from_pretrained(build(arch), tmp_path / "f", is_trainable=True)
    torch.testing.assert_close(logits(peft_model, batch), expected, atol=1e-5, rtol=0)
    peft_model.save_pretrained(tmp_path / "p")
    back = AdaptedModel.from_pretrained(build(arch), tmp_path / "p")
    torch.testing.assert_close(logits(back, batch), expected, atol=1e-5, rtol=0)
    if arch in ("gpt2", "bert"):  # their embeddings are tied to the output head: merging would change both
        with pytest.raises(ConfigError, match="tied"):
            back.merge_and_unload()
        return
    merged = back.merge_and_unload()
    torch.testing.assert_close(logits(merged, batch), expected, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_conv_lora_round_trips_with_peft_and_merges(tmp_path):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    config = dict(r=2, lora_alpha=4, target_modules=["conv2", "point", "conv1"], init_lora_weights=False)
    adapted = adapt(TinyCNN(), LoraConfig(**config))
    perturb(adapted)
    expected = adapted(x)
    assert different(expected, TinyCNN()(x))
    adapted.save_pretrained(tmp_path / "f")
    peft_model = peft.PeftModel.from_pretrained(TinyCNN(), tmp_path / "f")
    torch.testing.assert_close(peft_model(x), expected, atol=1e-5, rtol=0)
    peft_model.save_pretrained(tmp_path / "p")
    back = AdaptedModel.from_pretrained(TinyCNN(), tmp_path / "p")
    torch.testing.assert_close(back(x), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(back.merge_and_unload()(x), expected, atol=1e-5, rtol=0)


def test_dora_and_grouped_convolutions_outside_linear_layers_are_refused():
    with pytest.raises(ConfigError, match="DoRA on Embedding layers"):
        adapt(build("llama"), LoraConfig(target_modules=["embed_tokens"], use_dora=True))
    model = TinyCNN()
    model.conv1 = torch.nn.Conv1d(8, 6, 3, padding=1, groups=2)
    with pytest.raises(ConfigError, match="groups=2"):
        adapt(model, LoraConfig(target_modules=["conv1"]))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("combination", ["cat", "linear", "svd"])
def test_add_weighted_adapter_matches_peft(arch, combination, tmp_path):
    batch = inputs(arch)
    first = dict(r=4, lora_alpha=8, target_modules=TARGETS[arch], init_lora_weights=False)
    second = dict(first, r=4 if combination == "linear" else 2, lora_alpha=3)
    peft_model = peft.get_peft_model(build(arch), peft.LoraConfig(**first), adapter_name="a")
    peft_model.add_adapter("b", peft.LoraConfig(**second))
    perturb(peft_model)
    peft_model.save_pretrained(tmp_path)  # non-default adapters go to tmp_path/<name>
    ours = AdaptedModel.from_pretrained(build(arch), tmp_path / "a", adapter_name="a")
    ours.load_adapter(tmp_path / "b", "b")
    weights = [0.7, -1.3]
    peft_model.add_weighted_adapter(["a", "b"], weights, "ab", combination_type=combination)
    ours.add_weighted_adapter(["a", "b"], weights, "ab", combination_type=combination)
    peft_model.set_adapter("ab")
    ours.set_adapter("ab")
    expected = logits(peft_model, batch)
    assert different(expected, logits(build(arch), batch))
    torch.testing.assert_close(logits(ours, batch), expected, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_several_active_adapters_add_up_like_peft(tmp_path):
    batch = inputs("llama")
    config = dict(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = peft.get_peft_model(build("llama"), peft.LoraConfig(**config), adapter_name="a")
    peft_model.add_adapter("b", peft.LoraConfig(**dict(config, r=3)))
    peft_model.save_pretrained(tmp_path)
    peft_model.base_model.set_adapter(["a", "b"])
    expected = logits(peft_model, batch)
    ours = AdaptedModel.from_pretrained(build("llama"), tmp_path / "a", adapter_name="a", is_trainable=True)
    ours.load_adapter(tmp_path / "b", "b", is_trainable=True)
    ours.set_adapter(["a", "b"])
    assert ours.active_adapters == ["a", "b"]
    torch.testing.assert_close(logits(ours, batch), expected, atol=1e-5, rtol=0)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert any(".a.weight" in n for n in trainable) and any(".b.weight" in n for n in trainable)
    ours.merge_adapter()
    torch.testing.assert_close(logits(ours, batch), expected, atol=1e-5, rtol=0)
    ours.unmerge_adapter()
    ours.delete_adapter("a")
    assert ours.active_adapters == ["b"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_peft_folder_with_layers_to_transform_and_pattern_loads(tmp_path):
    batch = inputs("llama")
    config = peft.LoraConfig(
        r=2,
        target_modules=["q_proj"],
        layers_to_transform=[1],
        layers_pattern="layers",
        init_lora_weights=False,
    )
    peft_model = peft.get_peft_model(build("llama"), config)
    peft_model.save_pretrained(tmp_path)
    ours = AdaptedModel.from_pretrained(build("llama"), tmp_path)
    assert [n for n, _ in ours.adapter_layers()] == ["model.layers.1.self_attn.q_proj"]
    torch.testing.assert_close(logits(ours, batch), logits(peft_model, batch), atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_dora_with_dropout_in_training_matches_peft(tmp_path):
    """In training, DoRA's base term W x uses the dropped-out input, as in PEFT (same seed, same masks)."""
    batch = inputs("llama")
    config = dict(options("llama", "dora"), lora_dropout=0.3)
    peft_model = peft.get_peft_model(build("llama"), peft.LoraConfig(**config))
    perturb(peft_model)
    peft_model.save_pretrained(tmp_path)
    ours = AdaptedModel.from_pretrained(build("llama"), tmp_path, is_trainable=True)
    trained = []
    for model in (peft_model, ours):
        model.train()
        torch.manual_seed(7)
        trained.append(model(**batch).logits)
    torch.testing.assert_close(trained[1], trained[0], atol=1e-5, rtol=0)
    assert different(trained[1], logits(ours, batch))  # the dropout acted


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_an_adapter_without_the_saved_module_runs_the_base_one_as_in_peft(tmp_path):
    """ "a" trains its own lm_head (modules_to_save), "b" does not: with "b" active the model uses the
    original head, as PEFT does, and switching back brings "a"'s head back."""
    batch = inputs("llama")
    with_head = dict(options("llama", "modules_to_save"))
    plain = {k: v for k, v in with_head.items() if k != "modules_to_save"}
    adapted = adapt(build("llama"), LoraConfig(**with_head), adapter_name="a")
    adapted.add_adapter("b", LoraConfig(**plain))
    perturb(adapted)  # "a": its LoRA and its own copy of the head
    adapted.set_adapter("b")
    perturb(adapted, seed=1)  # "b"'s LoRA
    head = adapted.base_model.lm_head
    assert head.active_adapters == []  # "b" has no copy: the original head runs
    adapted.save_pretrained(tmp_path)
    in_peft = peft.PeftModel.from_pretrained(build("llama"), tmp_path / "a", adapter_name="a")
    in_peft.load_adapter(tmp_path / "b", adapter_name="b")
    for name in ("b", "a"):
        adapted.set_adapter(name)
        in_peft.set_adapter(name)
        torch.testing.assert_close(logits(adapted, batch), logits(in_peft, batch), atol=1e-5, rtol=0)
    assert head.active_adapters == ["a"]
