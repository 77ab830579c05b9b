"""Bad configs fail with a message that names the field, the value and the fix; the smallest valid
value of each checked field is accepted (a boundary off by one would refuse it). Written against the
mutation run's survivors (results/mutation/summary.md): asserting only the exception type let a
message replaced by None, or a check's bound moved, pass."""

import pytest
import torch

from factorlab import CompacterConfig, ConfigError, LoraConfig, LoraMixerConfig
from factorlab.layers.phm import PHMFastWeights, PHMLinear, PHMRule

MIXER_ERRORS = [
    ({"num_experts": 0}, r"num_experts must be a positive integer, got 0\."),
    ({"num_experts": 2.0}, r"num_experts"),
    ({"experts": []}, r"experts is empty; give at least one expert\."),
    ({"experts": [{"name": "a"}, {"name": "a"}]}, r"expert names must be unique, got \['a', 'a'\]\."),
    ({"experts": [{"name": "a", "r": 0}]}, r"expert 'a': rank r must be a positive integer, got 0\."),
    ({"lora_alpha": 0.0}, r"expert 'expert_0': lora_alpha is 0, so it would train nothing"),
    ({"experts": [{"name": "a", "lora_alpha": 0}]}, r"expert 'a': lora_alpha is 0"),
    (
        {"lora_alpha": 1e39},
        r"expert 'expert_0': lora_alpha=1e\+39 overflows float32, where the update is scaled",
    ),
    ({"r": 0}, r"expert 'expert_0': rank r must be a positive integer, got 0\."),
    (
        {"routing": "sparse"},
        r"routing must be one of \('hard', 'soft', 'topk', 'uniform', 'arrow'\), got 'sparse'\.",
    ),
    ({"top_k": 0}, r"top_k must be in 1\.\.num_experts=4, got 0\."),
    ({"top_k": 5}, r"top_k must be in 1\.\.num_experts=4, got 5\."),
    ({"temperature": 0.0}, r"temperature must be > 0, got 0\.0\."),
    ({"router_granularity": "global"}, r"router_granularity must be one of .*, got 'global'\."),
    ({"balance_coef": -1.0}, r"balance_coef must be >= 0, got -1\.0\."),
    ({"specialization_coef": -0.5}, r"specialization_coef must be >= 0, got -0\.5\."),
    ({"preservation_coef": -2.0}, r"preservation_coef must be >= 0, got -2\.0\."),
    ({"route_label_coef": -3.0}, r"route_label_coef must be >= 0, got -3\.0\."),
    ({"router_pooling": "mean"}, r"router_pooling must be 'token' or 'sample', got 'mean'\."),
    ({"gate_balance_coef": -0.1}, r"gate_balance_coef must be >= 0, got -0\.1\."),
]

PEER_ERRORS = [
    ("HydraLoraConfig", {"r": 0}, r"HydraLoraConfig\.r must be > 0, got 0\."),
    ("HydraLoraConfig", {"num_experts": 0}, r"HydraLoraConfig\.num_experts must be > 0, got 0\."),
    ("HydraLoraConfig", {"lora_alpha": 0.0}, r"lora_alpha is 0, so it would train nothing"),
    (
        "HydraLoraConfig",
        {"init_lora_weights": "pissa"},
        r"init_lora_weights must be True, False or 'gaussian'",
    ),
    ("MixLoraConfig", {"num_experts": 0}, r"MixLoraConfig\.num_experts must be > 0, got 0\."),
    (
        "MixLoraConfig",
        {"top_k": 3, "num_experts": 2},
        r"top_k=3 exceeds num_experts=2; use top_k <= num_experts\.",
    ),
    (
        "MixLoraConfig",
        {"router_aux_loss_coef": -1.0},
        r"MixLoraConfig\.router_aux_loss_coef must be >= 0, got -1\.0\.",
    ),
]


@pytest.mark.parametrize(
    ("config", "kwargs", "message"), PEER_ERRORS, ids=[f"{c}{k}" for c, k, _ in PEER_ERRORS]
)
def test_peer_config_errors_name_the_field_and_value(config, kwargs, message):
    import factorlab

    with pytest.raises(ConfigError, match=message):
        getattr(factorlab, config)(**kwargs)


def test_mixlora_on_a_model_without_a_gated_feed_forward_names_what_it_adapts():
    import factorlab
    from factorlab.errors import TargetError
    from tiny_models import build

    with pytest.raises(TargetError, match=r"mlp \(GPT2MLP\).*gated feed-forward blocks \(gate_proj, up_proj"):
        factorlab.adapt(build("gpt2"), factorlab.MixLoraConfig(target_modules=["c_attn", "mlp"]))


@pytest.mark.parametrize(("kwargs", "message"), MIXER_ERRORS, ids=[str(k) for k, _ in MIXER_ERRORS])
def test_mixer_config_errors_name_the_field_and_value(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoraMixerConfig(**kwargs)


def test_mixer_config_accepts_the_smallest_valid_values():
    one = LoraMixerConfig(num_experts=1, r=1, top_k=1, temperature=1e-6)
    assert (one.num_experts, one.top_k, one.expert_specs()[0].r) == (1, 1, 1)
    assert LoraMixerConfig(num_experts=4, top_k=4).top_k == 4
    zero = LoraMixerConfig(
        balance_coef=0.0, specialization_coef=0.0, preservation_coef=0.0, route_label_coef=0.0
    )
    assert zero.balance_coef == 0.0
    assert LoraMixerConfig(router_pooling="sample", gate_balance_coef=0.0).router_pooling == "sample"
    assert LoraMixerConfig(experts=[{"name": "a", "r": 1}]).expert_specs()[0].r == 1


def _peft_lora(tmp_path, name, r, alpha, targets):
    import peft

    from tiny_models import build

    torch.manual_seed(0)
    model = peft.get_peft_model(
        build("llama"),
        peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False),
    )
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


def test_from_peft_adapters_reads_rank_alpha_targets_and_names(tmp_path):
    first = _peft_lora(tmp_path, "math", 4, 12, ["q_proj", "v_proj"])
    second = _peft_lora(tmp_path, "code", 2, 3, ["o_proj"])
    named = LoraMixerConfig.from_peft_adapters([first, second], names=["m", "c"])
    assert named.expert_names() == ["m", "c"]
    assert LoraMixerConfig.from_peft_adapters([first, second]).expert_names() == ["math", "code"]
    a, b = named.expert_specs()
    assert (a.r, a.lora_alpha, b.r, b.lora_alpha) == (4, 12, 2, 3)
    assert a.target_modules == sorted(a.modules) and all(m.endswith(("q_proj", "v_proj")) for m in a.modules)
    assert named.target_modules == sorted(set(a.target_modules) | set(b.target_modules))
    assert (
        named.freeze_experts
        and not LoraMixerConfig.from_peft_adapters([first], freeze_experts=False).freeze_experts
    )
    with pytest.raises(ConfigError, match=r"from_peft_adapters needs at least one PEFT LoRA folder\."):
        LoraMixerConfig.from_peft_adapters([])
    with pytest.raises(ConfigError, match=r"1 names for 2 folders\."):
        LoraMixerConfig.from_peft_adapters([first, second], names=["m"])


LORA_ERRORS = [
    ({"r": 0}, r"LoRA r must be a positive integer, got 0; e\.g\. r=8\."),
    ({"r": True}, r"LoraConfig.r must be an integer, got True\."),  # check_fields, before the rank check
    ({"rank_pattern": {"q_proj": -1}}, r"LoRA rank_pattern\['q_proj'\] must be a positive integer, got -1"),
    ({"lora_alpha": 0}, r"LoRA lora_alpha is 0, so it would train nothing; e\.g\. lora_alpha=16"),
    ({"alpha_pattern": {"v_proj": 0.0}}, r"LoRA alpha_pattern\['v_proj'\] is 0, so it would train"),
    # finite as a Python float, inf as float32 (found by hypothesis in a clean-clone run)
    ({"lora_alpha": 3.4028235677973366e38}, r"LoRA lora_alpha=3\.4028235677973366e\+38 overflows float32"),
    ({"alpha_pattern": {"v_proj": -1e39}}, r"LoRA alpha_pattern\['v_proj'\]=-1e\+39 overflows float32"),
    ({"lora_alpha": float("nan")}, r"LoraConfig\.lora_alpha must be a finite number, got nan"),
    ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\), got 1\.0\."),
    ({"lora_dropout": -0.1}, r"lora_dropout must be in \[0, 1\), got -0\.1\."),
    ({"init_lora_weights": "pissa"}, r"init_lora_weights must be one of .*, got 'pissa'\."),
    ({"use_qalora": True}, r"LoraConfig\.use_qalora=True: QA-LoRA is not supported\."),
    ({"layers_pattern": "decoder"}, r"LoraConfig\.layers_pattern='decoder': factorlab finds layer indices"),
    ({"layers_pattern": ["layers", "stack"]}, r"LoraConfig\.layers_pattern=\['layers', 'stack'\]"),
]


@pytest.mark.parametrize(("kwargs", "message"), LORA_ERRORS, ids=[str(k) for k, _ in LORA_ERRORS])
def test_lora_config_errors_name_the_field_and_value(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**kwargs)


def test_lora_config_accepts_block_names_it_finds_itself_and_the_smallest_rank():
    assert LoraConfig(layers_pattern="layers").layers_pattern == "layers"
    assert LoraConfig(layers_pattern=["h", "block"]).layers_pattern == ["h", "block"]
    # every NOT_SUPPORTED option is checked, not only those before the first accepted one
    assert LoraConfig(layers_pattern="layers", lora_dropout=0.0, r=1).r == 1
    float32_max = torch.finfo(torch.float32).max  # the largest alpha float32 holds is accepted
    assert LoraConfig(lora_alpha=float32_max, alpha_pattern={"q": -float32_max}).lora_alpha == float32_max
    assert LoraMixerConfig(lora_alpha=float32_max).lora_alpha == float32_max
    with pytest.raises(ConfigError, match="megatron_config"):
        LoraConfig(layers_pattern="layers", megatron_config={"tp": 2})


COMPACTER_ERRORS = [
    ({"phm_dim": 0}, r"phm_dim must be a positive integer, got 0\."),
    ({"reduction_factor": 0}, r"reduction_factor must be > 0, got 0\."),
    ({"reduction_factor": -2}, r"reduction_factor must be > 0, got -2\."),
]


@pytest.mark.parametrize(("kwargs", "message"), COMPACTER_ERRORS, ids=[str(k) for k, _ in COMPACTER_ERRORS])
def test_compacter_config_errors_name_the_field_and_value(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        CompacterConfig(**kwargs)


def test_compacter_config_accepts_the_smallest_valid_values():
    assert CompacterConfig(phm_dim=1, reduction_factor=1).phm_dim == 1
    assert CompacterConfig(reduction_factor=0.5).reduction_factor == 0.5


def test_phm_layer_errors_and_defaults():
    with pytest.raises(
        ConfigError, match=r"phm_dim=3 does not divide in_features=8; .*in_features=8, out_features=6"
    ):
        PHMLinear(8, 6, phm_dim=3)
    with pytest.raises(ConfigError, match=r"phm_dim=4 does not divide out_features=6;"):
        PHMLinear(8, 6, phm_dim=4)
    with pytest.raises(ConfigError, match=r"the shared rule has n=2 but this layer has phm_dim=4\."):
        PHMLinear(8, 8, phm_dim=4, rule=PHMRule(2))
    fast = PHMFastWeights(2, 4, 3, rank=1)  # for a 6 -> 8 layer
    with pytest.raises(
        ConfigError, match=r"the shared fast weights are for a 6 -> 8 layer, not 8 -> 6; shared_W_phm"
    ):
        PHMLinear(8, 6, phm_dim=2, fast=fast)
    layer = PHMLinear(8, 6, phm_dim=2)
    assert layer.bias is not None and layer.bias.shape == (6,) and torch.equal(layer.bias, torch.zeros(6))
    assert PHMLinear(8, 6, phm_dim=2, bias=False).bias is None
    assert layer.own_rule.A.requires_grad  # the rule learns by default, unfactorized, N(0, 1e-4^2)
    assert layer.own_rule.A.abs().max() < 1e-3
    assert layer.own_fast.rank == 1  # Compacter's rank-one fast weights
    assert not PHMLinear(8, 6, phm_dim=2, learn_rule=False).own_rule.A.requires_grad
    normal = PHMLinear(64, 64, phm_dim=2, fast_init="normal")
    assert 0 < normal.own_fast.s.std() < 1e-3  # fast_init_range 1e-4 by default


def test_copy_state_exact_names_what_differs_and_copies_nothing_on_error():
    from factorlab.errors import AdapterLoadError
    from factorlab.layers.base import copy_state_exact

    live = {"A": torch.zeros(2, 3), "B": torch.zeros(3, 2, dtype=torch.float64)}
    good = {"A": torch.ones(2, 3, dtype=torch.float64), "B": torch.full((3, 2), 2.0)}
    missing = r"^lin: the adapter file's tensors do not match \(missing \['B'\], unexpected none\)\.$"
    shape = r"^lin\.A: the file holds shape \(3, 2\) but .* expects \(2, 3\); .*saved with\.$"
    integer = (
        r"^lin\.B: the file stores dtype torch\.int64, but adapter weights are floating point; "
        r"the file is corrupt or not a factorlab/PEFT adapter\.$"
    )
    infinite = (
        r"^lin\.A: NaN or inf values \(after casting torch\.float64 to torch\.float32\); "
        r"the adapter is corrupt or was saved from a diverged run\.$"
    )
    cases = [
        ({"A": good["A"]}, missing),
        ({**good, "C": good["A"]}, r"missing none, unexpected \['C'\]\)\.$"),
        ({**good, "A": torch.ones(3, 2)}, shape),
        ({**good, "B": torch.ones(3, 2, dtype=torch.int64)}, integer),
        ({**good, "A": torch.full((2, 3), 1e39, dtype=torch.float64)}, infinite),
    ]
    for tensors, message in cases:
        with pytest.raises(AdapterLoadError, match=message):
            copy_state_exact(live, tensors, "lin")
        assert not live["A"].any() and not live["B"].any()  # nothing copied
    copy_state_exact(live, good, "lin")
    assert live["A"].dtype == torch.float32 and torch.equal(
        live["A"], torch.ones(2, 3)
    )  # cast to the weight's
    assert live["B"].dtype == torch.float64 and torch.equal(
        live["B"], torch.full((3, 2), 2.0, dtype=torch.float64)
    )


def test_lora_layer_rank_and_dropout_bounds():
    from torch import nn

    from factorlab.layers import LoRALinear

    layer = LoRALinear(nn.Linear(4, 3))
    layer.update_layer("widest", r=32, lora_alpha=1.0)  # 8 x the widest side: still accepted
    with pytest.raises(
        ConfigError, match=r"^LoRA rank r=33 far exceeds this 4 -> 3 layer's widths; the update has "
    ):
        layer.update_layer("typo", r=33, lora_alpha=1.0)
    with pytest.raises(ConfigError, match=r"has rank <= 3 anyway\. Use a smaller r\.$"):
        layer.update_layer("typo", r=33, lora_alpha=1.0)
    with pytest.raises(ConfigError, match=r"^lora_dropout must be in \[0, 1\), got 1\.0\.$"):
        layer.update_layer("drop", r=1, lora_alpha=1.0, lora_dropout=1.0)
    with pytest.raises(ConfigError, match=r"^init_lora_weights must be one of .*, got 'pissa'\.$"):
        layer.update_layer("init", r=1, lora_alpha=1.0, init_lora_weights="pissa")
    layer.update_layer("none", r=1, lora_alpha=1.0, lora_dropout=0.0)
    layer.update_layer("some", r=1, lora_alpha=1.0, lora_dropout=0.999)
    assert isinstance(layer.lora_dropout["none"], nn.Identity)  # no dropout module on the hot path
    assert isinstance(layer.lora_dropout["some"], nn.Dropout) and layer.lora_dropout["some"].p == 0.999
    assert "none" not in getattr(layer, "lora_magnitude_vector", {})  # DoRA is off by default


def test_is_linear_sees_through_adapter_layers():
    from torch import nn

    from factorlab.layers import LoRALinear
    from factorlab.layers.shapes import is_linear

    assert is_linear(nn.Linear(2, 2)) and not is_linear(nn.Embedding(3, 2))
    assert is_linear(LoRALinear(nn.Linear(2, 2)))

    class Wrapper(nn.Module):  # a base_layer attribute alone does not make an adapter layer
        def __init__(self):
            super().__init__()
            self.base_layer = nn.Linear(2, 2)

    assert not is_linear(Wrapper())


def test_compacter_bottleneck_bounds_and_message():
    from factorlab.methods.compacter.model import bottleneck_size

    assert bottleneck_size(64, CompacterConfig(reduction_factor=64), "m") == 1  # the smallest bottleneck
    assert bottleneck_size(64, CompacterConfig(reduction_factor=2.5), "m") == 25
    message = (
        r"^blk\.ffn: reduction_factor=128 is larger than the hidden size 64, so the bottleneck would have 0 "
        r"units; use reduction_factor <= 64 \(e\.g\. 8 gives a bottleneck of 8\)\.$"
    )
    with pytest.raises(ConfigError, match=message):
        bottleneck_size(64, CompacterConfig(reduction_factor=128), "blk.ffn")


def test_dora_on_a_layer_without_it_is_refused_by_name():
    from torch import nn

    from factorlab.layers import LoRALinear
    from factorlab.layers.lora import LoRAEmbedding

    with pytest.raises(
        ConfigError, match=r"^DoRA on Embedding layers is not supported by factorlab; target linear"
    ):
        LoRAEmbedding(nn.Embedding(10, 4)).update_layer("d", r=2, lora_alpha=2.0, use_dora=True)
    LoRAEmbedding(nn.Embedding(10, 4)).update_layer("plain", r=2, lora_alpha=2.0)  # without DoRA: fine
    LoRALinear(nn.Linear(4, 4)).update_layer("d", r=2, lora_alpha=2.0, use_dora=True)  # linear: supported


@pytest.mark.parametrize(
    ("arch", "projections"), [("llama", {"q_proj", "v_proj"}), ("mamba", {"in_proj", "x_proj"})]
)
def test_lora_default_targets_are_pefts(arch, projections):
    from factorlab import adapt
    from tiny_models import build

    model = build(arch)
    names = [n for n, _ in adapt(model, LoraConfig(r=2)).adapter_layers()]
    assert {n.rsplit(".", 1)[-1] for n in names} == projections
    assert len(names) == model.config.num_hidden_layers * len(projections)


def test_lora_bias_modes_train_exactly_the_biases_they_name():
    from factorlab import adapt
    from tiny_models import build

    def trained_biases(bias):
        adapted = adapt(build("gpt2"), LoraConfig(r=2, target_modules=["c_attn"], bias=bias))
        return {n for n, p in adapted.named_parameters() if p.requires_grad and n.endswith("bias")}

    every_bias = {n for n, _ in build("gpt2").named_parameters() if n.endswith("bias")}
    assert trained_biases("none") == set()
    lora_only = trained_biases("lora_only")
    assert lora_only and all("c_attn.base_layer.bias" in n for n in lora_only)
    assert len(lora_only) == sum("c_attn" in n for n in every_bias)
    assert len(trained_biases("all")) == len(every_bias)  # every bias of the base, adapted layers' included


def test_lora_config_as_peft_writes_it():
    config = LoraConfig(r=4, lora_alpha=8, target_roles=["attn_q"], layers_to_transform=[0])
    out = config.to_peft_dict(["model.layers.0.self_attn.q_proj"], "CAUSAL_LM", fan_in_fan_out=False)
    assert out["peft_type"] == "LORA" and "method" not in out and "target_roles" not in out
    assert out["target_modules"] == ["model.layers.0.self_attn.q_proj"]  # exact names, nothing left to match
    assert out["layers_to_transform"] is None and out["exclude_modules"] is None
    assert (out["r"], out["lora_alpha"], out["task_type"], out["inference_mode"]) == (4, 8, "CAUSAL_LM", True)
    assert out["fan_in_fan_out"] is False
    assert LoraConfig(task_type="SEQ_CLS").to_peft_dict([], "CAUSAL_LM", True)["task_type"] == "SEQ_CLS"


def test_bottleneck_adapter_adds_up_act_down_of_the_base_output():
    from torch import nn

    from factorlab.layers.bottleneck import BottleneckAdapterLayer

    torch.manual_seed(0)
    base, down, up = nn.Linear(6, 8), nn.Linear(8, 2), nn.Linear(2, 8)
    layer = BottleneckAdapterLayer(base)
    layer.update_layer("a", down, up, "relu")
    layer.set_adapter(["a"])
    x = torch.randn(3, 6)
    with torch.no_grad():
        h = base(x)
        torch.testing.assert_close(layer(x), h + up(torch.relu(down(h))))
    with pytest.raises(ConfigError, match=r"^unknown non_linearity 'swishy'; choose one of \["):
        layer.update_layer("b", down, up, "swishy")


@pytest.mark.parametrize("init", ["glorot-uniform", "glorot-normal"])
def test_phm_fast_weights_use_glorot_with_gain_sqrt2(init):
    """As the original Compacter code: xavier with gain sqrt(2) on each factor of each B_i."""
    torch.manual_seed(0)
    fast = PHMFastWeights(4, 64, 96, rank=48, init=init)
    for m in (fast.s, fast.t):
        rows, cols = m.shape[1], m.shape[2]
        std = 2**0.5 * (2 / (rows + cols)) ** 0.5
        measured = float(m.std())
        assert abs(measured - std) < 0.1 * std, (measured, std)
        if init == "glorot-uniform":
            bound = std * 3**0.5
            assert float(m.abs().max()) <= bound and float(m.abs().max()) > 0.9 * bound
    full = PHMFastWeights(2, 4, 6, rank=None)
    assert full.B.shape == (2, 4, 6) and not full.factorized
    with pytest.raises(ConfigError, match=r"^phm_rank must be a positive integer, got 0\.$"):
        PHMFastWeights(2, 4, 6, rank=0)
    with pytest.raises(ConfigError, match=r"^hypercomplex_nonlinearity must be one of .*, got 'he'\.$"):
        PHMFastWeights(2, 4, 6, init="he")


def test_phm_rule_inits():
    torch.manual_seed(0)
    uniform = PHMRule(8, init="uniform", init_range=0.5)
    assert (
        float(uniform.A.min()) < -0.4 and float(uniform.A.max()) > 0.4 and float(uniform.A.abs().max()) <= 0.5
    )
    assert PHMRule(2, factorized=True).A_left.shape == (2, 2, 1)
    assert not PHMRule(2, learn=False).A.requires_grad
    with pytest.raises(
        ConfigError, match=r"^phm_c_init must be one of \('normal', 'uniform'\), got 'zeros'\.$"
    ):
        PHMRule(2, init="zeros")


def test_fan_in_fan_out_that_contradicts_the_module_is_refused_by_name():
    from factorlab import adapt
    from tiny_models import build

    message = (
        r"^model\.layers\.0\.self_attn\.q_proj is an nn\.Linear \(weight stored out x in\) but "
        r"fan_in_fan_out=True; leave fan_in_fan_out=None to detect it per module\.$"
    )
    with pytest.raises(ConfigError, match=message):
        adapt(build("llama"), LoraConfig(target_modules=["q_proj"], fan_in_fan_out=True))
    message = (
        r"^transformer\.h\.0\.attn\.c_attn is a Conv1D \(weight stored in x out\) but fan_in_fan_out=False;"
    )
    with pytest.raises(ConfigError, match=message):
        adapt(build("gpt2"), LoraConfig(target_modules=["c_attn"], fan_in_fan_out=False))
    adapt(build("gpt2"), LoraConfig(target_modules=["c_attn"], fan_in_fan_out=True))  # says what it is: fine
    adapt(build("llama"), LoraConfig(target_modules=["q_proj"], fan_in_fan_out=False))


def test_lora_config_dict_leaves_out_the_peft_options_it_does_not_use_and_keeps_those_set():
    assert not set(LoraConfig.NOT_SUPPORTED) & set(LoraConfig(r=4).to_dict())
    kept = LoraConfig(r=4, layers_pattern="layers").to_dict()  # a block name factorlab finds itself
    assert kept["layers_pattern"] == "layers" and LoraConfig.from_dict(kept) == LoraConfig(
        r=4, layers_pattern="layers"
    )
