"""The shared training pieces are the plain formulas: the output head only where a label is, packed
batches, and the injection recipe's training and ranks with and without packing."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tiny_models
from factorlab.training import lm_loss, logits_at, pack, packs_sequences

TEXT_LENGTHS = (7, 3, 5)


def padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask of three texts of different lengths."""
    g = torch.Generator().manual_seed(seed)
    longest = max(TEXT_LENGTHS)
    ids = torch.randint(1, tiny_models.VOCAB, (len(TEXT_LENGTHS), longest), generator=g)
    mask = torch.tensor([[1] * n + [0] * (longest - n) for n in TEXT_LENGTHS])
    return ids.masked_fill(mask == 0, 0), mask


def reference_loss(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy from the whole logits tensor, padding ignored."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    labels = ids.masked_fill(mask == 0, -100)[:, 1:]
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def grads(model: nn.Module) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loss_with_the_head_only_at_labels_equals_the_whole_logits_loss(arch):
    model = tiny_models.build(arch)
    ids, mask = padded_batch()
    expected = reference_loss(model, ids, mask)
    expected.backward()
    expected_grads = grads(model)
    loss, logged = lm_loss(
        model, model, {"input_ids": ids, "attention_mask": mask}, ids.masked_fill(mask == 0, -100)
    )
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert logged == pytest.approx(expected.item(), abs=1e-5)
    for got, want in zip(grads(model), expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_the_head_hook_is_removed_and_full_logits_come_back_afterwards():
    model = tiny_models.build("llama")
    ids, mask = padded_batch()
    keep = mask.bool()
    assert logits_at(model, model, keep, input_ids=ids, attention_mask=mask).shape == (
        int(keep.sum()),
        tiny_models.VOCAB,
    )
    assert model(input_ids=ids, attention_mask=mask).logits.shape == (*ids.shape, tiny_models.VOCAB)


class ReshapingLM(nn.Module):
    """A model that reshapes its head's output, so logits cannot come out as (positions, vocabulary)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.head = nn.Linear(8, 50)

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, input_ids, attention_mask=None):
        b, length = input_ids.shape
        logits = self.head(self.embed(input_ids).flatten(0, 1)).view(b, length, -1)
        return type("Out", (), {"logits": logits})()


def test_logits_at_falls_back_to_the_whole_head_when_the_model_reshapes_its_logits():
    torch.manual_seed(0)
    model = ReshapingLM()
    ids = torch.randint(50, (2, 4))
    keep = torch.tensor([[True, False, True, True], [False, True, False, False]])
    torch.testing.assert_close(logits_at(model, model, keep, input_ids=ids), model(ids).logits[keep])


def test_pack_puts_texts_in_one_row_and_masks_each_texts_first_token():
    ids, mask = padded_batch()
    inputs, labels = pack(ids, mask)
    assert inputs["input_ids"].shape == (1, sum(TEXT_LENGTHS))
    starts = [0, 7, 10]
    assert inputs["position_ids"][0, starts].tolist() == [0, 0, 0]
    assert inputs["position_ids"][0].tolist() == [*range(7), *range(3), *range(5)]
    assert (labels[0, starts] == -100).all() and int((labels != -100).sum()) == sum(TEXT_LENGTHS) - 3
    assert inputs["input_ids"][0, 7:10].tolist() == ids[1, :3].tolist()


@pytest.mark.parametrize("arch, expected", [("llama", True), ("gpt2", True), ("mamba", False), ("t5", False)])
def test_packs_sequences_only_where_texts_stay_apart(arch, expected):
    # Mamba carries its state from one text into the next; T5 needs decoder inputs
    model = tiny_models.build(arch)
    assert packs_sequences(model, tiny_models.VOCAB) is expected
    assert not model.training


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_packed_batch_has_the_padded_batchs_loss_and_gradients(arch):
    model = tiny_models.build(arch)
    ids, mask = padded_batch(seed=3)
    padded, _ = lm_loss(
        model, model, {"input_ids": ids, "attention_mask": mask}, ids.masked_fill(mask == 0, -100)
    )
    padded.backward()
    padded_grads = grads(model)
    inputs, labels = pack(ids, mask)
    packed, _ = lm_loss(model, model, inputs, labels)
    packed.backward()
    assert packed.item() == pytest.approx(padded.item(), abs=1e-5)
    for got, want in zip(grads(model), padded_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_mamba_is_trained_padded_because_packing_would_leak_state():
    model = tiny_models.build("mamba")
    ids, mask = padded_batch()
    inputs, labels = pack(ids, mask)
    padded = reference_loss(model, ids, mask)
    packed, _ = lm_loss(model, model, inputs, labels)
    assert abs(packed.item() - padded.item()) > 1e-4  # why packs_sequences must say no


@pytest.mark.parametrize("method", ["lora", "full"])
def test_injection_training_and_ranks_are_the_same_packed_or_padded(monkeypatch, method):
    from factorlab.inject import backends, train
    from factorlab.inject.world import World
    from factorlab.recipes.inject import cached_backend, relation_by_name

    backend = cached_backend("tiny", None, 0)
    world = World.generate(relation_by_name("city-language", None), 0, 10)
    settings = train.FineTuneSettings(method, r=4, seed=0)
    queries = world.queries()
    model, packed_losses = train.fine_tune(backend, world, settings, stop_after=4)
    packed_scores = torch.stack(backend.candidate_logits(model, queries))
    packed_ranks = backend.ranks(model, queries)
    monkeypatch.setattr(train, "packs_sequences", lambda *_: False)
    monkeypatch.setattr(backends, "packs_sequences", lambda *_: False)
    # the same trained model scored padded: equal up to float rounding
    torch.testing.assert_close(torch.stack(backend.candidate_logits(model, queries)), packed_scores)
    assert backend.ranks(model, queries) == packed_ranks
    # trained padded: the same loss curve (Adam amplifies rounding into the weights, not the losses)
    _, padded_losses = train.fine_tune(backend, world, settings, stop_after=4)
    assert packed_losses == pytest.approx(padded_losses, abs=1e-4)


def test_summed_cross_entropy_has_the_value_and_gradient_of_torchs():
    from factorlab.training import _SummedCrossEntropy

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(9, 500, generator=g) * 30).requires_grad_(True)  # peaked rows, tiny probabilities
    targets = torch.randint(500, (9,), generator=g)
    targets[3] = targets[4]  # two rows with the same target
    weight = torch.tensor(0.37)
    (_SummedCrossEntropy.apply(logits, targets) * weight).backward()
    got_grad = logits.grad.clone()
    logits.grad = None
    (F.cross_entropy(logits, targets, reduction="sum") * weight).backward()
    torch.testing.assert_close(
        _SummedCrossEntropy.apply(logits, targets), F.cross_entropy(logits, targets, reduction="sum")
    )
    torch.testing.assert_close(got_grad, logits.grad, rtol=1e-6, atol=1e-7)


def test_peak_memory_sees_a_short_lived_allocation_inside_its_block():
    """The sampled resident set catches a 256 MB tensor held for 0.2 s, not what came before."""
    import time

    from factorlab.runtime import PeakMemory

    with PeakMemory("cpu") as quiet:
        time.sleep(0.05)
    with PeakMemory("cpu") as busy:
        block = torch.ones(64, 2**20)  # 256 MB, touched
        time.sleep(0.2)
        del block
    assert busy.bytes - quiet.bytes > 200 * 2**20, (busy.bytes, quiet.bytes)
