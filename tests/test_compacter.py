import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from factorlab import (
    AdaptedModel,
    CompacterConfig,
    CompacterPlusPlusConfig,
    ConfigError,
    FactorlabError,
    PHMAdapterConfig,
    adapt,
    count_parameters,
)
from factorlab.layers import BottleneckAdapterLayer, ModulesToSave, PHMFastWeights, PHMLinear, PHMRule
from tiny_models import build, inputs, logits

TINY = {"reduction_factor": 8}  # tiny models have hidden size 64: bottleneck 8, divisible by phm_dim 4


def reference(layer: PHMLinear, x: torch.Tensor) -> torch.Tensor:
    """The definition: W = sum_i kron(A_i, B_i), materialised, then y = x W^T + b."""
    a, b = layer.rule(), layer.fast.matrices()
    w = sum(torch.kron(a[i], b[i]) for i in range(layer.phm_dim))
    y = x @ w.T
    return y + layer.bias if layer.bias is not None else y


@settings(max_examples=40, deadline=None)
@given(
    n=st.sampled_from([1, 2, 3, 4]),
    in_mult=st.integers(1, 5),
    out_mult=st.integers(1, 5),
    rank=st.sampled_from([1, 2, 3, None]),
    bias=st.booleans(),
    shared_rule=st.booleans(),
    factorized_rule=st.booleans(),
    shared_fast=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_phm_forward_and_gradients_equal_the_kronecker_reference(
    n, in_mult, out_mult, rank, bias, shared_rule, factorized_rule, shared_fast, seed
):
    torch.manual_seed(seed)
    d_in, d_out = n * in_mult, n * out_mult
    rule = PHMRule(n, factorized_rule, init_range=1.0, dtype=torch.double) if shared_rule else None
    fast = PHMFastWeights(n, out_mult, in_mult, rank, dtype=torch.double) if shared_fast else None
    layer = PHMLinear(
        d_in,
        d_out,
        n,
        phm_rank=rank,
        bias=bias,
        rule=rule,
        fast=fast,
        rule_init_range=1.0,
        factorized_rule=factorized_rule,
        dtype=torch.double,
    )
    if layer.bias is not None:
        torch.nn.init.normal_(layer.bias)
    x = torch.randn(3, 4, d_in, dtype=torch.double, requires_grad=True)
    params = [x, *layer.rule.parameters(), *layer.fast.parameters(), *([layer.bias] if bias else [])]
    fast_y = layer(x)
    ref_y = reference(layer, x)
    torch.testing.assert_close(fast_y, ref_y, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(fast_y)
    fast_grads = torch.autograd.grad(fast_y, params, grad_out)
    ref_grads = torch.autograd.grad(ref_y, params, grad_out)
    for got, want in zip(fast_grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5", "bert"])
def test_fresh_compacter_starts_near_identity_and_training_lowers_the_loss(arch):
    torch.manual_seed(0)
    model = build(arch)
    batch = inputs(arch)
    base = logits(model, batch)
    adapted = adapt(model, CompacterConfig(train_layer_norms=True, **TINY))  # the paper's recipe
    fresh = logits(adapted, batch)
    assert not torch.equal(fresh, base)  # the adapters run...
    assert (fresh - base).abs().max() < 1e-4 * base.abs().max()  # ...and start near the identity map
    labels = batch["decoder_input_ids"] if arch == "t5" else batch["input_ids"]
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)
    adapted.train()
    losses = []
    for _ in range(40):
        loss = adapted(**batch, labels=labels).loss
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert min(losses[-5:]) < losses[0] - 0.3, losses


def test_t5_placement_and_one_shared_rule_for_encoder_and_decoder():
    adapted = adapt(build("t5"), CompacterConfig(**TINY))
    targets = adapted.adapter_targets["default"]
    assert sorted({t.rsplit(".", 2)[-2] + "." + t.rsplit(".", 1)[-1] for t in targets}) == [
        "DenseReluDense.wo",
        "SelfAttention.o",
    ]
    assert {t.split(".")[0] for t in targets} == {"encoder", "decoder"}
    assert not any("EncDecAttention" in t for t in targets)
    rule = adapted.shared_adapter_weights["default"]["phm_rule"]
    layers = [m for _, m in adapted.adapter_layers() if isinstance(m, BottleneckAdapterLayer)]
    assert len(layers) == 8
    for layer in layers:
        assert layer.adapter_down["default"].rule is rule and layer.adapter_up["default"].rule is rule
    pp = adapt(build("t5"), CompacterPlusPlusConfig(**TINY))
    assert all(t.endswith("DenseReluDense.wo") for t in pp.adapter_targets["default"])


def _t5_base_on_meta():
    import transformers as tf

    config = tf.T5Config(
        d_model=768,
        d_ff=3072,
        num_layers=12,
        num_decoder_layers=12,
        num_heads=12,
        d_kv=64,
        vocab_size=32128,
        feed_forward_proj="relu",
    )
    with torch.device("meta"):
        return tf.T5ForConditionalGeneration(config)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (CompacterConfig(train_layer_norms=True), 161_728),
        (CompacterPlusPlusConfig(train_layer_norms=True), 104_704),
        (PHMAdapterConfig(train_layer_norms=True), 398_976),
    ],
)
def test_trainable_counts_reproduce_the_paper_on_t5_base(config, expected, capsys):
    adapted = adapt(_t5_base_on_meta(), config)
    counts = count_parameters(adapted)
    assert counts["trainable"] == expected
    assert counts["trainable_by_kind"]["trained copies of whole modules (e.g. LayerNorms)"] == 62 * 768
    assert counts["base"] == 222_903_552
    adapted.print_trainable_parameters()
    assert f"trainable params: {expected:,d}" in capsys.readouterr().out


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_save_load_is_bit_exact_including_the_shared_rule_and_layer_norms(arch, tmp_path):
    torch.manual_seed(0)
    batch = inputs(arch)
    adapted = adapt(build(arch), CompacterConfig(train_layer_norms=True, **TINY))
    with torch.no_grad():  # make every adapter weight non-trivial, as after training
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    expected = logits(adapted, batch)
    adapted.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert torch.equal(
        tensors["factorlab_shared.phm_rule.A"], adapted.shared_adapter_weights["default"]["phm_rule"].A
    )
    norms = [n for n, m in adapted.adapter_layers() if type(m).__name__ == "ModulesToSave"]
    assert norms and all(f"base_model.model.{n}.weight" in tensors for n in norms)  # PEFT's key form
    restored = AdaptedModel.from_pretrained(build(arch), tmp_path, is_trainable=True)
    assert torch.equal(logits(restored, batch), expected)
    for key, value in adapted.adapter_state_dict("default").items():
        assert torch.equal(restored.adapter_state_dict("default")[key], value), key
    with restored.disable_adapters():  # the LayerNorm copies never touched the base weights
        assert torch.equal(logits(restored, batch), logits(build(arch), batch))


def test_learn_phm_false_really_freezes_the_rule(tmp_path):
    torch.manual_seed(0)
    batch = inputs("llama")
    adapted = adapt(build("llama"), CompacterConfig(learn_phm=False, **TINY))
    rule = adapted.shared_adapter_weights["default"]["phm_rule"]
    assert not list(rule.parameters())  # a buffer: no optimiser can see it
    before = rule.A.clone()
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = adapted(**batch, labels=batch["input_ids"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.equal(rule.A, before)
    adapted.save_pretrained(tmp_path)
    restored = AdaptedModel.from_pretrained(build("llama"), tmp_path, is_trainable=True)
    assert torch.equal(restored.shared_adapter_weights["default"]["phm_rule"].A, before)
    assert torch.equal(logits(restored, batch), logits(adapted, batch))


def layer_of(config):
    """The adapted tiny Llama and its first Compacter adapter's down and up PHM layers."""
    adapted = adapt(build("llama"), config)
    _name, layer = next((n, m) for n, m in adapted.adapter_layers() if isinstance(m, BottleneckAdapterLayer))
    return adapted, layer.adapter_down["default"], layer.adapter_up["default"]


def _shared_rule(adapted, down, up):
    assert down.fast.s.shape == (4, 2, 1) and down.fast.t.shape == (4, 16, 1)  # 64 -> 8, n = 4, rank 1
    assert down.bias is not None and down.rule is adapted.shared_adapter_weights["default"]["phm_rule"]
    assert down.rule.A.std().item() == pytest.approx(1e-4, rel=0.3)  # phm_init_range
    assert down.extra_repr() == "in_features=64, out_features=8, phm_dim=4, rank=1, shared=['rule']"


def _unshared_rule(adapted, down, up):
    # a layer's own rule: N(0, 0.01^2) as the original code and AdapterHub, whatever phm_init_range says
    assert down.rule is down.own_rule and down.rule.A.std().item() == pytest.approx(0.01, rel=0.3)
    assert up.rule is up.own_rule and up.rule is not down.rule
    assert down.extra_repr().endswith("shared=none")


def _shared_fast(adapted, down, up):
    shared = adapted.shared_adapter_weights["default"]
    assert down.fast is shared["W_down"] and up.fast is shared["W_up"]
    assert down.fast.s.shape == (4, 2, 1) and up.fast.s.shape == (4, 16, 1)  # rank 1, as unshared
    assert up.extra_repr().endswith("rank=1, shared=['rule', 'fast']")


def _shared_full_fast(adapted, down, up):
    _shared_fast_only(adapted, down, up)
    assert down.fast.B.shape == (4, 2, 16) and not down.fast.factorized  # factorized_phm_W=False holds


def _shared_fast_only(adapted, down, up):
    shared = adapted.shared_adapter_weights["default"]
    assert down.fast is shared["W_down"] and up.fast is shared["W_up"]


def _shared_normal_fast(adapted, down, up):
    _shared_fast_only(adapted, down, up)
    # the init options reach the shared weights too (the default, glorot-uniform, has std ~1.4 here)
    assert down.fast.t.std().item() == pytest.approx(0.01, rel=0.3)
    assert up.fast.s.std().item() == pytest.approx(0.01, rel=0.3)


def _glorot(adapted, down, up):
    bound = 2**0.5 * (6 / (16 + 1)) ** 0.5  # xavier-uniform, gain sqrt(2), t_i is 16 x 1
    assert down.fast.t.abs().max() <= bound and down.fast.t.abs().max() > bound / 3


def _rank_3(adapted, down, up):
    assert down.fast.s.shape == (4, 2, 3)


def _full_fast(adapted, down, up):
    assert down.fast.B.shape == (4, 2, 16) and not down.fast.factorized


def _factorized_rule(adapted, down, up):
    assert down.rule.A_left.shape == (4, 4, 1) and down.rule().shape == (4, 4, 4)


def _no_bias(adapted, down, up):
    assert down.bias is None and up.bias is None


def _uniform_rule(adapted, down, up):
    assert 0.3 < down.rule.A.abs().max() <= 0.5


def _normal_fast(adapted, down, up):
    assert down.fast.t.std().item() == pytest.approx(0.01, rel=0.3)


OPTIONS = {
    "defaults": ({}, _shared_rule),
    "phm_rank": ({"phm_rank": 3}, _rank_3),
    "full fast weights": ({"factorized_phm_W": False}, _full_fast),
    "unshared rule": ({"shared_phm_rule": False}, _unshared_rule),
    "shared fast weights": ({"shared_W_phm": True}, _shared_fast),
    "shared full fast weights": ({"shared_W_phm": True, "factorized_phm_W": False}, _shared_full_fast),
    "shared normal fast weights": (
        {"shared_W_phm": True, "hypercomplex_nonlinearity": "normal", "phm_init_range": 0.01},
        _shared_normal_fast,
    ),
    "factorized rule": ({"factorized_phm_rule": True}, _factorized_rule),
    "no bias": ({"phm_bias": False}, _no_bias),
    "uniform rule": ({"phm_c_init": "uniform", "phm_init_range": 0.5}, _uniform_rule),
    "normal fast weights": ({"hypercomplex_nonlinearity": "normal", "phm_init_range": 0.01}, _normal_fast),
    "glorot fast weights": ({"hypercomplex_nonlinearity": "glorot-uniform"}, _glorot),
}


@pytest.mark.parametrize("option", OPTIONS)
def test_every_option_does_what_it_says(option):
    kwargs, check = OPTIONS[option]
    check(*layer_of(CompacterConfig(**kwargs, **TINY)))


def test_the_non_linearity_is_the_one_asked_for():
    relu = logits(
        adapt(build("llama"), CompacterConfig(non_linearity="relu", phm_init_range=1.0, **TINY)),
        inputs("llama"),
    )
    ident = logits(
        adapt(build("llama"), CompacterConfig(non_linearity="identity", phm_init_range=1.0, **TINY)),
        inputs("llama"),
    )
    assert not torch.allclose(relu, ident)


@pytest.mark.parametrize(
    "config, phm_dim", [(CompacterConfig, 4), (CompacterPlusPlusConfig, 4), (PHMAdapterConfig, 12)]
)
def test_paper_recipe_is_the_papers_training_setup(config, phm_dim):
    recipe = config.paper_recipe()
    assert type(recipe) is config and recipe.phm_dim == phm_dim and recipe.reduction_factor == 32
    assert recipe.non_linearity == "gelu_new" and recipe.train_layer_norms
    defaults = config()
    assert (defaults.non_linearity, defaults.train_layer_norms) == ("gelu", False)  # AdapterHub's
    assert config.paper_recipe(reduction_factor=16).reduction_factor == 16
    with pytest.raises(ConfigError):
        config.paper_recipe(phm_dim=0)


def test_compacter_cannot_merge_but_unloads_cleanly():
    model = build("llama")
    adapted = adapt(model, CompacterConfig(train_layer_norms=True, **TINY))
    with pytest.raises(FactorlabError, match="cannot be merged"):
        adapted.merge_and_unload()
    plain = adapted.unload()
    assert not any(isinstance(m, (BottleneckAdapterLayer, ModulesToSave)) for m in plain.modules())
    assert torch.equal(logits(plain, inputs("llama")), logits(build("llama"), inputs("llama")))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            CompacterConfig(reduction_factor=32),
            r"phm_dim=4 does not divide bottleneck size=2.*Values that work: \[1, 2\]",
        ),
        (
            CompacterConfig(reduction_factor=8, phm_dim=3),
            r"phm_dim=3 does not divide hidden size=64, bottleneck size=8",
        ),
        (CompacterConfig(reduction_factor=128), r"reduction_factor=128 is larger than the hidden size 64"),
    ],
)
def test_size_errors_name_the_dimension_and_the_fix(config, message):
    model = build("llama")
    with pytest.raises(ConfigError, match=message) as error:
        adapt(model, config)
    assert str(error.value).startswith("model.layers.0.self_attn.o_proj")  # the first target that fails
    assert not any(isinstance(m, BottleneckAdapterLayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"non_linearity": "sigmoidish"}, "unknown non_linearity"),
        ({"hypercomplex_nonlinearity": "phm"}, "unknown hypercomplex_nonlinearity"),
        ({"phm_c_init": "zeros"}, "unknown phm_c_init"),
        ({"phm_rank": 0}, "phm_rank must be a positive integer"),
    ],
)
def test_unknown_names_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        CompacterConfig(**kwargs)


def test_files_of_factorlab_0_1_with_modules_to_save_keys_still_load(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    batch = inputs("llama")
    adapted = adapt(build("llama"), CompacterConfig(train_layer_norms=True, **TINY))
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    adapted.save_pretrained(tmp_path)
    norms = {n for n, m in adapted.adapter_layers() if type(m).__name__ == "ModulesToSave"}
    file = tmp_path / "adapter_model.safetensors"
    old = {}
    for key, value in load_file(file).items():
        module, _, leaf = key.removeprefix("base_model.model.").rpartition(".")
        old[f"base_model.model.{module}.modules_to_save.{leaf}" if module in norms else key] = value
    save_file(old, file)
    restored = AdaptedModel.from_pretrained(build("llama"), tmp_path)
    assert torch.equal(logits(restored, batch), logits(adapted, batch))


@pytest.mark.parametrize(
    "config, expected",
    [
        # tiny Llama: L = 2 layers, k = 64, d = 8 (reduction 8), n = 4; Compacter: 4L(k + d) fast + n^3 rule
        (
            CompacterConfig(**TINY),
            {"PHM fast weights s_i, t_i / B_i": 4 * 2 * (64 + 8), "PHM rule A_i (slow weights)": 4**3},
        ),
        # PHM-Adapter: full B_i (kd/n per layer) and an own rule (n^3) in each of the 8 PHM layers
        (
            PHMAdapterConfig(phm_dim=4, **TINY),
            {"PHM fast weights s_i, t_i / B_i": 8 * 64 * 8 // 4, "PHM rule A_i (slow weights)": 8 * 4**3},
        ),
        # shared fast weights: one down and one up set for the model
        (
            CompacterConfig(shared_W_phm=True, **TINY),
            {"PHM fast weights (shared)": 2 * (64 + 8), "PHM rule A_i (slow weights)": 4**3},
        ),
    ],
)
def test_trainable_parameters_by_kind_follow_the_papers_counts(config, expected):
    adapted = adapt(build("llama"), config)
    by_kind = count_parameters(adapted)["trainable_by_kind"]
    assert by_kind == {**expected, "PHM biases": 4 * (8 + 64)}  # 4 adapters, down and up biases


def test_shared_fast_weights_need_targets_of_one_size():
    config = CompacterConfig(target_modules=["o_proj", "up_proj"], shared_W_phm=True, phm_dim=2)
    message = (
        r"^shared_W_phm needs every target to have the same size; found \[\(\d+, \d+\), \(\d+, \d+\)\]\.$"
    )
    with pytest.raises(ConfigError, match=message):
        adapt(build("llama"), config)


def test_a_second_compacter_adapter_with_layer_norms_gets_its_own_copies_and_no_nesting(tmp_path):
    torch.manual_seed(0)
    batch = inputs("llama")
    adapted = adapt(build("llama"), CompacterConfig(train_layer_norms=True, **TINY))
    adapted.add_adapter("second", CompacterConfig(train_layer_norms=True, phm_dim=2, **TINY))
    wrappers = {n: m for n, m in adapted.get_base_model().named_modules() if isinstance(m, ModulesToSave)}
    assert sorted(wrappers) == [
        "model.layers.0.input_layernorm",
        "model.layers.0.post_attention_layernorm",
        "model.layers.1.input_layernorm",
        "model.layers.1.post_attention_layernorm",
        "model.norm",
    ]  # each norm wrapped once, holding one copy per adapter: never a wrapper inside a wrapper
    for wrapper in wrappers.values():
        assert sorted(wrapper.modules_to_save) == ["default", "second"]
        assert not any(isinstance(m, ModulesToSave) for m in wrapper.modules() if m is not wrapper)
    bottlenecks = [m for _, m in adapted.adapter_layers() if isinstance(m, BottleneckAdapterLayer)]
    assert bottlenecks and all(sorted(m.adapter_down) == ["default", "second"] for m in bottlenecks)
    assert {m.adapter_down["second"].phm_dim for m in bottlenecks} == {2}  # the second adapter's own layers
    shared = adapted.shared_adapter_weights
    assert shared["default"]["phm_rule"].A.shape[0] == 4 and shared["second"]["phm_rule"].A.shape[0] == 2
    expected = {}
    for name in ("default", "second"):
        adapted.set_adapter(name)
        with torch.no_grad():
            for p in adapted.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
        expected[name] = logits(adapted, batch)
    assert not torch.equal(expected["default"], expected["second"])
    adapted.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "second" / "adapter_model.safetensors")
    # each layer's down projection: its bias and fast weights s_i, t_i (the rule is shared, saved once)
    assert sum(".adapter_down." in key for key in saved) == 3 * len(bottlenecks)
    restored = AdaptedModel.from_pretrained(build("llama"), tmp_path)
    restored.load_adapter(tmp_path / "second", "second")
    for name in ("default", "second"):
        restored.set_adapter(name)
        assert torch.equal(logits(restored, batch), expected[name]), name


@pytest.mark.parametrize(("shared_rule", "shared_fast"), [(True, False), (False, False), (True, True)])
def test_adapter_weights_follow_a_float64_base_model(shared_rule, shared_fast):
    config = CompacterConfig(
        train_layer_norms=True,
        shared_phm_rule=shared_rule,
        factorized_phm_rule=True,
        shared_W_phm=shared_fast,
        **TINY,
    )
    adapted = adapt(build("llama").double(), config)
    kinds = {p.dtype for p in adapted.parameters() if p.requires_grad}
    assert kinds == {torch.float64}
    rules = [m for m in adapted.modules() if isinstance(m, PHMRule)]
    bottlenecks = [m for _, m in adapted.adapter_layers() if isinstance(m, BottleneckAdapterLayer)]
    assert len(rules) == (1 if shared_rule else 2 * len(bottlenecks))  # else one per PHM layer, down and up
    assert all(rule().dtype == torch.float64 and rule.factorized for rule in rules)
    assert logits(adapted, inputs("llama")).dtype == torch.float64
