import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from factorlab.errors import ConfigError
from factorlab.layers import LoRALinear


class Conv1D(torch.nn.Module):
    """GPT-2's layout: weight (in, out), y = x W + b (recognised by name and the nf attribute)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = torch.nn.Parameter(torch.randn(nx, nf))
        self.bias = torch.nn.Parameter(torch.randn(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


@settings(max_examples=30, deadline=None)
@given(
    d_in=st.integers(1, 12),
    d_out=st.integers(1, 12),
    r=st.integers(1, 6),
    alpha=st.floats(0.5, 32),
    rslora=st.booleans(),
    conv=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_forward_equals_reference_math_and_merge_roundtrips(d_in, d_out, r, alpha, rslora, conv, seed):
    torch.manual_seed(seed)
    base = Conv1D(d_out, d_in) if conv else torch.nn.Linear(d_in, d_out)
    base = base.double()
    layer = LoRALinear(base, fan_in_fan_out=conv).double()
    layer.update_layer("a", r=r, lora_alpha=alpha, use_rslora=rslora, init_lora_weights=False)
    layer.set_adapter(["a"])
    x = torch.randn(3, 5, d_in, dtype=torch.double)
    w = base.weight.T if conv else base.weight  # (out, in)
    scale = alpha / (math.sqrt(r) if rslora else r)
    a, b = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    expected = x @ w.T + base.bias + scale * (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x), expected)
    original = base.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer(x), expected)  # merged: base alone carries the update
    layer.unmerge()
    torch.testing.assert_close(base.weight, original)


def test_inits():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(512, 64))
    layer.update_layer("k", r=16, lora_alpha=16)
    layer.update_layer("g", r=16, lora_alpha=16, init_lora_weights="gaussian")
    for name in ("k", "g"):
        assert torch.count_nonzero(layer.lora_B[name].weight) == 0  # starts as the base layer
    assert layer.lora_A["g"].weight.std().item() == pytest.approx(1 / 16, rel=0.05)
    bound = 1 / math.sqrt(512)  # kaiming-uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert layer.lora_A["k"].weight.abs().max().item() <= bound
    assert layer.lora_A["k"].weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(16, 16))
    layer.update_layer("d", r=4, lora_alpha=4, lora_dropout=0.5, init_lora_weights=False)
    layer.set_adapter(["d"])
    x = torch.randn(4, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_half_precision_base_gets_float32_adapters():
    layer = LoRALinear(torch.nn.Linear(8, 8).to(torch.bfloat16))
    layer.update_layer("a", r=2, lora_alpha=2)
    layer.set_adapter(["a"])
    assert layer.lora_A["a"].weight.dtype == torch.float32
    assert layer(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("r", [0, -1, 2.5])
def test_bad_rank(r):
    with pytest.raises(ConfigError, match="positive integer"):
        LoRALinear(torch.nn.Linear(4, 4)).update_layer("a", r=r, lora_alpha=1)


@pytest.mark.parametrize("r, alpha", [(4, 8.0), (1, 8.0), (64, 8.0), (3, 8.0), (4, 6.0)])
def test_the_update_is_bit_equal_to_scaling_the_output_as_peft_does(r, alpha):
    # a power-of-two scaling is applied at width r (cheaper); it must not change a single bit
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(48, 40))
    layer.update_layer("a", r=r, lora_alpha=alpha, init_lora_weights=False)
    layer.set_adapter(["a"])
    x = torch.randn(2, 7, 48, requires_grad=True)
    a, b = layer.lora_A["a"], layer.lora_B["a"]
    got = layer(x)
    expected = layer.base_layer(x) + b(a(x)) * (alpha / r)
    assert torch.equal(got, expected)
    (grad_got,) = torch.autograd.grad(got.square().sum(), x)
    (grad_expected,) = torch.autograd.grad(expected.square().sum(), x)
    assert torch.equal(grad_got, grad_expected)


def _layers():
    """One of each LoRA layer kind on a small base, with an input for it."""
    from factorlab.layers import LoRAConv, LoRAEmbedding

    torch.manual_seed(0)
    return {
        "linear": (LoRALinear(torch.nn.Linear(12, 10)), torch.randn(2, 3, 12)),
        "embedding": (LoRAEmbedding(torch.nn.Embedding(20, 10, padding_idx=0)), torch.tensor([[0, 3, 7, 0]])),
        "conv1d": (LoRAConv(torch.nn.Conv1d(4, 6, 3)), torch.randn(2, 4, 9)),
        "conv2d": (LoRAConv(torch.nn.Conv2d(4, 6, 3)), torch.randn(2, 4, 7, 7)),
    }


@pytest.mark.parametrize("kind", ["linear", "embedding", "conv1d", "conv2d"])
def test_every_lora_kind_starts_as_its_base_unless_init_is_false(kind):
    layer, x = _layers()[kind]
    base = layer.base_layer(x)
    for init in (True, "gaussian", False):
        layer.update_layer("a", r=2, lora_alpha=4, init_lora_weights=init)
        layer.set_adapter(["a"])
        assert torch.equal(layer(x), base) is (init is not False), init
        layer.delete_adapter("a")


@pytest.mark.parametrize("kind", ["linear", "embedding", "conv1d", "conv2d"])
def test_merging_one_of_two_active_adapters_keeps_the_output_and_applies_the_other_unmerged(kind):
    layer, x = _layers()[kind]
    for name in ("first", "second"):
        layer.update_layer(name, r=2, lora_alpha=4, init_lora_weights=False)
    layer.set_adapter(["first", "second"])
    both = layer(x)
    layer.set_adapter(["first"])
    assert not torch.allclose(layer(x), both)
    layer.set_adapter(["elsewhere", "first", "second"])  # a model-wide list: names it lacks are ignored
    assert torch.equal(layer(x), both)
    layer.merge(["first"])  # "first" is now in the weights; "second" must still be added on top
    torch.testing.assert_close(layer(x), both, atol=1e-5, rtol=1e-5)
    layer.unmerge()  # W + dW - dW: equal up to float rounding
    torch.testing.assert_close(layer(x), both, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "linear-dora", "embedding", "conv1d", "conv2d"])
def test_a_half_precision_base_keeps_its_dtype_through_forward_merge_and_unmerge(kind):
    layer, x = _layers()[kind.removesuffix("-dora")]
    layer.base_layer.to(torch.bfloat16)
    x = x if kind == "embedding" else x.to(torch.bfloat16)
    layer.update_layer("a", r=2, lora_alpha=4, init_lora_weights=False, use_dora=kind.endswith("dora"))
    layer.set_adapter(["a"])
    assert {p.dtype for p in layer.adapter_parameters("a")} == {torch.float32}
    unmerged = layer(x)
    assert unmerged.dtype == torch.bfloat16
    original = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert layer.base_layer.weight.dtype == torch.bfloat16
    torch.testing.assert_close(layer(x), unmerged, atol=0.05, rtol=0.02)  # bf16 rounding of W + dW
    layer.unmerge()
    assert layer.base_layer.weight.dtype == torch.bfloat16
    torch.testing.assert_close(layer.base_layer.weight, original, atol=0.02, rtol=0.02)


def test_embedding_lora_gives_the_padding_id_no_gradient_as_the_base_table_does():
    layer, ids = _layers()["embedding"]
    layer.update_layer("a", r=2, lora_alpha=4, init_lora_weights=False)
    layer.set_adapter(["a"])
    layer(ids).square().sum().backward()
    grad_a = layer.lora_embedding_A["a"].grad  # (r, num_embeddings)
    assert torch.count_nonzero(grad_a[:, 0]) == 0  # id 0 is the padding id, and it occurs twice
    assert torch.count_nonzero(grad_a[:, 3]) > 0 and torch.count_nonzero(grad_a[:, 5]) == 0


def test_deleting_an_active_adapter_leaves_the_others_active_and_in_use():
    layer, x = _layers()["linear"]
    for name in ("first", "second"):
        layer.update_layer(name, r=2, lora_alpha=4, init_lora_weights=False)
    layer.set_adapter(["first"])
    first_alone = layer(x)
    layer.set_adapter(["first", "second"])
    layer.delete_adapter("second")
    assert layer.active_adapters == ["first"] and "second" not in layer.lora_A
    assert torch.equal(layer(x), first_alone)
