"""Routing semantics, each against a plain reference written from the paper's equations: the
efficient expert bank, hard/soft/top-k/uniform routing with temperature, the routing loss (and
that it reaches out.loss exactly once), task ids in generate, and the OCR hallucination rate."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from factorlab import ConfigError, LoraMixerConfig, adapt
from factorlab.layers.mixer import ExpertBank, RoutingState, route, routing_aux_loss
from factorlab.methods.lora_mixer import set_routing
from factorlab.training import lm_loss
from tiny_models import build, inputs

torch.set_num_threads(1)


def reference_weights(logits, routing, temperature, top_k, task_ids, tokens):
    """Routing weights token by token, as the method describes them."""
    n, E = logits.shape
    rows = []
    for t in range(n):
        if task_ids is not None:
            w = [0.0] * E
            w[int(task_ids[t // tokens])] = 1.0
        elif routing == "uniform":
            w = [1.0 / E] * E
        else:
            z = [float(v) / temperature for v in logits[t]]
            m = max(z)
            p = [math.exp(v - m) for v in z]
            p = [v / sum(p) for v in p]
            if routing == "topk" and top_k < E:
                keep = sorted(range(E), key=lambda e: -p[e])[:top_k]
                total = sum(p[e] for e in keep)
                p = [p[e] / total if e in keep else 0.0 for e in range(E)]
            w = p
        rows.append(w)
    return torch.tensor(rows, dtype=torch.float64)


@settings(max_examples=60, deadline=None)
@given(
    ranks=st.lists(st.integers(0, 4), min_size=1, max_size=4).filter(lambda r: max(r) > 0),
    routing=st.sampled_from(["soft", "topk", "hard", "uniform"]),
    temperature=st.sampled_from([0.25, 1.0, 3.0]),
    top_k=st.integers(1, 4),
    batch=st.integers(1, 3),
    tokens=st.integers(1, 3),
    seed=st.integers(0, 1000),
)
def test_expert_bank_and_routing_equal_a_plain_per_expert_loop(
    ranks, routing, temperature, top_k, batch, tokens, seed
):
    g = torch.Generator().manual_seed(seed)
    E, d_in, d_out = len(ranks), 5, 3
    top_k = min(top_k, E)
    scalings = [0.5 + e for e in range(E)]
    bank = ExpertBank(d_in, d_out, ranks, scalings).double()
    with torch.no_grad():
        bank.A.normal_(generator=g)
        bank.B.normal_(generator=g)
    x = torch.randn(batch * tokens, d_in, generator=g, dtype=torch.float64)
    logits = torch.randn(batch * tokens, E, generator=g, dtype=torch.float64)
    task_ids = torch.randint(0, E, (batch,), generator=g) if routing == "hard" else None
    state = RoutingState(E, routing, top_k, temperature, task_ids=task_ids)
    weights = route(logits, state, batch, tokens).double()
    expected_w = reference_weights(logits, routing, temperature, top_k, task_ids, tokens)
    torch.testing.assert_close(weights, expected_w, atol=1e-6, rtol=0)
    expected = torch.zeros(batch * tokens, d_out, dtype=torch.float64)
    for e, r in enumerate(ranks):  # each expert alone, its own rank, no padding
        if r:
            a, b = bank.A[e, :r].detach(), bank.B[e, :, :r].detach()
            expected += weights[:, e : e + 1] * scalings[e] * (x @ a.T @ b.T)
    torch.testing.assert_close(bank(x, weights).detach(), expected, atol=1e-9, rtol=1e-9)


def reference_aux(records, routing, balance, specialization):
    """alpha * sum_i pbar_i fbar_i + lambda * mean token entropy, averaged over the layer calls; fbar
    counts each token's top-1 expert under soft routing and its renormalised top-k weights under topk."""
    terms = []
    for probs, weights, _ in records:
        E = probs.shape[-1]
        assigned = weights if routing == "topk" else F.one_hot(probs.argmax(-1), E).double()
        pbar, fbar = probs.mean(0), assigned.mean(0)
        entropy = -(probs * probs.log()).sum(-1).mean()
        terms.append(balance * float((pbar * fbar).sum()) + specialization * float(entropy))
    return sum(terms) / len(terms)


@settings(max_examples=40, deadline=None)
@given(routing=st.sampled_from(["soft", "topk"]), top_k=st.integers(1, 3), seed=st.integers(0, 1000))
def test_routing_loss_equals_the_reference(routing, top_k, seed):
    g = torch.Generator().manual_seed(seed)
    E, temperature = 4, 0.7
    state = RoutingState(E, routing, top_k, temperature)
    for _ in range(3):  # three layer calls
        logits = torch.randn(6, E, generator=g, dtype=torch.float64) * 2
        probs = torch.softmax(logits / temperature, -1)
        state.records.append((probs, route(logits, state, 2, 3).double(), 3))
    got = routing_aux_loss(state, 0.3, 0.05)
    # rel 1e-6: factorlab keeps the top-k weights in float32
    assert math.isclose(float(got), reference_aux(state.records, routing, 0.3, 0.05), rel_tol=1e-6)


def mixer(routing="soft", **kwargs):
    torch.manual_seed(0)
    config = LoraMixerConfig(
        num_experts=3,
        r=4,
        lora_alpha=64,
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
        routing=routing,
        init_lora_weights=False,
        **kwargs,
    )
    return adapt(build("llama"), config)


def test_routing_loss_reaches_out_loss_exactly_once():
    adapted = mixer("topk", balance_coef=0.5, specialization_coef=0.2)
    adapted.train()
    batch = inputs("llama")
    labels = batch["input_ids"]
    out = adapted(**batch, labels=labels)
    ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
    aux = adapted.last_aux_loss
    records = adapted.shared_adapter_weights["default"].routing.records
    expected_aux = reference_aux(
        [(p.detach().double(), w.double(), t) for p, w, t in records], "topk", 0.5, 0.2
    )
    assert math.isclose(float(aux), expected_aux, rel_tol=1e-5) and float(aux) > 1e-3
    torch.testing.assert_close(out.loss, ce + aux)
    # a loop that computes its own loss (factorlab's training loop) adds it once as well
    loss, _ = lm_loss(adapted, adapted, batch, labels)
    ce_again = (
        F.cross_entropy(
            adapted(**batch).logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), reduction="sum"
        )
        / labels[:, 1:].numel()
    )
    torch.testing.assert_close(loss, ce_again + adapted.last_aux_loss, rtol=1e-5, atol=1e-6)
    adapted.eval()  # no routing loss outside training
    evaluated = adapted(**batch, labels=labels)
    assert adapted.last_aux_loss is None
    torch.testing.assert_close(evaluated.loss, ce)


def test_temperature_and_topk_change_what_the_mixer_computes():
    batch = inputs("llama")
    adapted = mixer("soft").eval()
    soft = adapted(**batch).logits
    set_routing(adapted, "soft", temperature=0.2)
    sharp = adapted(**batch).logits
    assert not torch.allclose(soft, sharp, atol=1e-4)
    set_routing(adapted, "topk", top_k=1, temperature=1.0)
    top1 = adapted(**batch).logits
    assert not torch.allclose(soft, top1, atol=1e-4)


def test_generate_follows_the_task_ids():
    """Hard-routed generation uses each sample's own expert: it equals greedy decoding by forward
    with the same task id, and differs between task ids."""
    adapted = mixer("soft").eval()
    prompt = inputs("llama")["input_ids"][:1, :6]
    outs = []
    for task in range(3):
        ids = torch.tensor([task])
        generated = adapted.generate(prompt, task_ids=ids, max_new_tokens=5, do_sample=False)
        manual = prompt
        for _ in range(5):
            nxt = adapted(input_ids=manual, task_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            manual = torch.cat([manual, nxt], dim=1)
        assert torch.equal(generated, manual), task
        outs.append(generated)
    assert len({tuple(o[0].tolist()) for o in outs}) > 1  # the experts differ, so do the generations


def test_hallucination_rate_counts_only_subjects_whose_truth_differs_from_the_group():
    from factorlab.ocr.task import SPLITS
    from factorlab.ocr.train import _evaluate

    test_impl = SPLITS.index("test_impl")
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    groups = torch.tensor([0, 1, 9, 9, 9, 9])  # subjects 0 and 1: the truth is the group's answer
    predicted = torch.tensor([0, 1, 9, 7, 7, 7])  # says the group's answer on 0, 1 and 2
    d = 10

    class Model(torch.nn.Module):
        def forward(self, tokens):
            return F.one_hot(predicted, d).float().unsqueeze(0) * 5.0

        def effective_w_ov(self):
            return torch.eye(d).unsqueeze(0)

    ev = SimpleNamespace(labels=labels, group_labels=groups, split=torch.full((6,), test_impl))
    row = _evaluate(Model(), torch.zeros(6, 1, dtype=torch.long), [ev])[0]
    assert row["hallucination_rate"] == 0.25  # 1 of the 4 subjects whose truth differs
    assert row["group_impl_rate"] == 0.5


def test_supervised_routing_term_is_the_cross_entropy_to_the_labels():
    from factorlab.layers.mixer import routing_label_loss

    g = torch.Generator().manual_seed(0)
    E, batch, tokens = 3, 2, 4
    probs = torch.softmax(torch.randn(batch * tokens, E, generator=g, dtype=torch.float64), -1)
    state = RoutingState(E, "soft", task_labels=torch.tensor([2, 0]))
    state.records = [(probs, probs, tokens), (None, probs, tokens)]  # a call without a router is skipped
    per_sample = probs.view(batch, tokens, E).mean(1)
    expected = -(math.log(per_sample[0, 2]) + math.log(per_sample[1, 0])) / 2
    assert math.isclose(float(routing_label_loss(state)), expected, rel_tol=1e-12)
    adapted = mixer("soft", route_label_coef=1.0, balance_coef=0.0, specialization_coef=0.0)
    adapted.train()
    batch_inputs = inputs("llama")
    adapted(**batch_inputs, task_labels=torch.tensor([1, 2]))
    with_labels = float(adapted.last_aux_loss)
    adapted(**batch_inputs)
    assert with_labels > 0 and float(adapted.last_aux_loss) == 0.0  # labels only act when given
    with pytest.raises(ConfigError, match="one task label per sample"):
        adapted(**batch_inputs, task_labels=torch.tensor([0, 1, 1]))


def test_padding_tokens_take_no_part_in_the_routing_losses():
    """The routing losses of a right-padded batch do not depend on what the padding holds, and equal
    the losses over the real tokens alone."""
    adapted = mixer("topk", balance_coef=0.5, specialization_coef=0.2, route_label_coef=0.3)
    adapted.train()
    batch = inputs("llama")
    mask = torch.ones_like(batch["input_ids"])
    mask[1, 7:] = 0  # the second sample has 7 real tokens
    labels = torch.tensor([0, 2])
    losses = []
    for pad in (5, 900):
        ids = batch["input_ids"].masked_fill(mask == 0, pad)
        adapted(input_ids=ids, attention_mask=mask, task_labels=labels)
        losses.append(float(adapted.last_aux_loss))
        state = adapted.shared_adapter_weights["default"].routing
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    # the same losses from the real rows only, by the reference formulas
    keep = mask.reshape(-1).bool()
    real = [(p.detach().double()[keep], w.double()[keep], t) for p, w, t in state.records]
    expected = reference_aux(real, "topk", 0.5, 0.2)
    label_ce = []
    for p, _, t in state.records:
        p = p.detach().double().view(2, t, -1)
        first, second = p[0].mean(0), p[1, :7].mean(0)  # each sample's real tokens
        label_ce.append(-(first[0].log() + second[2].log()) / 2)
    expected += 0.3 * float(sum(label_ce) / len(label_ce))
    assert losses[1] == pytest.approx(expected, rel=1e-5)
    # without the mask the padding would count: the check above can fail
    state.token_mask = None
    assert float(routing_aux_loss(state, 0.5, 0.2)) != pytest.approx(
        reference_aux(real, "topk", 0.5, 0.2), rel=1e-5
    )


def test_hard_routing_repeats_each_task_id_over_its_beams():
    """generate with num_beams / num_return_sequences multiplies the batch: sample i's id covers its
    consecutive copies; a batch that is no multiple of the ids is refused."""
    state = RoutingState(3, "soft", task_ids=torch.tensor([2, 0]))
    weights = route(None, state, batch=4, tokens=1)
    assert weights.argmax(-1).tolist() == [2, 2, 0, 0] and torch.equal(weights.sum(-1), torch.ones(4))
    with pytest.raises(ConfigError, match="task_ids has 2 entries but the batch has 3"):
        route(None, state, batch=3, tokens=1)


def test_supervised_routing_term_averages_each_sample_over_its_real_tokens_only():
    """Padding takes no part: a sample with one real token is that token's probabilities (not halved),
    and a batch/label mismatch names both counts."""
    from factorlab.layers.mixer import routing_label_loss

    g = torch.Generator().manual_seed(1)
    E, batch, tokens = 3, 2, 4
    probs = torch.softmax(torch.randn(batch * tokens, E, generator=g, dtype=torch.float64), -1)
    mask = torch.tensor([[True, False, False, False], [True, True, True, False]])
    state = RoutingState(E, "soft", task_labels=torch.tensor([1, 2]), token_mask=mask)
    state.records = [(probs, probs, tokens)]
    p = probs.view(batch, tokens, E)
    expected = -(math.log(p[0, 0, 1]) + math.log(p[1, :3, 2].mean())) / 2
    assert math.isclose(float(routing_label_loss(state)), expected, rel_tol=1e-12)
    state.task_labels = torch.tensor([1, 2, 0])
    message = r"^task_labels has 3 entries but the batch has 2 samples; give one task label per sample\.$"
    with pytest.raises(ConfigError, match=message):
        routing_label_loss(state)


def test_recorded_router_probabilities_use_the_temperature_and_task_ids_skip_the_router():
    adapted = mixer("soft", balance_coef=0.5, specialization_coef=0.2)
    set_routing(adapted, "soft", temperature=3.0)
    adapted.train()
    router_logits = []
    routers = [m for n, m in adapted.named_modules() if "router" in n and isinstance(m, torch.nn.Linear)]
    for router in routers:
        router.register_forward_hook(lambda module, args, out: router_logits.append(out.detach()))
    batch = inputs("llama")
    adapted(**batch)
    records = adapted.shared_adapter_weights["default"].routing.records
    assert len(records) == len(router_logits) > 0
    for (probs, _, _), logits in zip(records, router_logits):
        torch.testing.assert_close(probs.detach(), torch.softmax(logits.float() / 3.0, dim=-1))
    router_logits.clear()
    adapted(**batch, task_ids=torch.tensor([0, 1]))  # routed by id: no router call, nothing to balance
    assert router_logits == [] and float(adapted.last_aux_loss) == 0.0


def test_expert_bank_shapes_init_and_refusals():
    with pytest.raises(ConfigError, match=r"^a LoRA-Mixer needs at least one expert\.$"):
        ExpertBank(8, 6, [], [])
    for ranks, bad in (([2, -1], "-1"), ([2, 1.5], "1.5"), ([2, "3"], "'3'")):
        with pytest.raises(
            ConfigError, match=rf"^expert 1: rank must be a non-negative integer, got {bad}\.$"
        ):
            ExpertBank(8, 6, ranks, [1.0, 1.0])
    ones = ExpertBank(8, 6, [1, 1], [1.0, 1.0])
    assert ones.A.shape == (2, 1, 8) and ones.B.shape == (2, 6, 1)  # padded to the largest rank, no more
    assert ones.B.abs().max() == 0  # PEFT's default init: B = 0, so the experts start as the base model
    torch.manual_seed(0)
    gaussian = ExpertBank(64, 6, [4, 0], [1.0, 1.0], init_lora_weights="gaussian")
    assert 0.2 < float(gaussian.A[0].std()) < 0.3  # N(0, 1/r), r = 4
    assert gaussian.A[1].abs().max() == 0 and float(gaussian.scaling[1]) == 0.0  # rank 0: no LoRA here
    double = ExpertBank(8, 6, [2], [0.5], dtype=torch.float64)
    assert double.A.dtype == double.B.dtype == double.rank_mask.dtype == double.scaling.dtype == torch.float64
