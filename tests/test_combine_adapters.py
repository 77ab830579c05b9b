"""add_weighted_adapter's rules and refusals, pinned one by one (PEFT parity is in test_peft_features)."""

import pytest
import torch

from factorlab import CompacterConfig, LoraConfig, adapt
from factorlab.errors import ConfigError
from factorlab.methods.lora.combine import combine_lora_adapters
from tiny_models import build

torch.set_num_threads(1)


def two_adapters(second: dict | None = None, first: dict | None = None):
    """A tiny Llama with LoRA "a" (r=4) and "b" (r=2 unless overridden), random factors."""
    adapted = adapt(
        build("llama"), LoraConfig(**{"r": 4, "target_modules": ["q_proj", "v_proj"], **(first or {})})
    )
    adapted.add_adapter("b", LoraConfig(**{"r": 2, "target_modules": ["q_proj", "v_proj"], **(second or {})}))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    return adapted


def lora_layers(adapted, name: str):
    return [layer for _, layer in adapted.adapter_layers() if name in layer.adapter_names]


def sum_of_updates(adapted, weights: dict[str, float], layer) -> torch.Tensor:
    return sum(w * layer.delta_weight(a, out_in=True) for a, w in weights.items())


UNSUPPORTED = (
    r"combination_type 'ties' is not supported; choose from \('cat', 'linear', 'svd'\) "
    r"\(PEFT's ties/dare variants are not in factorlab\)\."
)
ONE_RANK = r"combination_type='linear' needs adapters of one rank, got ranks \[4, 2\]; use 'cat' or 'svd'\."


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ({"combination_type": "ties"}, UNSUPPORTED),
        (
            {"adapters": ["default"], "weights": [1.0, 2.0]},
            r"give one weight per adapter: 1 adapters, 2 weights",
        ),
        ({"weights": [True, 1.0]}, r"weights must be finite numbers, got \[True, 1\.0\]\."),
        ({"weights": [float("nan"), 1.0]}, r"weights must be finite numbers, got \[nan, 1\.0\]\."),
        ({"svd_rank": 0}, r"svd_rank must be a positive integer, got 0\."),
        ({"svd_rank": True}, r"svd_rank must be a positive integer, got True\."),
        ({"svd_rank": 2.5}, r"svd_rank must be a positive integer, got 2\.5\."),
        ({"combination_type": "linear"}, ONE_RANK),
    ],
)
def test_each_refusal_names_the_problem(call, message):
    adapted = two_adapters()
    kwargs = {"adapters": ["default", "b"], "weights": [0.5, 0.5], "adapter_name": "c", **call}
    with pytest.raises(ConfigError, match=f"^{message}"):
        adapted.add_weighted_adapter(**kwargs)
    assert "c" not in adapted.adapter_configs


def test_no_adapters_or_an_unknown_one_is_refused_also_below_adapted_model():
    with pytest.raises(ConfigError, match=r"^give one weight per adapter: 0 adapters, 0 weights\.$"):
        combine_lora_adapters(two_adapters(), [], [], "c")
    with pytest.raises(ConfigError, match=r"^no adapter named 'zzz'; adapters: \['b', 'default'\]\.$"):
        combine_lora_adapters(two_adapters(), ["default", "zzz"], [1.0, 1.0], "c")


def test_the_smallest_svd_rank_is_accepted_and_gives_a_rank_one_update():
    adapted = two_adapters()
    adapted.add_weighted_adapter(["default", "b"], [0.5, 0.5], "c", combination_type="svd", svd_rank=1)
    for layer in lora_layers(adapted, "c"):
        assert torch.linalg.matrix_rank(layer.delta_weight("c", out_in=True)) == 1


@pytest.mark.parametrize(
    ("option", "value"),
    [("use_dora", True), ("bias", "all"), ("bias", "lora_only"), ("modules_to_save", ["lm_head"])],
)
def test_adapters_with_more_than_plain_lora_are_refused(option, value):
    adapted = two_adapters(second={option: value})
    message = (
        r"^'b' uses DoRA, bias training or modules_to_save; factorlab combines plain LoRA adapters only\.$"
    )
    with pytest.raises(ConfigError, match=message):
        adapted.add_weighted_adapter(["default", "b"], [0.5, 0.5], "c")


def test_a_non_lora_adapter_is_refused_by_method():
    adapted = two_adapters()
    adapted.add_adapter("k", CompacterConfig(target_modules=["o_proj"], phm_dim=2, reduction_factor=4))
    with pytest.raises(ConfigError, match=r"combines adapters of one method that supports it \(LoRA\)"):
        adapted.add_weighted_adapter(["default", "k"], [0.5, 0.5], "c")
    message = r"^add_weighted_adapter combines LoRA adapters; 'k' is compacter\.$"
    with pytest.raises(ConfigError, match=message):  # its own check, below the model's
        combine_lora_adapters(adapted, ["default", "k"], [0.5, 0.5], "c")


def test_lora_outside_linear_layers_is_refused_only_where_the_combined_adapters_live():
    adapted = two_adapters()
    adapted.add_adapter("e", LoraConfig(r=2, target_modules=["embed_tokens"]))
    adapted.add_weighted_adapter(["default", "b"], [0.5, 0.5], "c")  # the embedding holds neither
    with pytest.raises(
        ConfigError, match=r"^model\.embed_tokens is a LoRAEmbedding; factorlab combines LoRA on"
    ):
        adapted.add_weighted_adapter(["default", "e"], [0.5, 0.5], "d")


def test_svd_is_the_default_and_one_adapter_is_a_rescaling():
    adapted = two_adapters()
    combine_lora_adapters(adapted, ["default", "b"], [0.5, -1.0], "by_default")
    adapted.add_weighted_adapter(["default", "b"], [0.5, -1.0], "svd", combination_type="svd")
    for layer in lora_layers(adapted, "svd"):
        assert torch.equal(layer.delta_weight("by_default"), layer.delta_weight("svd"))
    for kind in ("cat", "svd"):  # one adapter: PEFT's linear rescaling, whatever the type asked
        adapted.add_weighted_adapter(["b"], [-0.5], f"half_{kind}", combination_type=kind)
        for layer in lora_layers(adapted, "b"):
            assert layer.lora_A[f"half_{kind}"].weight.shape[0] == 2  # b's rank, not an svd of rank max(r)
            torch.testing.assert_close(
                layer.delta_weight(f"half_{kind}"), -0.5 * layer.delta_weight("b"), rtol=1e-5, atol=1e-7
            )


def test_cat_stacks_the_scaled_factors_exactly():
    adapted = two_adapters(second={"lora_alpha": 6})
    adapted.add_weighted_adapter(["default", "b"], [0.7, -1.3], "c", combination_type="cat")
    for layer in lora_layers(adapted, "c"):
        expected_a = torch.cat(
            [
                layer.lora_A["default"].weight * 0.7 * layer.scaling["default"],
                layer.lora_A["b"].weight * -1.3 * 3.0,
            ]
        )
        assert torch.equal(layer.lora_A["c"].weight, expected_a)
        expected_b = torch.cat([layer.lora_B["default"].weight, layer.lora_B["b"].weight], dim=1)
        assert torch.equal(layer.lora_B["c"].weight, expected_b)


def test_the_new_adapter_is_plain_trainable_lora_at_its_own_rank_where_the_sources_live():
    first = {"target_modules": ["q_proj"], "rank_pattern": {"layers.0.self_attn.q_proj": 8},
             "alpha_pattern": {"layers.0.self_attn.q_proj": 32}, "use_rslora": True}  # fmt: skip
    adapted = two_adapters(first=first, second={"target_modules": ["q_proj"], "r": 8})
    adapted.add_weighted_adapter(["default", "b"], [0.5, 0.5], "c", combination_type="svd", svd_rank=16)
    config = adapted.adapter_configs["c"]
    assert config.r == config.lora_alpha == 16 and config.rank_pattern == {} and config.alpha_pattern == {}
    assert config.use_rslora and not config.inference_mode  # the first adapter's rsLoRA, as PEFT
    holders = sorted(name for name, layer in adapted.adapter_layers() if "c" in layer.adapter_names)
    assert config.target_modules == holders and holders and all("q_proj" in n for n in holders)
    for layer in lora_layers(adapted, "c"):
        assert layer.lora_A["c"].weight.shape[0] == 16
        assert layer.scaling["c"] == 4.0  # rsLoRA: alpha / sqrt(r), which scales the update, as in PEFT
        torch.testing.assert_close(  # rank 16 holds both rank-8 updates: the svd is exact
            layer.delta_weight("c", out_in=True),
            4.0 * sum_of_updates(adapted, {"default": 0.5, "b": 0.5}, layer),
            rtol=1e-4,
            atol=1e-6,
        )


def test_cat_where_the_sources_differ_in_modules_and_ranks_pads_with_zeros():
    """'cat' at rank 4 + 2 = 6 where "b" adapts q_proj only and "default" has rank 2 on one layer: each
    layer holds its present adapters' factors first, zero rows after, and the update is their sum."""
    first = {"rank_pattern": {"layers.0.self_attn.q_proj": 2}}
    adapted = two_adapters(first=first, second={"target_modules": ["q_proj"]})
    adapted.add_weighted_adapter(["default", "b"], [0.7, -1.3], "c", combination_type="cat")
    rows = {}
    for name, layer in adapted.adapter_layers():
        present = {a: w for a, w in {"default": 0.7, "b": -1.3}.items() if a in layer.adapter_names}
        assert layer.lora_A["c"].weight.shape[0] == 6
        used = sum(layer.lora_A[a].weight.shape[0] for a in present)
        rows[name] = used
        assert not layer.lora_A["c"].weight[used:].any() and not layer.lora_B["c"].weight[:, used:].any()
        torch.testing.assert_close(
            layer.delta_weight("c", out_in=True),
            sum_of_updates(adapted, present, layer),
            rtol=1e-5,
            atol=1e-7,
        )
    assert rows == {
        "model.layers.0.self_attn.q_proj": 4,
        "model.layers.0.self_attn.v_proj": 4,
        "model.layers.1.self_attn.q_proj": 6,
        "model.layers.1.self_attn.v_proj": 4,
    }
