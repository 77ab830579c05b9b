import inspect
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import factorlab
from factorlab import (
    AdaptedModel,
    AdapterLoadError,
    AdapterSaveError,
    ConfigError,
    LoraConfig,
    LoraMixerConfig,
    TargetError,
    adapt,
)
from factorlab.core.targeting import resolve_targets
from factorlab.layers import AdapterLayer, LoRALinear
from tiny_models import ARCHS, build, inputs, logits

ALL_LINEAR = {
    "llama": "all-linear",
    "gpt2": "all-linear",
    "t5": "all-linear",
    "bert": "all-linear",
    "mamba": ["in_proj", "x_proj", "out_proj"],
}


def assert_plain(model):
    """No adapter layer is left and every parameter is trainable again (nothing half-applied)."""
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_lora_changes_nothing(arch):
    model = build(arch)
    batch = inputs(arch)
    # adapt() freezes the base; PyTorch's matmul picks its kernel by requires_grad (Mamba's x_proj gets
    # a transposed input), and AVX2 kernels round the two differently: compare like with like.
    before = logits(build(arch).requires_grad_(False), batch)
    adapted = adapt(model, LoraConfig(r=4, target_modules=ALL_LINEAR[arch]))
    assert len(adapted.adapter_targets["default"]) > 0
    assert torch.equal(logits(adapted, batch), before)
    with adapted.disable_adapters():
        assert torch.equal(logits(adapted, batch), before)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_is_bit_exact_and_merge_matches(arch, tmp_path):
    batch = inputs(arch)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR[arch], init_lora_weights=False)
    adapted = adapt(build(arch), config)
    expected = logits(adapted, batch)
    assert not torch.equal(expected, logits(build(arch), batch))  # the adapter really acts
    adapted.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    # is_trainable=True: the same requires_grad flags as the saved model (Mamba's CPU path rounds
    # differently when no parameter requires grad, even under no_grad)
    restored = AdaptedModel.from_pretrained(build(arch), tmp_path, is_trainable=True)
    assert torch.equal(logits(restored, batch), expected)
    saved = adapted.adapter_state_dict("default")
    loaded = restored.adapter_state_dict("default")
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    frozen = AdaptedModel.from_pretrained(build(arch), tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())  # loaded for inference, like PEFT
    torch.testing.assert_close(logits(frozen, batch), expected, atol=1e-5, rtol=0)

    merged = adapted.merge_and_unload()
    assert type(merged) is type(build(arch))
    assert_plain(merged)
    torch.testing.assert_close(logits(merged, batch), expected, atol=1e-5, rtol=0)


def test_only_adapter_weights_are_trainable_and_counted():
    model = build("llama")
    total = sum(p.numel() for p in model.parameters())
    adapted = adapt(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    expected = (
        2 * 4 * ((64 + 64) + (64 + 32))
    )  # two layers, r=4; q: 64->64, v: 64->32 (A: r x in, B: out x r)
    counts = factorlab.count_parameters(adapted)
    assert counts["trainable"] == counts["adapter"] == expected
    assert counts["total"] == total + expected and counts["base"] == total
    assert counts["trainable_percent"] == pytest.approx(100 * expected / (total + expected), rel=1e-12)
    assert counts["trainable_percent_of_base"] == pytest.approx(100 * expected / total, rel=1e-12)
    assert adapted.get_nb_trainable_parameters() == (expected, total + expected)


def test_targeting_names_regex_all_linear_exclude_and_layers():
    model = build("llama")
    names = resolve_targets(model, ["q_proj"])
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert resolve_targets(model, r".*layers\.1\.mlp\.(up|down)_proj") == [
        "model.layers.1.mlp.up_proj",
        "model.layers.1.mlp.down_proj",
    ]
    all_linear = resolve_targets(model, "all-linear")
    assert len(all_linear) == 14 and "lm_head" not in all_linear
    assert len(resolve_targets(model, "all-linear", exclude_modules=["mlp.gate_proj", "up_proj"])) == 10
    assert resolve_targets(model, ["o_proj"], layers_to_transform=[1]) == ["model.layers.1.self_attn.o_proj"]


@pytest.mark.parametrize(
    ("arch", "role", "expected"),
    [
        ("llama", "attn_out", ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]),
        ("gpt2", "attn_in", ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]),
        ("gpt2", "ffn_out", ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]),
        ("bert", "ffn_out", ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense"]),
        (
            "bert",
            "attn_out",
            ["bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.1.attention.output.dense"],
        ),
        (
            "mamba",
            "ssm_in_out",
            [
                "backbone.layers.0.mixer.in_proj",
                "backbone.layers.0.mixer.out_proj",
                "backbone.layers.1.mixer.in_proj",
                "backbone.layers.1.mixer.out_proj",
            ],
        ),
    ],
)
def test_architecture_roles(arch, role, expected):
    assert resolve_targets(build(arch), None, target_roles=[role]) == expected


def test_t5_attention_output_role_is_self_attention_of_encoder_and_decoder_only():
    names = resolve_targets(build("t5"), None, target_roles=["attn_out"])
    assert len(names) == 4 and all(n.endswith("SelfAttention.o") for n in names)
    assert {n.split(".")[0] for n in names} == {"encoder", "decoder"}


def test_any_torch_module_can_be_adapted():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    adapted = adapt(model, LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
    x = torch.randn(3, 8)
    assert adapted(x).shape == (3, 4)
    with pytest.raises(TargetError, match="no architecture preset"):
        adapt(torch.nn.Sequential(torch.nn.Linear(2, 2)), LoraConfig(target_roles=["attn_out"]))


def test_several_named_adapters():
    batch = inputs("llama")
    model = build("llama")
    base = logits(model, batch)
    adapted = adapt(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "first")
    out_first = logits(adapted, batch)
    adapted.add_adapter(
        "second", LoraConfig(r=4, target_modules=["q_proj", "o_proj"], init_lora_weights=False)
    )
    assert adapted.active_adapter == "first" and torch.equal(logits(adapted, batch), out_first)
    adapted.set_adapter("second")
    out_second = logits(adapted, batch)
    assert not torch.allclose(out_second, out_first)
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all(".second." in n for n in trainable)
    with adapted.disable_adapters():
        assert torch.equal(logits(adapted, batch), base)
    adapted.delete_adapter("second")
    assert adapted.active_adapter == "first" and torch.equal(logits(adapted, batch), out_first)
    assert not any(isinstance(m, LoRALinear) for n, m in adapted.named_modules() if n.endswith("o_proj"))


def test_save_and_load_several_adapters(tmp_path):
    batch = inputs("llama")
    adapted = adapt(build("llama"), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    adapted.add_adapter("extra", LoraConfig(r=3, target_modules=["v_proj"], init_lora_weights=False))
    expected = {}
    for name in ("default", "extra"):
        adapted.set_adapter(name)
        expected[name] = logits(adapted, batch)
    adapted.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").exists() and (
        tmp_path / "extra" / "adapter_config.json"
    ).exists()
    restored = AdaptedModel.from_pretrained(build("llama"), tmp_path)
    restored.load_adapter(tmp_path / "extra", "extra")
    for name in ("default", "extra"):
        restored.set_adapter(name)
        assert torch.equal(logits(restored, batch), expected[name])


def test_generate_with_kv_cache_matches_generation_without_cache():
    adapted = adapt(build("llama"), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    prompt = inputs("llama", batch=2, seq=5)["input_ids"]
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = adapted.generate(prompt, use_cache=True, **kwargs)
        uncached = adapted.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape == (2, 13)
    assert torch.equal(cached, uncached)


def test_trainer_lowers_the_loss_and_changes_only_adapter_weights(tmp_path):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    adapted = adapt(build("llama"), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    before = {n: p.detach().clone() for n, p in adapted.named_parameters()}
    ids = torch.randint(1, 1000, (4, 16)).repeat(8, 1)  # four sequences to memorise
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        num_train_epochs=6,
        learning_rate=2e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=adapted, args=args, train_dataset=data)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[-1] < losses[0] - 0.5  # a frozen random head caps how far it can go
    for name, p in adapted.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == (".lora_" in name and (".lora_B." in name or ".lora_A." in name)), name


# ---- errors -----------------------------------------------------------------------------------


LINEAR_SUFFIXES = "['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj']"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"target_modules": ["q_prj"]},
            "target_modules=['q_prj'] matched no module of this model. Did you mean ['q_proj', 'v_proj', "
            f"'o_proj']? Linear layers here end in: {LINEAR_SUFFIXES}.",
        ),
        (
            {"target_modules": "q_prj"},  # a string is a regex over full names, quoted as given
            "target_modules='q_prj' matched no module of this model. Did you mean ['q_proj', 'v_proj', "
            f"'o_proj']? Linear layers here end in: {LINEAR_SUFFIXES}.",
        ),
        (
            {"target_modules": ["q_proj"], "layers_to_transform": [7]},
            "target_modules=['q_proj'] matched no module of this model (after exclude_modules=None, "
            "layers_to_transform=[7]).",
        ),
    ],
    ids=["list", "regex", "layers_to_transform"],
)
def test_target_that_matches_nothing_lists_close_names(kwargs, message):
    model = build("llama")
    with pytest.raises(TargetError) as error:
        adapt(model, LoraConfig(**kwargs))
    assert str(error.value).startswith(message), str(error.value)
    assert_plain(model)


def test_merging_an_adapter_on_a_tied_weight_is_refused_and_changes_nothing():
    batch = inputs("llama")
    adapted = adapt(
        build("llama", tie_word_embeddings=True),
        LoraConfig(r=2, target_modules=["lm_head", "q_proj"], init_lora_weights=False),
    )
    expected = logits(adapted, batch)
    with pytest.raises(
        ConfigError,
        match=r"^the weight of lm_head is tied to \['model\.embed_tokens\.weight'\]; merging its adapter "
        r"would change those too",
    ):
        adapted.merge_and_unload()
    assert adapted.state.value == "ready" and torch.equal(logits(adapted, batch), expected)


def test_non_linear_target_is_refused():
    model = build("llama")
    with pytest.raises(TargetError, match=r"cannot adapt: .*self_attn"):
        adapt(model, LoraConfig(target_modules=["self_attn"]))
    assert_plain(model)


@pytest.mark.parametrize(
    "bad",
    [
        {"r": 0},
        {"r": -2},
        {"rank_pattern": {"q_proj": 0}},
        {"lora_dropout": 1.5},
        {"init_lora_weights": "xavier"},
    ],
)
def test_invalid_lora_config(bad):
    with pytest.raises(ConfigError):
        LoraConfig(**bad)


def test_adapting_twice_is_refused():
    adapted = adapt(build("llama"), LoraConfig())
    with pytest.raises(ConfigError, match="already an AdaptedModel"):
        adapt(adapted, LoraConfig())
    with pytest.raises(ConfigError, match="already holds factorlab adapter layers"):
        adapt(adapted.base_model, LoraConfig())
    with pytest.raises(ConfigError, match="already exists"):
        adapted.add_adapter("default", LoraConfig())


@pytest.fixture
def saved_llama(tmp_path):
    adapted = adapt(build("llama"), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    adapted.save_pretrained(tmp_path / "a")
    return tmp_path / "a"


def test_loading_into_another_architecture_fails_cleanly(saved_llama):
    model = build("gpt2")
    with pytest.raises(
        AdapterLoadError, match=r"saved for a LlamaForCausalLM.*this model is a GPT2LMHeadModel"
    ):
        AdaptedModel.from_pretrained(model, saved_llama)
    assert_plain(model)


def test_loading_into_another_size_fails_cleanly(saved_llama):
    import transformers as tf

    def llama(**changes):
        sizes = {"hidden_size": 64, "num_hidden_layers": 2, **changes}
        return tf.LlamaForCausalLM(
            tf.LlamaConfig(
                intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, **sizes
            )
        )

    bigger = llama(num_hidden_layers=3)
    with pytest.raises(AdapterLoadError, match="another depth or layout"):
        AdaptedModel.from_pretrained(bigger, saved_llama)
    assert_plain(bigger)
    wider = llama(hidden_size=128)
    with pytest.raises(
        AdapterLoadError,
        match=r": module model\.layers\.0\.self_attn\.q_proj had weight shape \[64, 64\] when saved but has "
        r"\[128, 128\] here \(14 modules differ\); the adapter belongs to a model of another size\.$",
    ):
        AdaptedModel.from_pretrained(wider, saved_llama)
    assert_plain(wider)


@pytest.mark.parametrize("edit", ["drop", "add", "reshape", "nan"])
def test_missing_extra_or_wrong_tensors_fail_cleanly(saved_llama, edit):
    file = saved_llama / "adapter_model.safetensors"
    tensors = load_file(file)
    key = sorted(tensors)[0]
    if edit == "drop":
        del tensors[key]
        message = "missing"
    elif edit == "add":
        tensors["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
        message = "belong to no adapter layer"
    elif edit == "reshape":
        tensors[key] = torch.zeros(8, tensors[key].shape[1])
        message = "another rank"
    else:
        tensors[key] = torch.full_like(tensors[key], float("nan"))
        message = "NaN"
    save_file(tensors, file)
    model = build("llama")
    with pytest.raises(AdapterLoadError, match=message):
        AdaptedModel.from_pretrained(model, saved_llama)
    assert_plain(model)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_saving_nan_or_inf_weights_is_refused_and_writes_nothing(tmp_path, value):
    adapted = adapt(build("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    weight = adapted.base_model.model.model.layers[1].self_attn.v_proj.lora_B["default"].weight
    with torch.no_grad():
        weight[3, 1] = value
    with pytest.raises(AdapterSaveError, match=r"NaN or inf .*layers\.1\.self_attn\.v_proj\.lora_B"):
        adapted.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with torch.no_grad():
        weight[3, 1] = 0.0
    adapted.save_pretrained(tmp_path / "out")  # the same adapter, finite again, saves
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_or_truncated_file_fails_cleanly(saved_llama, damage):
    file = saved_llama / "adapter_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 10)
    model = build("llama")
    with pytest.raises(AdapterLoadError, match="corrupt or truncated"):
        AdaptedModel.from_pretrained(model, saved_llama)
    assert_plain(model)


def test_corrupt_config_and_missing_files(saved_llama, tmp_path):
    (saved_llama / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterLoadError, match="not valid JSON"):
        AdaptedModel.from_pretrained(build("llama"), saved_llama)
    with pytest.raises(AdapterLoadError, match=r"no adapter_config\.json"):
        AdaptedModel.from_pretrained(build("llama"), tmp_path)


@pytest.mark.parametrize(
    ("config", "edit", "message"),
    [
        # a field factorlab does not know is refused by name, never dropped: it could change what loads
        (
            factorlab.CompacterConfig(reduction_factor=8),
            lambda c: {**c, "bogus_field": 1},
            r"adapter_config\.json: CompacterConfig has no field\(s\) \['bogus_field'\]; known fields: \[",
        ),
        (
            LoraConfig(r=4, target_modules=["q_proj"]),
            lambda c: {**c, "bogus_field": 1},
            r"LoRA option\(s\) \['bogus_field'\] are set but unknown to factorlab",
        ),
        (
            LoraConfig(r=4, target_modules=["q_proj"]),
            lambda c: {k: v for k, v in c.items() if k not in ("peft_type", "method")},
            r"has neither 'method' \(factorlab\) nor 'peft_type' \(PEFT\); it is not an adapter folder",
        ),
    ],
    ids=["unknown Compacter field", "unknown LoRA field", "no method"],
)
def test_config_with_an_unknown_field_or_no_method_fails_by_name(tmp_path, config, edit, message):
    adapt(build("llama"), config).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(edit(saved)))
    model = build("llama")
    with pytest.raises(AdapterLoadError, match=message):
        AdaptedModel.from_pretrained(model, tmp_path)
    assert_plain(model)


def test_config_rank_disagreeing_with_file_fails(saved_llama):
    config = json.loads((saved_llama / "adapter_config.json").read_text())
    config["r"] = 2
    (saved_llama / "adapter_config.json").write_text(json.dumps(config))
    model = build("llama")
    with pytest.raises(
        AdapterLoadError, match=r"holds shape \(4, 64\) but this model's adapter expects \(2, 64\)"
    ):
        AdaptedModel.from_pretrained(model, saved_llama)
    assert_plain(model)


def test_mamba_dt_proj_is_refused_and_the_called_projections_train():
    model = build("mamba")
    with pytest.raises(TargetError, match=r"dt_proj\.weight directly"):
        adapt(model, LoraConfig(target_modules=["dt_proj"]))
    assert_plain(model)
    adapted = adapt(model, LoraConfig(r=2, target_modules=["in_proj", "x_proj", "out_proj"]))
    adapted.train()
    out = adapted(**inputs("mamba"), labels=inputs("mamba")["input_ids"])
    out.loss.backward()
    grads = {n: p.grad for n, p in adapted.named_parameters() if p.requires_grad}
    assert len(grads) == 2 * 3 * 2
    for name, grad in grads.items():  # B starts at zero, so A's gradient is zero: check B
        if ".lora_B." in name:
            assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "config", [LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), LoraMixerConfig(num_experts=2, r=2)]
)
def test_a_copy_runs_and_trains_its_own_weights(config):
    """deepcopy / pickle of an adapted model: the copy's forward reads the copy's weights (a forward
    bound to the original would train the original through the copy, and the copy not at all)."""
    import copy
    import io

    original = adapt(build("llama"), config)
    batch = inputs("llama")
    for clone in (copy.deepcopy(original), torch.load(io.BytesIO(_pickled(original)), weights_only=False)):
        before = logits(original, batch)
        weights = [p for p in clone.parameters() if p.requires_grad]
        with torch.no_grad():
            for weight in weights:
                weight.add_(0.5)
        assert not torch.allclose(logits(clone, batch), before)  # the copy reads its own weights
        torch.testing.assert_close(logits(original, batch), before)  # and leaves the original alone
        clone.train()
        clone(**batch, labels=batch["input_ids"]).loss.backward()
        assert all(w.grad is not None for w in weights) and all(p.grad is None for p in original.parameters())
        assert (
            inspect.signature(clone.forward).parameters.keys()
            == inspect.signature(original.forward).parameters.keys()
        )


def _pickled(model) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(model, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (
            ["default", "c"],
            r"^set_adapter\(\['default', 'c'\]\): compacter adapters do not add up, so they are active",
        ),
        ([], r"^set_adapter takes an adapter name or a list of names, got \[\]\.$"),
        (3, r"^set_adapter takes an adapter name or a list of names, got 3\.$"),
        (["default", 3], r"^set_adapter takes an adapter name or a list of names, got \['default', 3\]\.$"),
        (["default", "nope"], r"^no adapter named 'nope'; adapters: \['c', 'default', 'second'\]\.$"),
    ],
    ids=["compacter with lora", "empty", "not a name", "one not a name", "unknown"],
)
def test_set_adapter_refusals_name_the_problem_and_change_nothing(names, message):
    adapted = adapt(build("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    adapted.add_adapter("c", factorlab.CompacterConfig(reduction_factor=8))
    adapted.add_adapter("second", LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match=message):
        adapted.set_adapter(names)
    assert adapted.active_adapters == ["default"]
    adapted.set_adapter(["default", "second"])  # LoRA adapters add up
    assert adapted.active_adapters == ["default", "second"]


def test_pickled_weights_or_a_config_that_is_not_an_object_are_refused_by_name(tmp_path):
    (tmp_path / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}'
    )
    torch.save({}, tmp_path / "adapter_model.bin")
    model = build("llama")
    with pytest.raises(
        AdapterLoadError,
        match=r"has no adapter_model\.safetensors\. It holds \['adapter_model\.bin'\]: pickle files are not "
        r"loaded \(they can run code\)",
    ):
        AdaptedModel.from_pretrained(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(
        AdapterLoadError, match=r"adapter_config\.json should hold a JSON object, found list\.$"
    ):
        AdaptedModel.from_pretrained(model, tmp_path)
    assert_plain(model)
