import peft
import pytest
import torch
from safetensors.torch import load_file

from factorlab import AdaptedModel, AdapterLoadError, ConfigError, LoraConfig, LoraMixerConfig, adapt
from factorlab.layers import LoRALinear, LoRAMixerLinear
from factorlab.layers.mixer import RoutingState, routing_aux_loss
from factorlab.methods.lora_mixer import routing_weights_per_sample, set_stage
from tiny_models import build, inputs, logits

TARGETS = ["q_proj", "v_proj", "o_proj"]


def mixer(routing="soft", **kwargs):
    torch.manual_seed(0)
    config = LoraMixerConfig(
        num_experts=3,
        r=4,
        lora_alpha=8,
        target_modules=TARGETS,
        routing=routing,
        init_lora_weights=False,
        **kwargs,
    )
    return adapt(build("llama"), config)


def lora_like_expert(adapted_mixer, expert: int):
    """A plain LoRA model whose adapter is exactly expert ``expert`` of the mixer."""
    lora = adapt(build("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    with torch.no_grad():
        for name, layer in lora.adapter_layers():
            bank = adapted_mixer.get_base_model().get_submodule(name).experts["default"]
            layer.lora_A["default"].weight.copy_(bank.A[expert])
            layer.lora_B["default"].weight.copy_(bank.B[expert])
    return lora


def test_hard_routing_equals_the_expert_alone():
    batch = inputs("llama")
    adapted = mixer("hard")
    experts = [logits(lora_like_expert(adapted, e), batch) for e in range(3)]
    assert not torch.allclose(experts[0], experts[1], atol=1e-3)
    for e in range(3):
        with torch.no_grad():
            got = adapted(**batch, task_ids=torch.tensor([e, e])).logits
        torch.testing.assert_close(got, experts[e], atol=1e-5, rtol=0)
    with torch.no_grad():  # one id per sample
        got = adapted(**batch, task_ids=torch.tensor([2, 0])).logits
    torch.testing.assert_close(got[0], experts[2][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], experts[0][1], atol=1e-5, rtol=0)


def test_soft_routing_with_a_one_hot_router_equals_the_expert_alone():
    batch = inputs("llama")
    adapted = mixer("soft")
    with torch.no_grad():
        for _, layer in adapted.adapter_layers():
            layer.router["default"].bias.copy_(torch.tensor([0.0, 1e4, 0.0]))  # softmax exactly one-hot
    torch.testing.assert_close(
        logits(adapted, batch), logits(lora_like_expert(adapted, 1), batch), atol=1e-5, rtol=0
    )


def test_topk_with_k_equal_to_e_is_soft_routing_and_topk_differs_from_soft_when_k_is_smaller():
    batch = inputs("llama")
    adapted = mixer("soft")
    with torch.no_grad():
        for _, layer in adapted.adapter_layers():
            layer.router["default"].weight.normal_(std=0.5)
    state = adapted.shared_adapter_weights["default"].routing
    soft = logits(adapted, batch)
    state.routing, state.top_k = "topk", 3
    torch.testing.assert_close(logits(adapted, batch), soft, atol=1e-6, rtol=0)
    state.top_k = 1
    assert not torch.allclose(logits(adapted, batch), soft, atol=1e-4)


def test_generate_with_cache_equals_generate_without():
    adapted = mixer("topk", top_k=2)
    with torch.no_grad():
        for _, layer in adapted.adapter_layers():
            layer.router["default"].weight.normal_(std=0.5)
    prompt = inputs("llama", seq=5)["input_ids"]
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = adapted.generate(prompt, use_cache=True, **kwargs)
        uncached = adapted.generate(prompt, use_cache=False, **kwargs)
        hard = adapted.generate(prompt, task_ids=torch.tensor([0, 1]), **kwargs)
    assert torch.equal(cached, uncached)
    assert hard.shape == cached.shape


def _peft_folder(tmp_path, name, r, targets, seed, hidden=64, layers=2):
    import transformers as tf

    torch.manual_seed(seed)
    if hidden == 64 and layers == 2:
        model = build("llama")
    else:
        model = tf.LlamaForCausalLM(
            tf.LlamaConfig(
                hidden_size=hidden,
                intermediate_size=2 * hidden,
                num_hidden_layers=layers,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=1000,
            )
        )
    torch.manual_seed(seed)
    pm = peft.get_peft_model(
        model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
    )
    pm.save_pretrained(tmp_path / name)
    return tmp_path / name, pm


def test_experts_from_real_peft_folders_reproduce_each_adapter(tmp_path):
    batch = inputs("llama")
    specs = [("math", 2, ["q_proj", "v_proj"]), ("code", 8, ["q_proj", "o_proj"]), ("chat", 4, ["k_proj"])]
    folders, expected = [], []
    for i, (name, r, targets) in enumerate(specs):
        folder, pm = _peft_folder(tmp_path, name, r, targets, seed=10 + i)
        folders.append(folder)
        expected.append(logits(pm, batch))
    config = LoraMixerConfig.from_peft_adapters(folders)
    assert config.expert_names() == ["math", "code", "chat"]
    adapted = adapt(build("llama"), config)
    assert {t.rsplit(".", 1)[-1] for t in adapted.adapter_targets["default"]} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
    }
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all(".router." in n for n in trainable)  # plug-and-play: only routers train
    for e in range(3):
        with torch.no_grad():
            got = adapted(**batch, task_ids=torch.tensor([e, e])).logits
        torch.testing.assert_close(got, expected[e], atol=1e-5, rtol=0)


def test_a_saved_plugged_mixer_loads_after_its_peft_folders_are_gone(tmp_path):
    import shutil

    batch = inputs("llama")
    folders = [
        _peft_folder(tmp_path, name, r, targets, seed=20 + i)[0]
        for i, (name, r, targets) in enumerate([("a", 2, ["q_proj", "v_proj"]), ("b", 4, ["q_proj"])])
    ]
    torch.manual_seed(0)
    plugged = adapt(build("llama"), LoraMixerConfig.from_peft_adapters(folders))
    expected = logits(plugged, batch)
    plugged.save_pretrained(tmp_path / "mixer")
    for folder in folders:
        shutil.rmtree(folder)
    loaded = AdaptedModel.from_pretrained(build("llama"), tmp_path / "mixer")
    torch.testing.assert_close(logits(loaded, batch), expected, atol=0, rtol=0)
    with pytest.raises(ConfigError, match=r"PEFT folder .* is missing"):  # plugging anew needs the folder
        adapt(build("llama"), loaded.adapter_configs["default"])


def test_plugging_a_peft_folder_again_after_it_changed_uses_the_new_files(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    batch = inputs("llama")
    folder, _ = _peft_folder(tmp_path, "e", 2, ["q_proj"], seed=1)

    def plugged_and_peft():
        adapted = adapt(build("llama"), LoraMixerConfig.from_peft_adapters([folder]))
        reference = peft.PeftModel.from_pretrained(build("llama"), folder)
        with torch.no_grad():
            return adapted(**batch, task_ids=torch.tensor([0, 0])).logits, logits(reference, batch)

    first, expected = plugged_and_peft()
    torch.testing.assert_close(first, expected, atol=1e-5, rtol=0)
    # only the config changes (alpha 4 -> 12), the weights file stays as it was
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["lora_alpha"] = 12
    config_file.write_text(json.dumps(config))
    second, expected = plugged_and_peft()
    assert not torch.allclose(second, first, atol=1e-3)
    torch.testing.assert_close(second, expected, atol=1e-5, rtol=0)
    # the weights are rewritten in the same file with the same size: B negated
    weights = folder / "adapter_model.safetensors"
    tensors = {k: -v if "lora_B" in k else v for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights))
    third, expected = plugged_and_peft()
    assert not torch.allclose(third, second, atol=1e-3)
    torch.testing.assert_close(third, expected, atol=1e-5, rtol=0)


def test_peft_expert_for_another_model_size_is_refused(tmp_path):
    good, _ = _peft_folder(tmp_path, "good", 2, ["q_proj"], seed=1)
    bad, _ = _peft_folder(tmp_path, "bad", 2, ["q_proj"], seed=2, hidden=128)
    model = build("llama")
    with pytest.raises(ConfigError, match=r"expert 'bad'.*trained for a different model"):
        adapt(model, LoraMixerConfig.from_peft_adapters([good, bad]))
    assert not any(isinstance(m, LoRAMixerLinear) for m in model.modules())


@pytest.mark.parametrize(
    ("factor", "shapes"), [("lora_A", r"A \(2, 32\), B \(64, 2\)"), ("lora_B", r"A \(2, 64\), B \(32, 2\)")]
)
def test_peft_expert_with_one_factor_of_the_wrong_width_is_refused(tmp_path, factor, shapes):
    from safetensors.torch import save_file

    folder, _ = _peft_folder(tmp_path, "e", 2, ["q_proj"], seed=1)
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    for key in tensors:  # A (r, in) loses half its inputs, or B (out, r) half its outputs
        if factor in key:
            tensors[key] = (tensors[key][:, :32] if factor == "lora_A" else tensors[key][:32]).contiguous()
    save_file(tensors, str(weights))
    model = build("llama")
    with pytest.raises(
        ConfigError, match=rf"expert 'e'.*has LoRA shapes {shapes} at .*q_proj, which is a 64 -> 64"
    ):
        adapt(model, LoraMixerConfig.from_peft_adapters([folder]))
    assert not any(isinstance(m, LoRAMixerLinear) for m in model.modules())


def test_peft_expert_from_a_deeper_model_or_outside_the_targets_is_refused(tmp_path):
    good, _ = _peft_folder(tmp_path, "good", 2, ["q_proj"], seed=1)
    deeper, _ = _peft_folder(tmp_path, "deeper", 2, ["q_proj"], seed=2, layers=4)
    model = build("llama")
    with pytest.raises(ConfigError, match=r"expert 'deeper'.*2 module\(s\).*dropped"):
        adapt(model, LoraMixerConfig.from_peft_adapters([good, deeper]))
    wide, _ = _peft_folder(tmp_path, "wide", 2, ["q_proj", "v_proj"], seed=3)
    with pytest.raises(ConfigError, match="target_modules must include them"):
        adapt(model, LoraMixerConfig.from_peft_adapters([good, wide], target_modules=["q_proj"]))
    assert not any(isinstance(m, LoRAMixerLinear) for m in model.modules())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("nan", r"NaN or inf values; the adapter is corrupt\."),
        ("int", r"non-float values; the adapter is corrupt\."),
        (
            "alpha",
            r"adapter_config\.json: lora_alpha must be a finite number within float32's range, got inf\.",
        ),
        ("huge alpha", r"lora_alpha must be a finite number within float32's range, got 1e\+39\."),
        ("rslora", r"adapter_config\.json: use_rslora must be true or false\."),
        ("r", r"adapter_config\.json: r must be a positive integer, got 0\."),
        (
            "only A",
            r"e: module model\.layers\.0\.self_attn\.q_proj has lora_A but not both\.",
        ),
        (
            "only B",
            r"e: module model\.layers\.0\.self_attn\.q_proj has lora_B but not both\.",
        ),
        (
            "A/B rank",
            r"rank mismatch at .*layers\.0\.self_attn\.q_proj: lora_A has rank 1 but lora_B has 2\.",
        ),
        ("config rank", r"adapter_config\.json says r=3, the tensors have rank 2\. The folder mixes files"),
        ("no tensors", r"adapter_model\.safetensors holds no LoRA tensors\."),
        ("foreign tensor", r"tensor 'unrelated' is not a LoRA A/B weight of a linear layer; factorlab reads"),
    ],
)
def test_corrupt_peft_expert_is_refused(tmp_path, edit, message):
    import json

    from safetensors.torch import load_file, save_file

    folder, _ = _peft_folder(tmp_path, "e", 2, ["q_proj"], seed=1)
    weights = folder / "adapter_model.safetensors"
    config_file = folder / "adapter_config.json"
    tensors = load_file(str(weights))
    key = sorted(tensors)[0]
    config = json.loads(config_file.read_text())
    if edit == "nan":
        tensors[key][0, 0] = float("nan")
    elif edit == "int":
        tensors[key] = tensors[key].to(torch.int32)
    elif edit == "alpha":
        config["lora_alpha"] = float("inf")
    elif edit == "huge alpha":
        config["lora_alpha"] = 1e39
    elif edit == "rslora":
        config["use_rslora"] = "false"
    elif edit == "r":
        config["r"] = 0
    elif edit == "config rank":
        config["r"] = 3
    elif edit == "no tensors":
        tensors = {}
    elif edit == "foreign tensor":
        tensors["unrelated"] = torch.zeros(1)
    else:  # drop or cut one factor of layer 0's q_proj
        layer0 = "base_model.model.model.layers.0.self_attn.q_proj"
        if edit == "only A":
            del tensors[f"{layer0}.lora_B.weight"]
        elif edit == "only B":
            del tensors[f"{layer0}.lora_A.weight"]
        else:
            tensors[f"{layer0}.lora_A.weight"] = tensors[f"{layer0}.lora_A.weight"][:1].contiguous()
    save_file(tensors, str(weights))
    config_file.write_text(json.dumps(config))
    with pytest.raises(AdapterLoadError, match=message):
        adapt(build("llama"), LoraMixerConfig.from_peft_adapters([folder]))


def test_non_lora_peft_folder_is_refused(tmp_path):
    ia3 = peft.get_peft_model(
        build("llama"),
        peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    )
    ia3.save_pretrained(tmp_path / "ia3")
    with pytest.raises(AdapterLoadError, match="PEFT IA3 adapter"):
        LoraMixerConfig.from_peft_adapters([tmp_path / "ia3"])


def test_empty_task_ids_are_a_clean_error():
    adapted = mixer("hard")
    with pytest.raises(ConfigError, match="task_ids has 0 entries"):
        adapted(**inputs("llama"), task_ids=torch.tensor([], dtype=torch.long))


def test_task_id_errors():
    batch = inputs("llama")
    adapted = mixer("hard")
    with pytest.raises(ConfigError, match=r"task id 3 is outside 0\.\.2"):
        adapted(**batch, task_ids=torch.tensor([0, 3]))
    with pytest.raises(
        ConfigError,
        match=r"^routing='hard' needs task ids: pass task_ids=LongTensor\[batch\] to forward / generate\.$",
    ):
        adapted(**batch)
    lora = adapt(build("llama"), LoraConfig())
    with pytest.raises(ConfigError, match="only applies to an active lora_mixer"):
        lora(**batch, task_ids=torch.tensor([0, 0]))


def test_save_load_is_bit_exact_for_every_router_granularity(tmp_path):
    batch = inputs("llama")
    for granularity in ("projection", "layer", "shared"):
        adapted = mixer("topk", top_k=2, router_granularity=granularity)
        with torch.no_grad():
            for p in adapted.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
        expected = logits(adapted, batch)
        adapted.save_pretrained(tmp_path / granularity)
        restored = AdaptedModel.from_pretrained(build("llama"), tmp_path / granularity, is_trainable=True)
        assert torch.equal(logits(restored, batch), expected), granularity
    shared = adapted.shared_adapter_weights["default"].routers
    assert list(shared) == ["all"]


def test_shared_router_needs_equal_input_widths():
    with pytest.raises(ConfigError, match="different input widths"):
        adapt(build("mamba"), LoraMixerConfig(num_experts=2, router_granularity="shared"))
    adapted = adapt(build("mamba"), LoraMixerConfig(num_experts=2))  # in_proj and out_proj, own routers
    assert {t.rsplit(".", 1)[-1] for t in adapted.adapter_targets["default"]} == {"in_proj", "out_proj"}
    assert logits(adapted, inputs("mamba")).shape == (2, 12, 1000)


def test_stages_choose_what_trains():
    adapted = mixer("soft")
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert any(".experts." in n for n in trainable) and any(".router." in n for n in trainable)
    for stage, kinds in (("experts", {"experts"}), ("router", {"router"}), ("all", {"experts", "router"})):
        set_stage(adapted, stage)
        trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
        assert {
            "experts" if ".experts." in n else "router" if ".router." in n else n for n in trainable
        } == kinds
    set_stage(adapted, "all")  # theta_0 taken now
    adapted.train()
    batch = inputs("llama")
    shared = adapted.shared_adapter_weights["default"]
    shared.coefs = (0.0, 0.0, 1.0, 0.0, 0.0)  # preservation only
    adapted(**batch)
    assert float(adapted.last_aux_loss) == 0.0  # no drift yet
    with torch.no_grad():
        for _, layer in adapted.adapter_layers():
            layer.experts["default"].A.add_(0.1)
    adapted(**batch)
    drifted = sum(layer.experts["default"].A.numel() for _, layer in adapted.adapter_layers())
    # the penalty counts the drift: sum ||A - A_0||^2 = 0.1^2 per entry moved
    assert float(adapted.last_aux_loss) == pytest.approx(0.01 * drifted, rel=1e-4)


def test_routing_loss_terms():
    E = 4
    uniform = torch.full((10, E), 1 / E)
    state = RoutingState(E, "soft")
    state.records = [(uniform, uniform, 10)]
    # balance: sum_i pbar_i fbar_i = sum_i (1/E) * fbar_i = 1/E; entropy = log E
    torch.testing.assert_close(routing_aux_loss(state, 1.0, 0.0), torch.tensor(1 / E))
    torch.testing.assert_close(
        routing_aux_loss(state, 0.0, 1.0), torch.tensor(float(torch.log(torch.tensor(4.0))))
    )
    confident = torch.full((10, E), 1e-6)
    confident[:, 0] = 1 - 3e-6
    state.records = [(confident, confident, 10)]
    assert routing_aux_loss(state, 0.0, 1.0) < 0.01  # confident routing: low specialization loss
    assert routing_aux_loss(state, 1.0, 0.0) > 0.9  # but all tokens on one expert: high balance loss


def test_routing_inspection_reports_per_sample_weights():
    adapted = mixer("soft")
    weights = routing_weights_per_sample(adapted, inputs("llama"))
    assert weights.shape == (2, 3)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2))
    assert isinstance(next(m for _, m in adapted.adapter_layers()), LoRAMixerLinear)
    assert not isinstance(next(m for _, m in adapted.adapter_layers()), LoRALinear)


def test_per_sample_routing_weights_skip_padding():
    """A right-padded sample's weights equal its weights run alone, whatever the padding holds."""
    adapted = mixer("soft")
    torch.manual_seed(0)
    short, long = torch.randint(1, 100, (1, 5)), torch.randint(1, 100, (1, 9))
    alone = routing_weights_per_sample(adapted, {"input_ids": short})
    for pad in (0, 7):
        ids = torch.cat([torch.cat([short, torch.full((1, 4), pad)], 1), long])
        mask = torch.tensor([[1] * 5 + [0] * 4, [1] * 9])
        padded = routing_weights_per_sample(adapted, {"input_ids": ids, "attention_mask": mask})
        torch.testing.assert_close(padded[0], alone[0], rtol=1e-5, atol=1e-6)
    unmasked = routing_weights_per_sample(adapted, {"input_ids": ids})
    assert not torch.allclose(unmasked[0], alone[0], rtol=1e-5, atol=1e-6)  # the padding did count


def test_paper_defaults_top3_inference_and_a_preservation_penalty_in_stage_2():
    from factorlab.methods.lora_mixer.config import PRESERVATION_COEF
    from factorlab.mixer.config import MixerExperimentConfig

    assert LoraMixerConfig(num_experts=4).top_k == 3  # the paper's K = 3
    assert LoraMixerConfig(num_experts=2).top_k == 2  # all experts when there are fewer
    assert LoraMixerConfig(num_experts=4, top_k=1).top_k == 1
    assert LoraMixerConfig().preservation_coef == PRESERVATION_COEF > 0
    cfg = MixerExperimentConfig()
    assert cfg.mixer_config().top_k == 3 and cfg.mixer_config().preservation_coef == PRESERVATION_COEF


@pytest.mark.parametrize(
    ("arch", "projections"),
    [("llama", {"q_proj", "k_proj", "v_proj", "o_proj"}), ("mamba", {"in_proj", "out_proj"})],
)
def test_default_targets_are_the_papers_projections_in_every_layer(arch, projections):
    """Attention q, k, v, o (Mamba: in_proj, out_proj), in every block and nowhere else."""
    model = build(arch)
    layers = model.config.num_hidden_layers
    adapted = adapt(model, LoraMixerConfig(num_experts=2, r=2))
    names = [name for name, layer in adapted.adapter_layers() if isinstance(layer, LoRAMixerLinear)]
    assert {n.rsplit(".", 1)[-1] for n in names} == projections
    assert len(names) == layers * len(projections)


def test_set_routing_checks_and_keeps_what_it_is_not_given():
    from factorlab.methods.lora_mixer import set_routing

    adapted = mixer("soft")
    state = adapted.shared_adapter_weights["default"].routing
    set_routing(adapted, "topk", top_k=3, temperature=0.5)  # k = E is allowed
    assert (state.routing, state.top_k, state.temperature) == ("topk", 3, 0.5)
    set_routing(adapted, "soft")  # top_k and temperature stay as they were
    assert (state.routing, state.top_k, state.temperature) == ("soft", 3, 0.5)
    for bad, message in [
        ({"routing": "sparse"}, r"routing must be one of .*, got 'sparse'\."),
        ({"routing": "topk", "top_k": 4}, r"top_k must be an integer in 1\.\.3, got 4\."),
        ({"routing": "topk", "top_k": 0}, r"top_k must be an integer in 1\.\.3, got 0\."),
        ({"routing": "soft", "temperature": 0.0}, r"temperature must be a finite number > 0, got 0\.0\."),
        (
            {"routing": "soft", "temperature": float("inf")},
            r"temperature must be a finite number > 0, got inf\.",
        ),
        ({"routing": "soft", "temperature": "1"}, r"temperature must be a finite number > 0, got '1'\."),
    ]:
        with pytest.raises(ConfigError, match=message):
            set_routing(adapted, **bad)
    assert (state.routing, state.top_k, state.temperature) == (
        "soft",
        3,
        0.5,
    )  # a refused call changes nothing
    lora = adapt(build("llama"), LoraConfig(r=2, target_modules=TARGETS))
    with pytest.raises(
        ConfigError, match=r"adapter 'default' is not a LoRA-Mixer adapter; .* adapters: \[\]\.$"
    ):
        set_routing(lora, "soft")
    with pytest.raises(ConfigError, match=r"adapter 'default' is not a LoRA-Mixer adapter"):
        set_stage(lora, "router")


def test_set_stage_all_trains_experts_and_routers_and_snapshots_theta_0():
    adapted = mixer("soft")
    set_stage(adapted, "all")
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert any(".A" in n or "experts" in n for n in trainable) and any("router" in n for n in trainable)
    layer = next(m for _, m in adapted.adapter_layers())
    assert layer.trainable_parts["default"] == {"experts", "router"}
    bank = layer.experts["default"]
    assert float(bank.preservation()) == 0.0  # theta_0 is the weights at set_stage("all")
    with torch.no_grad():
        bank.A.add_(1.0)
    assert float(bank.preservation()) > 0
    with pytest.raises(ConfigError, match=r"stage must be one of .*, got 'both'\."):
        set_stage(adapted, "both")


def test_gpt2_conv1d_hard_routing_equals_the_expert_alone():
    """GPT-2's Conv1D stores weights (in, out): the mixer must read them transposed, as LoRA does."""
    torch.manual_seed(0)
    config = LoraMixerConfig(
        num_experts=2, r=2, lora_alpha=4, target_modules=["c_attn"], init_lora_weights=False
    )
    adapted = adapt(build("gpt2"), config)
    lora = adapt(build("gpt2"), LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"]))
    with torch.no_grad():
        for name, layer in lora.adapter_layers():
            bank = adapted.get_base_model().get_submodule(name).experts["default"]
            layer.lora_A["default"].weight.copy_(bank.A[1])
            layer.lora_B["default"].weight.copy_(bank.B[1])
    batch = inputs("gpt2")
    with torch.no_grad():
        got = adapted(**batch, task_ids=torch.tensor([1, 1])).logits
    torch.testing.assert_close(got, logits(lora, batch), atol=1e-5, rtol=0)


def test_an_expert_outside_its_own_targets_adds_nothing_there_and_rslora_scales_by_sqrt_r():
    torch.manual_seed(0)
    config = LoraMixerConfig(
        experts=[
            {"name": "q_only", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]},
            {"name": "both", "r": 4, "lora_alpha": 4, "use_rslora": True},
        ],
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
    )
    adapted = adapt(build("llama"), config)
    v_proj = next(m for n, m in adapted.adapter_layers() if n.endswith("v_proj"))
    q_proj = next(m for n, m in adapted.adapter_layers() if n.endswith("q_proj"))
    v_bank, q_bank = v_proj.experts["default"], q_proj.experts["default"]
    assert v_bank.rank_mask[0].sum() == 0 and v_bank.scaling[0] == 0.0  # q_only has no LoRA on v_proj
    assert q_bank.rank_mask[0].sum() == 2 and q_bank.scaling[0] == 2.0  # alpha / r
    assert v_bank.scaling[1] == pytest.approx(4 / 2.0)  # rsLoRA: alpha / sqrt(4)
    x = torch.randn(2, 5, v_proj.in_features)
    state = adapted.shared_adapter_weights["default"].routing
    state.task_ids = torch.tensor([0, 0])
    try:
        with torch.no_grad():
            torch.testing.assert_close(v_proj(x), v_proj.base_layer(x), atol=0, rtol=0)
            assert not torch.allclose(q_proj(x), q_proj.base_layer(x))
    finally:
        state.task_ids = None


@pytest.mark.parametrize("granularity", ["layer", "shared"])
def test_routers_take_the_model_dtype(granularity):
    model = build("llama").double()
    adapted = adapt(
        model, LoraMixerConfig(num_experts=2, target_modules=TARGETS, router_granularity=granularity)
    )
    routers = [p for n, p in adapted.named_parameters() if "router" in n]
    assert routers and all(p.dtype == torch.float64 for p in routers)
    assert logits(adapted, inputs("llama")).dtype == torch.float64


def test_the_configured_temperature_sharpens_routing():
    batch = inputs("llama")
    sharp, plain = mixer("soft", temperature=0.25), mixer("soft")  # same seed: same routers and experts
    assert sharp.shared_adapter_weights["default"].routing.temperature == 0.25
    with torch.no_grad():
        peaked = routing_weights_per_sample(sharp, batch).max(-1).values
        flat = routing_weights_per_sample(plain, batch).max(-1).values
    assert bool((peaked > flat).all())


@pytest.mark.parametrize("granularity", ["layer", "shared"])
def test_stages_choose_what_trains_with_routers_shared_between_projections(granularity):
    adapted = mixer("soft", router_granularity=granularity)
    for stage, kinds in (("experts", {"experts"}), ("router", {"router"}), ("all", {"experts", "router"})):
        set_stage(adapted, stage)
        trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
        found = {"experts" if ".experts." in n else "router" if "routers" in n else n for n in trainable}
        assert found == kinds, stage


@pytest.mark.parametrize(
    ("keyword", "value", "message"),
    [
        (
            "task_ids",
            torch.tensor([0.0, 1.0]),
            r"task_ids must be a 1-D integer tensor .* torch\.float32 of shape \(2,\)",
        ),
        ("task_ids", torch.tensor([[0], [1]]), r"task_ids must be a 1-D integer tensor .* of shape \(2, 1\)"),
        ("task_labels", torch.tensor([0.5, 1.0]), r"task_labels must be a 1-D integer tensor"),
        ("task_labels", torch.tensor([0, 3]), r"task id 3 is outside 0\.\.2 \(task_labels\)"),
    ],
)
def test_bad_task_ids_and_labels_are_refused_by_name(keyword, value, message):
    adapted = mixer("soft")
    with pytest.raises(ConfigError, match=message):
        adapted(**inputs("llama"), **{keyword: value})


def test_preservation_penalty_counts_drift_of_a_and_b_and_theta_0_is_never_saved(tmp_path):
    adapted = mixer("soft")
    set_stage(adapted, "all")  # theta_0 = the weights now
    banks = [layer.experts["default"] for _, layer in adapted.adapter_layers()]
    with torch.no_grad():
        banks[0].A[0, 0, 0] += 0.5
        banks[1].B[1, 2, 1] -= 0.25
    assert float(sum(bank.preservation() for bank in banks)) == pytest.approx(0.5**2 + 0.25**2, rel=1e-5)
    assert not any(key.endswith(("A0", "B0")) for key in adapted.state_dict())
    adapted.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and not any(key.endswith(("A0", "B0")) for key in saved)


def test_routers_start_near_uniform_with_the_symmetry_broken():
    from factorlab.layers.mixer import init_router

    router = torch.nn.Linear(512, 64)
    init_router(router)
    assert torch.count_nonzero(router.bias) == 0
    assert router.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_a_deleted_mixer_adapter_leaves_nothing_behind_and_its_name_can_be_reused():
    batch = inputs("llama")
    adapted = mixer("soft")
    adapted.add_adapter(
        "other",
        LoraMixerConfig(
            num_experts=2, r=2, target_modules=TARGETS, routing="hard", router_granularity="layer"
        ),
    )
    assert all("other" in layer._shared_routers for _, layer in adapted.adapter_layers())
    adapted.delete_adapter("other")
    for _, layer in adapted.adapter_layers():
        assert "other" not in layer._routing and "other" not in layer.trainable_parts
        assert "other" not in layer._shared_routers
        assert (
            "other" not in layer.experts
            and "other" not in layer.router
            and layer.adapter_names == ["default"]
        )
    assert not any("other" in key for key in adapted.state_dict())
    adapted.add_adapter(
        "other",
        LoraMixerConfig(num_experts=3, r=2, target_modules=TARGETS, routing="soft", init_lora_weights=False),
    )
    adapted.set_adapter("other")
    layer = next(m for _, m in adapted.adapter_layers())
    assert layer._routing["other"] is adapted.shared_adapter_weights["other"].routing
    assert layer._routing["other"].routing == "soft" and layer.experts["other"].num_experts == 3
    assert logits(adapted, batch).isfinite().all()
    adapted.delete_adapter("other")  # this one has per-token routers, no shared ones
    adapted.set_adapter("default")
    assert torch.equal(logits(adapted, batch), logits(mixer("soft"), batch))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_an_exported_expert_is_that_expert_in_peft_and_plugs_back_exactly(tmp_path, use_rslora):
    from factorlab.methods.lora_mixer.model import export_expert_as_peft

    batch = inputs("llama")
    experts = [{"name": "a", "r": 2, "lora_alpha": 6.0}, {"name": "b", "r": 4, "lora_alpha": 4.0}]
    experts = [{**e, "use_rslora": use_rslora} for e in experts]
    torch.manual_seed(0)
    config = LoraMixerConfig(experts=experts, target_modules=TARGETS, routing="soft", init_lora_weights=False)
    adapted = adapt(build("llama"), config)
    for e in range(2):
        with torch.no_grad():
            routed_alone = adapted(**batch, task_ids=torch.tensor([e, e])).logits
        export_expert_as_peft(adapted, e, tmp_path / str(e))
        in_peft = peft.PeftModel.from_pretrained(build("llama"), tmp_path / str(e))
        torch.testing.assert_close(logits(in_peft, batch), routed_alone, atol=1e-5, rtol=0)
        bank = adapted.base_model.model.model.layers[0].self_attn.q_proj.experts["default"]
        saved = load_file(tmp_path / str(e) / "adapter_model.safetensors")
        r = experts[e]["r"]
        assert torch.equal(
            saved["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"], bank.A[e, :r]
        )
        assert torch.equal(
            saved["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"], bank.B[e, :, :r]
        )
    plugged = adapt(build("llama"), LoraMixerConfig.from_peft_adapters([tmp_path / "0", tmp_path / "1"]))
    for e in range(2):
        with torch.no_grad():
            again = plugged(**batch, task_ids=torch.tensor([e, e])).logits
            alone = adapted(**batch, task_ids=torch.tensor([e, e])).logits
        torch.testing.assert_close(again, alone, atol=1e-6, rtol=0)


def test_exporting_a_plugged_expert_gives_back_its_peft_file(tmp_path):
    """An expert that adapts only some projections (rank 1, q_proj only, beside one on q and v) exports
    exactly the tensors it was plugged from; a wrong expert index or adapter name is a clean error."""
    from factorlab.methods.lora_mixer.model import export_expert_as_peft

    narrow, _ = _peft_folder(tmp_path, "narrow", 1, ["q_proj"], seed=1)
    wide, _ = _peft_folder(tmp_path, "wide", 2, ["q_proj", "v_proj"], seed=2)
    config = LoraMixerConfig.from_peft_adapters([wide, narrow], target_modules=["q_proj", "v_proj"])
    adapted = adapt(build("llama"), config)
    for index, folder in enumerate([wide, narrow]):
        export_expert_as_peft(adapted, index, tmp_path / f"out{index}")
        original = load_file(folder / "adapter_model.safetensors")
        exported = load_file(tmp_path / f"out{index}" / "adapter_model.safetensors")
        assert sorted(exported) == sorted(original)
        assert all(torch.equal(exported[key], original[key]) for key in original), folder.name
    for bad in (2, -1, 1.0, True):
        with pytest.raises(ConfigError, match=r"expert must be an index in 0\.\.1 \(the adapter's experts: "):
            export_expert_as_peft(adapted, bad, tmp_path / "none")
    with pytest.raises(
        ConfigError,
        match=r"adapter 'other' is not a LoRA-Mixer adapter; this model's mixer adapters: \['default'\]\.$",
    ):
        export_expert_as_peft(adapted, 0, tmp_path / "none", adapter_name="other")
    assert not (tmp_path / "none").exists()


def test_set_stage_acts_on_the_named_adapter_only():
    adapted = mixer("soft")
    adapted.add_adapter("second", LoraMixerConfig(num_experts=2, r=2, target_modules=TARGETS))
    set_stage(adapted, "router", "second")  # "default" stays active and keeps its stage
    layers = [m for _, m in adapted.adapter_layers() if isinstance(m, LoRAMixerLinear)]
    assert all(m.trainable_parts["second"] == {"router"} for m in layers)
    assert all(m.trainable_parts["default"] != {"router"} for m in layers)
    assert adapted.shared_adapter_weights["second"].train_router
    before = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert before and all(".default" in n or "default." in n for n in before)
    with pytest.raises(ConfigError, match=r"adapter 'nope' is not a LoRA-Mixer adapter"):
        set_stage(adapted, "experts", "nope")


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_experts_with_rank_and_alpha_patterns_are_reproduced_and_export_back(tmp_path, use_rslora):
    """PEFT folders whose rank and alpha differ per module (rank_pattern, alpha_pattern) plug in as
    those experts (each routed alone gives PEFT's logits), and an exported expert loads in PEFT with
    the same per-module ranks and scalings."""
    from factorlab.methods.lora_mixer.model import export_expert_as_peft

    batch = inputs("llama")
    patterns = [
        {"rank_pattern": {"v_proj": 4}, "alpha_pattern": {"q_proj": 3}},
        {"rank_pattern": {"layers.1.self_attn.q_proj": 1}, "alpha_pattern": {"layers.0.self_attn.v_proj": 7}},
    ]
    folders, expected = [], []
    for i, pattern in enumerate(patterns):
        torch.manual_seed(30 + i)
        config = peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_rslora=use_rslora,
            init_lora_weights=False, **pattern,
        )  # fmt: skip
        pm = peft.get_peft_model(build("llama"), config)
        pm.save_pretrained(tmp_path / f"e{i}")
        folders.append(tmp_path / f"e{i}")
        expected.append(logits(pm, batch))
    assert not torch.allclose(expected[0], expected[1], atol=1e-3)
    adapted = adapt(build("llama"), LoraMixerConfig.from_peft_adapters(folders))
    for e in range(2):
        with torch.no_grad():
            got = adapted(**batch, task_ids=torch.tensor([e, e])).logits
        torch.testing.assert_close(got, expected[e], atol=1e-5, rtol=0)
        export_expert_as_peft(adapted, e, tmp_path / f"out{e}")
        back = peft.PeftModel.from_pretrained(build("llama"), tmp_path / f"out{e}")
        torch.testing.assert_close(logits(back, batch), expected[e], atol=1e-5, rtol=0)


def test_hard_routing_runs_only_the_samples_expert_and_equals_the_one_hot_mixture():
    """The hard path (lora_per_row, shared with packed grid cells) against the dense formula with
    one-hot weights: outputs and every gradient, float64, experts of ranks 3, 1 and 0 (padded)."""
    from factorlab.layers.mixer import ExpertBank

    torch.manual_seed(0)
    bank = ExpertBank(6, 5, ranks=[3, 1, 0], scalings=[2.0, 0.5, 1.0], dtype=torch.float64)
    with torch.no_grad():
        bank.B.normal_()
    x = torch.randn(4, 7, 6, dtype=torch.float64, requires_grad=True)
    task_ids = torch.tensor([1, 0, 2, 0])
    hard = bank.per_sample(x, task_ids)
    grads_hard = torch.autograd.grad(hard.square().sum(), (x, bank.A, bank.B))
    weights = torch.nn.functional.one_hot(task_ids, 3).double().repeat_interleave(7, dim=0)
    dense = bank(x.reshape(-1, 6), weights).view(4, 7, 5)
    grads_dense = torch.autograd.grad(dense.square().sum(), (x, bank.A, bank.B))
    torch.testing.assert_close(hard, dense, atol=1e-12, rtol=0)
    for got, want in zip(grads_hard, grads_dense):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert hard[2].abs().max() == 0  # the rank-0 expert adds nothing
    assert grads_hard[1][1, 1:].abs().max() == 0 and grads_hard[2][1, :, 1:].abs().max() == 0  # padding
    assert grads_hard[1][2].abs().max() == 0 and grads_hard[1][1, 0].abs().max() > 0
