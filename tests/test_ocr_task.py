import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from factorlab.errors import ConfigError
from factorlab.ocr.task import SPLITS, OCRTaskConfig, OCRWorld
from factorlab.runtime import generator


def test_default_vocabulary_and_maps_follow_the_paper():
    world = OCRWorld(OCRTaskConfig(), seed=0)
    assert world.vocab_size == 128
    assert (world.fact_relation, world.implication_relation) == (0, 1)
    assert world.fact_answers.tolist() == list(range(2, 22))
    assert world.implication_answers.tolist() == list(range(22, 42))
    assert world.subjects.tolist() == list(range(42, 122))
    assert world.noise.tolist() == list(range(122, 127))
    assert world.eos == 127
    for i in range(80):  # subject i -> b_(i mod 20) -> c_(i mod 20)
        assert world.subject_fact[i] == 2 + i % 20
        assert world.subject_implication[i] == 22 + i % 20
    assert world.train_subjects.tolist() == list(range(20))
    assert world.test_subjects.tolist() == list(range(20, 80))


def _decode(world, tokens):
    """(subject number, relation) of each sequence, checking the sequence layout on the way."""
    subjects_lo = int(world.subjects[0])
    is_subject = (tokens >= subjects_lo) & (tokens < subjects_lo + len(world.subjects))
    is_relation = tokens <= 1
    assert (is_subject.sum(1) == 1).all() and (is_relation.sum(1) == 1).all()
    assert (tokens[:, -1] == world.eos).all()
    subject_pos = is_subject.float().argmax(1)
    relation_pos = is_relation.float().argmax(1)
    assert (subject_pos < relation_pos).all()
    others = ~(is_subject | is_relation)
    others[:, -1] = False
    assert torch.isin(tokens[others], world.noise).all()
    return tokens[is_subject] - subjects_lo, tokens[is_relation]


def test_training_batches_never_show_a_test_implication_and_are_mixed_in_thirds():
    world = OCRWorld(OCRTaskConfig(), seed=1)
    tokens, labels = world.training_batches(20, 252, generator(1, "t"))
    assert tokens.shape == (20, 252, 16) and labels.shape == (20, 252)
    subjects, relations = _decode(world, tokens.flatten(0, 1))
    subjects, relations = subjects.view(20, 252), relations.view(20, 252)
    train = set(world.train_subjects.tolist())
    assert all(int(s) in train for s in subjects[relations == 1])
    # thirds: train facts | train implications | test facts
    assert (
        (relations[:, :84] == 0).all()
        and (relations[:, 84:168] == 1).all()
        and (relations[:, 168:] == 0).all()
    )
    assert torch.isin(subjects[:, :168], world.train_subjects).all()
    assert torch.isin(subjects[:, 168:], world.test_subjects).all()
    assert (labels[relations == 0] == world.subject_fact[subjects[relations == 0]]).all()
    assert (labels[relations == 1] == world.subject_implication[subjects[relations == 1]]).all()


@settings(max_examples=25, deadline=None)
@given(
    groups=st.integers(1, 6),
    per_group=st.integers(2, 5),
    train_fraction=st.floats(0.2, 0.8),
    noise=st.integers(1, 4),
    seq_len=st.integers(3, 12),
    seed=st.integers(0, 10_000),
    spurious=st.booleans(),
)
def test_batch_invariants_hold_for_any_valid_task(
    groups, per_group, train_fraction, noise, seq_len, seed, spurious
):
    try:
        cfg = OCRTaskConfig(
            groups=groups,
            subjects_per_group=per_group,
            train_fraction=train_fraction,
            noise_tokens=noise,
            seq_len=seq_len,
            association="spurious" if spurious else "causal",
        )
    except ConfigError:
        return  # fraction left no train or no test subject: tested separately
    world = OCRWorld(cfg, seed)
    tokens, _ = world.training_batches(3, 30, generator(seed, "t"))
    subjects, relations = _decode(world, tokens.flatten(0, 1))
    assert torch.isin(subjects[relations == 1], world.train_subjects).all()
    ev = world.evaluation_set(2)
    ev_subjects, ev_relations = _decode(world, ev.tokens)
    for relation in (0, 1):  # the evaluation set covers every subject, for both relations
        assert set(ev_subjects[ev_relations == relation].tolist()) == set(range(cfg.num_subjects))


def test_evaluation_set_covers_every_subject_with_correct_labels():
    world = OCRWorld(OCRTaskConfig(), seed=3)
    ev = world.evaluation_set(4)
    subjects, relations = _decode(world, ev.tokens)
    for split_id, split in enumerate(SPLITS):
        mask = ev.split == split_id
        expected = world.train_subjects if split.startswith("train") else world.test_subjects
        assert sorted(set(subjects[mask].tolist())) == expected.tolist()
        assert (relations[mask] == (0 if split.endswith("fact") else 1)).all()
        table = world.subject_fact if split.endswith("fact") else world.subject_implication
        assert (ev.labels[mask] == table[subjects[mask]]).all()
    # the set is fixed: same seed, same set
    assert torch.equal(world.evaluation_set(4).tokens, ev.tokens)


def test_spurious_world_draws_test_implications_independently_and_reproducibly():
    causal = OCRWorld(OCRTaskConfig(), seed=5)
    spurious = OCRWorld(OCRTaskConfig(association="spurious"), seed=5)
    n_train = 20
    assert torch.equal(spurious.subject_implication[:n_train], causal.subject_implication[:n_train])
    differs = spurious.subject_implication[n_train:] != causal.subject_implication[n_train:]
    assert differs.float().mean() > 0.7  # independent of group: ~95% differ
    assert torch.isin(spurious.subject_implication, spurious.implication_answers).all()
    again = OCRWorld(OCRTaskConfig(association="spurious"), seed=5)
    assert torch.equal(again.subject_implication, spurious.subject_implication)
    other = OCRWorld(OCRTaskConfig(association="spurious"), seed=6)
    assert not torch.equal(other.subject_implication, spurious.subject_implication)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train_fraction": 0.0}, "0 train"),
        ({"train_fraction": 1.0}, "0 test"),
        ({"seq_len": 2}, "subject, the relation token and EOS"),
        ({"noise_tokens": 0}, "noise_tokens >= 1"),
        ({"association": "weird"}, "association"),
    ],
)
def test_bad_task_configs_fail_with_a_clear_message(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        OCRTaskConfig(**kwargs)


def _reference_training_batches(world, num_batches, batch_size, gen):
    """The first implementation, kept as the reference: each third drawn into its own tensor, noise
    tokens looked up by index, the thirds concatenated. The library writes in place instead."""
    part, seq_len = batch_size // 3, world.config.seq_len
    pieces_tokens, pieces_labels = [], []
    for subjects, relation, answers in (
        (world.train_subjects, world.fact_relation, world.subject_fact),
        (world.train_subjects, world.implication_relation, world.subject_implication),
        (world.test_subjects, world.fact_relation, world.subject_fact),
    ):
        chosen = subjects[torch.randint(0, len(subjects), (num_batches * part,), generator=gen)]
        count = len(chosen)
        if len(world.noise):
            tokens = world.noise[torch.randint(0, len(world.noise), (count, seq_len), generator=gen)]
        else:
            tokens = torch.empty(count, seq_len, dtype=torch.long)
        subject_pos = torch.randint(0, seq_len - 2, (count,), generator=gen)
        room = (seq_len - 2 - subject_pos).double()
        relation_pos = subject_pos + 1 + (torch.rand(count, generator=gen, dtype=torch.double) * room).long()
        rows = torch.arange(count)
        tokens[rows, subject_pos] = world.subjects[chosen]
        tokens[rows, relation_pos] = relation
        tokens[:, -1] = world.eos
        pieces_tokens.append(tokens.view(num_batches, part, -1))
        pieces_labels.append(answers[chosen].view(num_batches, part))
    return torch.cat(pieces_tokens, dim=1), torch.cat(pieces_labels, dim=1)


@pytest.mark.parametrize(
    "task",
    [
        OCRTaskConfig(),
        OCRTaskConfig(noise_tokens=0, seq_len=3),
        OCRTaskConfig(groups=3, seq_len=30, noise_tokens=9),
    ],
)
def test_training_batches_equal_the_reference_stream_also_when_written_into_a_slot(task):
    world = OCRWorld(task, seed=5)
    ours, theirs = generator(5, "t"), generator(5, "t")
    slot = (torch.zeros(4, 3, 30, task.seq_len, dtype=torch.long), torch.zeros(4, 3, 30, dtype=torch.long))
    for _ in range(2):  # the stream continues identically
        expected = _reference_training_batches(world, 4, 30, theirs)
        got = world.training_batches(4, 30, ours, out=(slot[0][:, 1], slot[1][:, 1]))
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        assert torch.equal(slot[0][:, 1], expected[0]) and slot[0][:, 0].abs().sum() == 0
    numbers, labels = world.training_batches(4, 30, generator(5, "u"), input_numbers=True)
    tokens, same_labels = world.training_batches(4, 30, generator(5, "u"))
    assert torch.equal(world.input_tokens[numbers], tokens) and torch.equal(labels, same_labels)
    answers = torch.cat([world.fact_answers, world.implication_answers])
    assert not torch.isin(world.input_tokens, answers).any()
    assert len(world.input_tokens) + len(answers) == world.vocab_size
