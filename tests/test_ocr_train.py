import dataclasses

import pytest
import torch

from factorlab.errors import ConfigError, TrainingDivergedError
from factorlab.ocr.model import BatchedAttentionOnly
from factorlab.ocr.train import OCRConfig, train_batched, train_runs


def reference_logits(tokens, w_kq, w_o=None, w_v=None, w_ov=None):
    """The paper's formula, literally: f(X) = W_O W_V^T X^T X W_KQ x_T with one-hot X."""
    d = w_kq.shape[0]
    out = []
    for seq in tokens:
        X = torch.nn.functional.one_hot(seq, d).double()
        w = w_ov if w_ov is not None else w_o @ w_v.T
        out.append(w @ X.T @ X @ w_kq @ X[-1])
    return torch.stack(out)


@pytest.mark.parametrize("param", ["factorized", "combined"])
def test_batched_forward_equals_the_papers_formula(param):
    model = BatchedAttentionOnly(24, param, 5, seeds=[0, 1, 2]).double()
    tokens = torch.randint(0, 24, (3, 7, 9))
    logits = model(tokens)
    for r in range(3):
        weights = {"w_kq": model.w_kq[r].detach()}
        if param == "factorized":
            weights |= {"w_o": model.w_o[r].detach(), "w_v": model.w_v[r].detach()}
        else:
            weights |= {"w_ov": model.w_ov[r].detach()}
        torch.testing.assert_close(
            logits[r].detach(), reference_logits(tokens[r], **weights), rtol=1e-10, atol=1e-10
        )


def test_runs_initialise_from_their_own_seed_only():
    alone = BatchedAttentionOnly(16, "factorized", 4, seeds=[7])
    batched = BatchedAttentionOnly(16, "factorized", 4, seeds=[3, 7])
    assert torch.equal(alone.w_o[0], batched.w_o[1]) and torch.equal(alone.w_kq[0], batched.w_kq[1])
    assert not torch.equal(batched.w_o[0], batched.w_o[1])


def test_identity_init_matches_the_paper():
    m = BatchedAttentionOnly(8, "factorized", 8, seeds=[0], init="identity")
    assert torch.equal(m.w_v[0], 1e-4 * torch.eye(8))
    assert torch.equal(m.w_o[0], torch.full((8, 8), 1e-4)) and torch.equal(
        m.w_kq[0], torch.full((8, 8), 1e-4)
    )


def test_factorized_generalizes_and_combined_does_not():
    """The paper's central claim at its default settings, seed 42, 2,000 steps."""
    factorized, combined = train_runs([OCRConfig(), OCRConfig(param="combined")])
    for result in (factorized, combined):
        assert result.summary["train_fact_acc"] >= 0.99
        assert result.summary["train_impl_acc"] >= 0.99
        assert result.summary["test_fact_acc"] >= 0.99
    assert factorized.summary["test_impl_acc"] >= 0.9
    assert combined.summary["test_impl_acc"] <= 0.2
    assert combined.summary["test_impl_loss"] > 2.5  # near chance, log 20 = 3.0


def test_spurious_association_turns_the_same_generalization_into_hallucination():
    result = train_batched([OCRConfig(steps=600, association="spurious")])[0]
    assert result.summary["hallucination_rate"] >= 0.9
    assert result.summary["test_impl_acc"] <= 0.2
    assert result.summary["train_impl_acc"] >= 0.99


@pytest.mark.parametrize("optimizer", ["adamw", "gd"])
def test_batched_training_gives_the_same_numbers_as_single_runs(optimizer):
    base = OCRConfig(
        d_h=8, steps=120, eval_every=40, optimizer=optimizer, lr=5e-3 if optimizer == "adamw" else 0.5
    )
    configs = [dataclasses.replace(base, seed=s) for s in (0, 1, 2)]
    configs.append(dataclasses.replace(base, seed=1, association="spurious"))
    batched = train_batched(configs)
    for config, together in zip(configs, batched):
        alone = train_batched([config])[0]
        assert len(alone.history) == len(together.history) == 4
        for a, b in zip(alone.history, together.history):
            for key, value in a.items():
                if value is None:
                    assert b[key] is None
                else:
                    assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
        torch.testing.assert_close(alone.w_ov, together.w_ov, rtol=1e-4, atol=1e-5)
    # different seeds really are different runs
    assert batched[0].summary["nuclear_norm"] != pytest.approx(batched[1].summary["nuclear_norm"], rel=1e-6)


TEXTBOOK_CASES = [
    ("factorized", "adamw", {}),
    ("combined", "adamw", {}),
    ("factorized", "gd", {}),
    ("factorized", "adamw", {"groups": 3, "subjects_per_group": 3, "noise_tokens": 2, "seq_len": 7,
                             "association": "spurious", "init": "identity", "d_h": 5}),
    ("factorized", "gd", {"fixed_attention": True, "weight_decay": 0.0}),
    ("combined", "adamw", {"noise_tokens": 0, "seq_len": 3, "fixed_attention": True}),
]  # fmt: skip


@pytest.mark.parametrize(("param", "optimizer", "extra"), TEXTBOOK_CASES)
def test_training_equals_a_textbook_autograd_loop_over_every_weight(param, optimizer, extra):
    """train_batched (hand-written gradients on the reachable slices, the other entries' decay applied
    lazily) against autograd + torch.optim over every whole weight, on the same data stream."""
    import torch.nn.functional as F

    from factorlab.ocr.task import OCRWorld
    from factorlab.ocr.train import DATA_CHUNK_STEPS, EVAL_SAMPLES_PER_SUBJECT, _evaluate
    from factorlab.runtime import generator

    lr = 5e-3 if optimizer == "adamw" else 0.5
    options = {"d_h": None if param == "combined" else 8, **extra}
    configs = [OCRConfig(param=param, steps=130, eval_every=50, optimizer=optimizer, lr=lr, seed=s, **options)
               for s in (3, 4)]  # fmt: skip
    ours = train_batched(configs)

    cfg = configs[0]
    worlds = [OCRWorld(cfg.task, s) for s in (3, 4)]
    attention = None
    if cfg.fixed_attention:
        attention = torch.cat([worlds[0].subjects, torch.tensor([0, 1])])
    model = BatchedAttentionOnly(cfg.task.vocab_size, param, cfg.hidden_dim, [3, 4], cfg.init, attention)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adamw":
        reference = torch.optim.AdamW(trainable, lr=lr, weight_decay=cfg.weight_decay)
    else:
        reference = torch.optim.SGD(trainable, lr=lr, weight_decay=cfg.weight_decay)
    streams = [generator(s, "training-data") for s in (3, 4)]
    evaluations = [w.evaluation_set(EVAL_SAMPLES_PER_SUBJECT) for w in worlds]
    eval_tokens = torch.stack([e.tokens for e in evaluations])
    history = [_evaluate(model, eval_tokens, evaluations)]
    for chunk_start in range(0, cfg.steps, DATA_CHUNK_STEPS):
        data = [w.training_batches(DATA_CHUNK_STEPS, cfg.batch_size, g) for w, g in zip(worlds, streams)]
        for i in range(min(DATA_CHUNK_STEPS, cfg.steps - chunk_start)):
            tokens = torch.stack([t[i] for t, _ in data])
            labels = torch.stack([y[i] for _, y in data])
            loss = F.cross_entropy(model(tokens).flatten(0, 1), labels.flatten(), reduction="none")
            reference.zero_grad()
            loss.view(2, -1).mean(1).sum().backward()
            reference.step()
            if (chunk_start + i + 1) % 50 == 0 or chunk_start + i + 1 == cfg.steps:
                history.append(_evaluate(model, eval_tokens, evaluations))
    for r, result in enumerate(ours):
        assert len(result.history) == len(history) == 4
        for row, expected in zip(result.history, history):
            for key, value in expected[r].items():
                if value is not None:
                    assert row[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
        torch.testing.assert_close(result.w_ov, model.effective_w_ov()[r].detach(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(result.w_kq, model.w_kq[r].detach(), rtol=1e-4, atol=1e-6)


def test_parallel_grid_cells_give_the_same_results_as_in_process(tmp_path):
    from factorlab.grid import run_grid
    from factorlab.recipes.ocr import group_cells

    configs = [OCRConfig(d_h=d, steps=60, eval_every=30, seed=s) for d in (4, 16) for s in (0, 1)]
    configs.append(OCRConfig(param="combined", steps=60, eval_every=30, seed=0))
    serial = {r.config: r.summary for r in train_runs(configs)}
    cells = group_cells(configs)
    assert len(cells) == 3 and cells[0]["runs"][0]["param"] == "combined"  # the costliest group first
    grid = run_grid("factorlab.recipes.ocr:train_group_cell", cells, tmp_path, workers=2)
    parallel = {
        OCRConfig(**c): run["summary"]
        for cell, res in zip(cells, grid.results)
        for c, run in zip(cell["runs"], res["runs"])
    }
    assert parallel.keys() == serial.keys()
    for config, summary in serial.items():
        for key in ("test_impl_acc", "train_fact_acc", "nuclear_norm", "frobenius_norm"):
            assert parallel[config][key] == pytest.approx(summary[key], rel=1e-6), key


def test_divergence_stops_training_instead_of_continuing_with_nans():
    with pytest.raises(TrainingDivergedError, match="lower the learning rate"):
        train_batched([OCRConfig(steps=200, lr=1e30, weight_decay=0.0)])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"d_h": 0}, "d_h must be >= 1"),
        ({"batch_size": 250}, "multiple of 3"),
        ({"train_fraction": 0.001}, "both must be >= 1"),
        ({"seq_len": 2}, "seq_len must be >= 3"),
        ({"param": "combined", "d_h": 4}, "only applies to param='factorized'"),
        ({"param": "lowrank"}, "param must be one of"),
        ({"init": "zeros"}, "init must be one of"),
    ],
)
def test_bad_run_configs_fail_fast(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        OCRConfig(**kwargs)


def test_fused_adamw_equals_torch_adamw_bit_for_bit():
    from factorlab.ocr.train import FusedAdamW

    torch.manual_seed(0)
    ours = [torch.randn(3, 5, 4, requires_grad=True), torch.randn(3, 7, requires_grad=True)]
    theirs = [p.detach().clone().requires_grad_(True) for p in ours]
    fused = FusedAdamW(ours, lr=5e-3, weight_decay=0.03)
    reference = torch.optim.AdamW(theirs, lr=5e-3, weight_decay=0.03, fused=True)
    for _ in range(25):
        grads = [torch.randn_like(p) for p in ours]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        reference.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))


@pytest.mark.parametrize(
    ("param", "d_h", "fixed"), [("factorized", 8, False), ("combined", 128, False), ("factorized", 128, True)]
)
def test_hand_written_gradients_equal_autograd(param, d_h, fixed):
    import torch.nn.functional as F

    from factorlab.ocr.model import BatchedAttentionOnly

    torch.manual_seed(0)
    attention = torch.tensor([1, 2, 3]) if fixed else None
    model = BatchedAttentionOnly(128, param, d_h, [1, 2, 3], "default", attention)
    tokens, labels = torch.randint(0, 128, (3, 252, 16)), torch.randint(0, 128, (3, 252))
    tokens[:, :, -1] = 127  # the query token (EOS) ends every sequence, as in the task
    loss = (
        F.cross_entropy(model(tokens).flatten(0, 1), labels.flatten(), reduction="none").view(3, -1).mean(1)
    )
    loss.sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    for p in model.parameters():
        p.grad = None
    torch.testing.assert_close(model.loss_and_grads(tokens, labels), loss.detach())
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7)
    tokens[0, 0, -1] = 5
    with pytest.raises(ValueError, match="end with the same"):
        model.loss_and_grads(tokens, labels)


@pytest.mark.parametrize(("param", "d_h"), [("factorized", 6), ("factorized", 40), ("combined", 40)])
def test_step_on_the_reachable_slices_equals_autograd_on_whole_weights(param, d_h):
    """Sequences of input tokens ending in q: attention_step on W_KQ[:, inputs, q], W_V's input rows
    (W_OV's input columns) gives autograd's loss and, as those slices' gradients, exactly those slices
    of autograd's whole gradients, which are zero everywhere else."""
    import torch.nn.functional as F

    from factorlab.ocr.model import attention_step, through_product

    torch.manual_seed(0)
    model = BatchedAttentionOnly(40, param, d_h, [1, 2])
    inputs = torch.tensor([0, 3, 4, 9, 17, 18, 30, 39])  # q = 39 is last
    if param == "factorized":  # both ways of computing a factorized step are covered
        assert through_product(30, 40, len(inputs), d_h) == (d_h == 40)
    numbers = torch.randint(0, len(inputs), (2, 30, 9))
    numbers[:, :, -1] = len(inputs) - 1
    tokens, labels = inputs[numbers], torch.randint(0, 40, (2, 30))
    loss = (
        F.cross_entropy(model(tokens).flatten(0, 1), labels.flatten(), reduction="none").view(2, -1).mean(1)
    )
    loss.sum().backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters()}
    kq = model.w_kq.detach()[:, inputs, 39].clone().requires_grad_(True)
    if param == "factorized":
        sliced = {"w_o": model.w_o.detach().clone(), "w_v": model.w_v.detach()[:, inputs].clone()}
        where = {"w_o": (slice(None),), "w_v": (slice(None), inputs)}
    else:
        sliced = {"w_ov": model.w_ov.detach()[:, :, inputs].clone()}
        where = {"w_ov": (slice(None), slice(None), inputs)}
    torch.testing.assert_close(attention_step(numbers, labels, kq, **sliced), loss.detach())
    where["w_kq"], sliced["w_kq"] = (slice(None), inputs, 39), kq
    for name, index in where.items():
        torch.testing.assert_close(sliced[name].grad, full[name][index], rtol=1e-5, atol=1e-7)
        rest = full[name].clone()
        rest[index] = 0
        assert rest.abs().max() == 0, name
