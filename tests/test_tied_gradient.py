"""A trainable tied embedding's gradient inside ``tied_embedding_gradient`` (the training loop's CPU
path for full fine-tuning): bit-equal to autograd's, written into one buffer reused across steps."""

from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tiny_models
from factorlab.layers.tied import tied_embedding_gradient


def repeated_ids(seed: int = 0) -> torch.Tensor:
    """(2, 10) ids from a small range, so ids repeat within the batch (their rows must add up)."""
    return torch.randint(1, 12, (2, 10), generator=torch.Generator().manual_seed(seed))


def backward(model: nn.Module, ids: torch.Tensor) -> None:
    torch.manual_seed(5)  # the same dropout masks in both runs (GPT-2 trains with dropout)
    logits = model(input_ids=ids).logits
    F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()


def gradients(model: nn.Module, ids: torch.Tensor, context) -> tuple[bool, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with context as covered:
        backward(model, ids)
    return covered, {name: p.grad.clone() for name, p in model.named_parameters()}


TIED_MODELS = [
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {"tie_word_embeddings": True, "pad_token_id": 3}),
    ("gpt2", {}),
]


@pytest.mark.parametrize("arch, overrides", TIED_MODELS)
def test_gradients_are_bit_equal_to_autograds_and_nothing_is_left_patched(arch, overrides):
    model = tiny_models.build(arch, **overrides).train()
    ids = repeated_ids()
    ids[0, :2] = 3  # the padding id where the model has one: autograd gives its lookups no gradient
    _, expected = gradients(model, ids, nullcontext())
    covered, got = gradients(model, ids, tied_embedding_gradient(model))
    assert covered is True
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    embedding = model.get_input_embeddings()
    assert "forward" not in vars(embedding) and "forward" not in vars(model.get_output_embeddings())


def test_gradients_add_up_over_backward_passes_and_one_buffer_serves_every_step():
    model = tiny_models.build("llama", tie_word_embeddings=True).train()
    weight = model.get_input_embeddings().weight
    expected = []
    model.zero_grad(set_to_none=True)
    for seed in (0, 1):  # two backward passes, no zeroing between: the gradients accumulate
        backward(model, repeated_ids(seed))
        expected.append(weight.grad.clone())
    model.zero_grad(set_to_none=True)
    with tied_embedding_gradient(model):
        backward(model, repeated_ids(0))
        assert torch.equal(weight.grad, expected[0])
        backward(model, repeated_ids(1))
        torch.testing.assert_close(weight.grad, expected[1], rtol=1e-6, atol=1e-7)  # other order of adds
        buffer = weight.grad.data_ptr()
        model.zero_grad(set_to_none=True)
        backward(model, repeated_ids(0))
        assert weight.grad.data_ptr() == buffer  # the next step writes into the same memory
        assert torch.equal(weight.grad, expected[0])


def test_a_training_run_ends_with_the_same_weights_with_or_without_it(monkeypatch):
    from factorlab import training

    def train(context) -> list[torch.Tensor]:
        monkeypatch.setattr(training, "tied_embedding_gradient", context)
        model = tiny_models.build("llama", tie_word_embeddings=True)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)

        def batch(step: int):
            ids = repeated_ids(step)
            return {"input_ids": ids}, ids, {}

        training.run_training(model, optimizer, 4, batch)
        return [p.detach().clone() for p in model.parameters()]

    plain = train(lambda model: nullcontext(False))
    reused = train(tied_embedding_gradient)
    assert all(torch.equal(a, b) for a, b in zip(plain, reused))


@pytest.mark.parametrize("case", ["untied", "frozen", "sparse", "max_norm"])
def test_other_embeddings_are_left_to_autograd(case):
    model = tiny_models.build("llama", tie_word_embeddings=case != "untied").train()
    embedding = model.get_input_embeddings()
    if case == "frozen":
        embedding.weight.requires_grad_(False)
    elif case == "sparse":
        embedding.sparse = True
    elif case == "max_norm":
        embedding.max_norm = 1.0
    with tied_embedding_gradient(model) as covered:
        assert covered is False
        assert "forward" not in vars(embedding)


def test_the_lookup_alone_writes_the_gradient_when_the_head_is_not_used():
    model = tiny_models.build("llama", tie_word_embeddings=True, pad_token_id=3).train()
    ids = repeated_ids()
    ids[1, :3] = 3

    def body_gradient(context) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        with context:
            model.model(input_ids=ids).last_hidden_state.square().sum().backward()
        return model.get_input_embeddings().weight.grad.clone()

    expected = body_gradient(nullcontext())
    assert not expected[3].any() and expected[ids[0, 0]].any()
    assert torch.equal(body_gradient(tied_embedding_gradient(model)), expected)


class Accessors(nn.Module):
    """An embedding and a head sharing one weight, with as many of Hugging Face's accessors as asked."""

    def __init__(self, accessors: tuple[str, ...], head: nn.Module | None = None, embedding=nn.Embedding):
        super().__init__()
        self.embedding = embedding(10, 4)
        self.head = head if head is not None else nn.Linear(4, 10, bias=False)
        self.head.weight = self.embedding.weight
        if "input" in accessors:
            self.get_input_embeddings = lambda: self.embedding
        if "output" in accessors:
            self.get_output_embeddings = lambda: self.head


class TiedLinear(nn.Linear):
    pass


class TiedEmbedding(nn.Embedding):
    pass


@pytest.mark.parametrize(
    "model",
    [
        Accessors(()),
        Accessors(("input",)),
        Accessors(("output",)),
        Accessors(("input", "output"), head=TiedLinear(4, 10, bias=False)),
        Accessors(("input", "output"), embedding=TiedEmbedding),
    ],
    ids=["no accessors", "input only", "output only", "head a Linear subclass", "an Embedding subclass"],
)
def test_models_without_both_accessors_or_with_other_modules_are_left_alone(model):
    with tied_embedding_gradient(model) as covered:
        assert covered is False
        assert "forward" not in vars(model.embedding) and "forward" not in vars(model.head)


@pytest.mark.parametrize("patched", ["embedding", "head"])
def test_a_forward_someone_else_patched_is_left_in_place(patched):
    model = Accessors(("input", "output"))
    with tied_embedding_gradient(model) as covered:
        assert covered is True  # the plain pair is covered
    other = getattr(model, patched)
    own = other.forward
    other.forward = own
    with tied_embedding_gradient(model) as covered:
        assert covered is False
        assert vars(other)["forward"] is own
