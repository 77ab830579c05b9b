"""Frozen linear layers inside ``transposed_frozen_weights`` (the training loop's CPU fast path): the
same outputs and gradients as the plain modules, up to float rounding, and no trace afterwards."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tiny_models
from factorlab.layers import LoRALinear
from factorlab.layers.frozen import transposed_frozen_weights, transposed_weight

pytestmark = pytest.mark.filterwarnings("error")  # e.g. torch resizing a GEMM's out= tensor


def grads(model: nn.Module) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return out


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, tiny_models.VOCAB, (3, 7), generator=g)
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [1] * 5 + [0] * 2])
    return ids.masked_fill(mask == 0, 0), mask


def lora_llama() -> nn.Module:
    """A tiny Llama with LoRA on every linear layer, B random so that every factor gets a gradient."""
    from factorlab import LoraConfig, adapt

    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    return adapt(tiny_models.build("llama"), config)


def loss_and_grads(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor):
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds, attention_mask=mask).logits[:, :-1]
    labels = ids.masked_fill(mask == 0, -100)[:, 1:]
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss.backward()
    return loss.detach(), [*grads(model), embeds.grad]


def test_transposed_frozen_weights_give_the_same_loss_and_gradients_and_leave_no_trace():
    model = lora_llama()
    frozen = [m for m in model.modules() if type(m) is nn.Linear and not m.weight.requires_grad]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    own_forward = [m for m in model.modules() if "forward" in vars(m)]  # the adapted model's wrapper
    ids, mask = padded_batch()
    want_loss, want_grads = loss_and_grads(model, ids, mask)
    with transposed_frozen_weights(model) as covered:
        assert covered == len(frozen) > 0  # every base layer, the tied head included
        assert all("forward" in vars(m) for m in frozen)
        got_loss, got_grads = loss_and_grads(model, ids, mask)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    assert len(got_grads) == len(want_grads) > 2  # LoRA factors and the input embeddings
    # Another GEMM layout rounds differently: entries that are sums with cancellation differ relatively
    # most (7e-5 with SSE kernels), so the margin scales with each tensor. Measured (AVX-512 / AVX2 / SSE):
    # ||got - want|| / ||want|| up to 5.7e-7 / 4.8e-7 / 8.5e-7, max |got - want| / max |want| up to
    # 7.0e-7 / 5.8e-7 / 1.2e-6.
    for got, want in zip(got_grads, want_grads, strict=True):
        scale = float(want.abs().max())
        assert scale > 0 and float((got - want).norm() / want.norm()) < 1e-5
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * scale)
    assert [m for m in model.modules() if "forward" in vars(m)] == own_forward
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_transposed_frozen_weights_follow_an_in_place_change_of_the_weight():
    layer = nn.Linear(6, 5).requires_grad_(False)
    x = torch.randn(3, 6)
    with transposed_frozen_weights(layer):
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
        with torch.no_grad():
            layer.weight.mul_(-2.0)  # as merging an adapter into the base weight does
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
        layer.weight.data = torch.randn(5, 6)  # new storage, as merging and unmerging do
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
        for _ in range(3):  # new tensors, the old ones freed: their ids may come back
            layer.weight = nn.Parameter(torch.randn(5, 6), requires_grad=False)
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_transposed_frozen_weights_leave_trainable_layers_to_autograd():
    trainable = nn.Linear(6, 5)
    bias_trains = nn.Linear(6, 5)
    bias_trains.weight.requires_grad_(False)
    double = nn.Linear(6, 5).double().requires_grad_(False)
    model = nn.ModuleList([trainable, bias_trains, double])
    x = torch.randn(3, 6)
    with transposed_frozen_weights(model) as covered:
        assert covered == 1  # only the frozen float32 layer; trainable and float64 ones as they are
        bias_trains(x).sum().backward()  # its bias trains: the plain path, so the bias gets its gradient
        trainable(x).sum().backward()
    torch.testing.assert_close(bias_trains.bias.grad, torch.full((5,), 3.0))
    torch.testing.assert_close(trainable.weight.grad, x.sum(0).expand(5, 6))


def lora_layer(bias: bool, r: int, alpha: float, adapters: int = 1, **options) -> LoRALinear:
    torch.manual_seed(r + adapters)
    layer = LoRALinear(nn.Linear(12, 10, bias=bias).requires_grad_(False))
    for i in range(adapters):
        layer.update_layer(f"a{i}", r=r, lora_alpha=alpha, init_lora_weights=False, **options)
    layer.set_adapter([f"a{i}" for i in range(adapters)])
    return layer


def output_and_grads(layer: LoRALinear, x: torch.Tensor):
    x = x.detach().requires_grad_(True)
    y = layer(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), [x.grad, *grads(layer)], type(y.grad_fn).__name__


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("r, alpha", [(4, 8.0), (1, 3.0), (3, 5.0)])  # scalings 2, 3 and 5/3
def test_a_lora_layer_on_a_frozen_base_is_one_node_with_the_modules_outputs_and_gradients(bias, r, alpha):
    layer = lora_layer(bias, r, alpha)
    x = torch.randn(2, 5, 12)
    want_y, want_grads, plain_node = output_and_grads(layer, x)
    with transposed_frozen_weights(layer):
        got_y, got_grads, node = output_and_grads(layer, x)
    assert node == "_LoRAOnFrozenBackward" and plain_node != node
    torch.testing.assert_close(got_y, want_y, rtol=1e-6, atol=1e-6)
    assert len(got_grads) == len(want_grads) == 3  # x, A, B
    for got, want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "options", [{"adapters": 2}, {"use_dora": True}, {"lora_dropout": 0.5}], ids=["two", "dora", "dropout"]
)
def test_lora_layers_the_one_node_does_not_cover_take_the_module_path(options):
    layer = lora_layer(True, 2, 4.0, **options)
    layer.eval()  # dropout off, so the two paths are comparable
    x = torch.randn(4, 12)
    want_y, want_grads, _ = output_and_grads(layer, x)
    with transposed_frozen_weights(layer):
        got_y, got_grads, node = output_and_grads(layer, x)
    assert node != "_LoRAOnFrozenBackward"
    torch.testing.assert_close(got_y, want_y, rtol=1e-6, atol=1e-6)
    for got, want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_outputs_can_be_added_to_in_place_with_correct_gradients():
    # LoRA-Mixer and X-LoRA layers add their experts' output into the base output in place
    layer = lora_layer(True, 2, 4.0)
    plain = nn.Linear(12, 10).requires_grad_(False)
    x = torch.randn(3, 4, 12)
    extra = torch.randn(3, 4, 10, requires_grad=True)

    def run():
        inputs = x.detach().requires_grad_(True)
        y = layer(inputs)
        y += extra  # in place, grad mode on
        z = plain(inputs)
        z.mul_(2.0)
        (y.square().sum() + z.sum()).backward()
        return [inputs.grad, extra.grad.clone(), *grads(layer)]

    want = run()
    extra.grad = None
    with transposed_frozen_weights(nn.ModuleList([layer, plain])):
        got = run()
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_the_copy_is_made_once_and_plain_layers_run_through_it():
    layer = nn.Linear(6, 5).requires_grad_(False)
    x = torch.randn(3, 6, requires_grad=True)
    assert transposed_weight(layer, x) is None  # outside the block
    with transposed_frozen_weights(layer):
        first = transposed_weight(layer, x)
        assert first is transposed_weight(layer, x)  # cached, not copied per call
        torch.testing.assert_close(first, layer.weight.T)
        assert first.is_contiguous()
        assert type(layer(x).grad_fn).__name__ == "_FrozenLinearBackward"
        assert transposed_weight(layer, x.double()) is None  # another dtype: the plain path


@pytest.mark.parametrize("frozen", ["lora_A", "lora_B", "input"])
def test_one_node_gradients_when_only_some_inputs_need_them(frozen):
    layer = lora_layer(False, 3, 6.0)
    x = torch.randn(5, 12)

    def run():
        inputs = x.clone().requires_grad_(frozen != "input")
        if frozen != "input":
            getattr(layer, frozen)["a0"].requires_grad_(False)
        layer(inputs).square().sum().backward()
        got = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
        layer.zero_grad(set_to_none=True)
        return inputs.grad, got

    want_x, want = run()
    with transposed_frozen_weights(layer):
        got_x, got = run()
    assert got.keys() == want.keys() and len(got) == (2 if frozen == "input" else 1)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    if frozen == "input":
        assert got_x is None and want_x is None
    else:
        torch.testing.assert_close(got_x, want_x, rtol=1e-5, atol=1e-6)
