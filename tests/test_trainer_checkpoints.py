"""transformers.Trainer checkpoints of an AdaptedModel: adapter-sized, tied weights never break
saving, and resume_from_checkpoint continues the same loss sequence as an uninterrupted run."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import factorlab
from factorlab.errors import AdapterLoadError
from tiny_models import build

VOCAB = 1000


def tied_llama():
    model = build("llama", tie_word_embeddings=True).train()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def adapted_model(modules_to_save=None):
    config = factorlab.LoraConfig(r=4, target_modules="all-linear", modules_to_save=modules_to_save)
    return factorlab.adapt(tied_llama(), config)


def train(out: Path, resume: str | None = None, steps: int = 6, modules_to_save=None):
    from transformers import Trainer, TrainingArguments

    model = adapted_model(modules_to_save)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (16, 12), generator=g)
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=steps,
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        warmup_steps=2,
        logging_steps=1,
        save_steps=1,
        save_strategy="steps",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=3,
        data_seed=3,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train(resume_from_checkpoint=resume)
    losses = {log["step"]: log["loss"] for log in trainer.state.log_history if "loss" in log}
    return model, losses


@pytest.mark.parametrize("modules_to_save", [None, ["embed_tokens"]])
def test_trainer_checkpoints_are_adapter_sized_and_resume_to_the_same_losses(tmp_path, modules_to_save):
    whole, losses = train(tmp_path / "a", modules_to_save=modules_to_save)
    checkpoint = tmp_path / "a" / "checkpoint-3"
    saved = load_file(checkpoint / "model.safetensors")
    adapter = whole.state_dict()
    assert set(saved) == set(adapter)  # adapter only: no base weight, no tied pair
    base_numel = sum(p.numel() for p in whole.base_model.parameters())
    saved_numel = sum(t.numel() for k, t in saved.items() if k != "factorlab_adapter_configs")
    expected = sum(p.numel() for p in whole.parameters() if p.requires_grad)
    assert saved_numel == expected < base_numel
    if modules_to_save:
        assert any("modules_to_save" in k for k in saved)

    resumed, resumed_losses = train(tmp_path / "b", resume=str(checkpoint), modules_to_save=modules_to_save)
    assert sorted(resumed_losses) == [1, 2, 3, 4, 5, 6]  # 1-3 come from the checkpoint's trainer state
    for step in (4, 5, 6):  # trained after resuming; Trainer logs losses rounded to 4 digits
        assert resumed_losses[step] == pytest.approx(losses[step], abs=1e-4), step
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, atol=1e-6, rtol=0)


@pytest.mark.parametrize("modules_to_save", [None, ["embed_tokens"]])
def test_a_trainer_checkpoint_opens_with_from_pretrained(tmp_path, modules_to_save):
    """Trainer writes only model.safetensors for a model class it does not know; the adapters' configs
    travel in the state dict, so the checkpoint folder opens as it is."""
    train(tmp_path / "a", steps=3, modules_to_save=modules_to_save)
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert not (checkpoint / "adapter_config.json").exists()
    opened = factorlab.AdaptedModel.from_pretrained(tied_llama(), checkpoint)
    reference = adapted_model(modules_to_save)
    reference.load_state_dict(load_file(checkpoint / "model.safetensors"))
    batch = torch.randint(1, VOCAB, (2, 8))
    torch.testing.assert_close(
        opened(input_ids=batch).logits, reference(input_ids=batch).logits, atol=0, rtol=0
    )
    assert opened.peft_config["default"].to_dict() | {"inference_mode": False} == reference.peft_config[
        "default"
    ].to_dict() | {"inference_mode": False}
    assert not any(p.requires_grad for p in opened.parameters())  # loaded for inference, as PEFT
    trainable = factorlab.AdaptedModel.from_pretrained(tied_llama(), checkpoint, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())
    opened.save_pretrained(tmp_path / "adapter")  # and on to a PEFT folder
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_a_checkpoint_without_configs_or_for_another_model_is_refused_and_changes_nothing(tmp_path):
    from safetensors.torch import save_file

    source = adapted_model()
    state = source.state_dict()
    folder = tmp_path / "old"
    folder.mkdir()
    save_file(
        {k: v.contiguous() for k, v in state.items() if k != "factorlab_adapter_configs"},
        str(folder / "model.safetensors"),
    )
    model = tied_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterLoadError, match="holds no factorlab adapter configs"):
        factorlab.AdaptedModel.from_pretrained(model, folder)
    good = tmp_path / "good"
    good.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(good / "model.safetensors"))
    gpt2 = build("gpt2")
    names = [n for n, _ in gpt2.named_modules()]
    with pytest.raises(AdapterLoadError, match="does not fit"):
        factorlab.AdaptedModel.from_pretrained(gpt2, good)
    assert [n for n, _ in gpt2.named_modules()] == names and all(p.requires_grad for p in gpt2.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_state_dict_round_trip_and_refusals():
    source = adapted_model()
    with torch.no_grad():
        for p in source.parameters():
            if p.requires_grad:
                p.add_(0.01)
    state = source.state_dict()
    target = adapted_model()
    assert target.load_state_dict(state).missing_keys == []
    batch = torch.randint(1, VOCAB, (2, 8))
    torch.testing.assert_close(target(input_ids=batch).logits, source(input_ids=batch).logits)
    with pytest.raises(AdapterLoadError, match="adapter keys missing"):
        target.load_state_dict(dict(list(state.items())[1:]))
    key = next(iter(state))
    with pytest.raises(AdapterLoadError, match="NaN"):
        target.load_state_dict({**state, key: torch.full_like(state[key], float("nan"))})
    with pytest.raises(AdapterLoadError, match="has shape"):
        target.load_state_dict({**state, key: torch.zeros(3)})
    with pytest.raises(AdapterLoadError, match="mapping"):
        target.load_state_dict([1, 2])
    full = {f"base_model.{k}": v for k, v in target.base_model.state_dict().items()}
    assert target.load_state_dict({**full, **state}).unexpected_keys == []  # a full state dict loads too


def test_tied_trained_biases_appear_once_so_safetensors_can_write_them(tmp_path):
    from safetensors.torch import save_file

    source = factorlab.adapt(build("bert"), factorlab.LoraConfig(r=2, target_modules=["query"], bias="all"))
    with torch.no_grad():
        for p in source.parameters():
            if p.requires_grad:
                p.add_(0.1)
    state = source.state_dict()  # BERT's decoder.bias is predictions.bias: one key
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    target = factorlab.adapt(build("bert"), factorlab.LoraConfig(r=2, target_modules=["query"], bias="all"))
    assert target.load_state_dict(load_file(tmp_path / "model.safetensors")).missing_keys == []
    batch = torch.randint(1, VOCAB, (2, 8))
    torch.testing.assert_close(target(input_ids=batch).logits, source(input_ids=batch).logits)
