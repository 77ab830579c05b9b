"""Tiny random Hugging Face models (built offline from configs) and inputs for adapter tests."""

from __future__ import annotations

import torch

VOCAB = 1000
ARCHS = ("llama", "gpt2", "t5", "bert", "mamba")


def build(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random model of ``arch`` ("llama", "gpt2", "t5", "bert", "bert-cls" (sequence
    classification, 3 labels), "mamba"); ``overrides`` change its config (e.g. tie_word_embeddings)."""
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "llama":
        sizes = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
        cfg = tf.LlamaConfig(
            num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, **{**sizes, **overrides}
        )
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128, bos_token_id=0, eos_token_id=0
        )
        model = tf.GPT2LMHeadModel(cfg)
    elif arch == "t5":
        cfg = tf.T5Config(
            d_model=64,
            d_ff=128,
            num_layers=2,
            num_heads=4,
            d_kv=16,
            vocab_size=VOCAB,
            decoder_start_token_id=0,
        )
        model = tf.T5ForConditionalGeneration(cfg)
    elif arch in ("bert", "bert-cls"):
        cfg = tf.BertConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=VOCAB,
            max_position_embeddings=128,
            **({"num_labels": 3} if arch == "bert-cls" else {}),
            **overrides,
        )
        model = tf.BertForSequenceClassification(cfg) if arch == "bert-cls" else tf.BertForMaskedLM(cfg)
    elif arch == "mamba":
        cfg = tf.MambaConfig(hidden_size=64, num_hidden_layers=2, vocab_size=VOCAB, state_size=8)
        model = tf.MambaForCausalLM(cfg)
    else:
        raise ValueError(arch)
    return model.eval()


def inputs(arch: str, batch: int = 2, seq: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
    out = {"input_ids": ids}
    if arch == "t5":
        out["decoder_input_ids"] = torch.randint(1, VOCAB, (batch, seq // 2), generator=g)
    return out


@torch.no_grad()
def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).logits
