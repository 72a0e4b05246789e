"""Tiny random-initialised models and a tiny tokenizer, built in-process (no network).

Other test modules import `tiny_transformer` and `tiny_tokenizer` from here.
"""

from __future__ import annotations

import functools

import torch

from mlsae_core.transformer import Transformer

FAMILIES = ("gpt_neox", "llama", "gpt2")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

_TEXT = (
    "When Mary and John went to the store, John gave a drink to Mary. "
    "The quick brown fox jumps over the lazy dog. "
    "A cat sat on the mat and the dog sat on the log. "
    "Residual streams carry features from one layer to the next."
)


@functools.cache
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"])
    tok.train_from_iterator([_TEXT], trainer=trainer)
    return tok.to_str()


def tiny_tokenizer():
    """A word-level tokenizer (< 64 words) with pad=0, bos=1, eos=2, unk=3."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    return tok


def tiny_config(family: str = "llama", n_layers: int = 3, d: int = 32, vocab: int = 101):
    """A transformers config for a tiny model of `family` (4 heads, context 128)."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    ids = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
    if family == "gpt_neox":
        return GPTNeoXConfig(
            hidden_size=d,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            intermediate_size=2 * d,
            vocab_size=vocab,
            max_position_embeddings=128,
            **ids,
        )
    if family == "llama":
        return LlamaConfig(
            hidden_size=d,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=2 * d,
            vocab_size=vocab,
            max_position_embeddings=128,
            attention_bias=True,  # without biases a zero residual stays exactly zero
            mlp_bias=True,
            **ids,
        )
    if family == "gpt2":
        return GPT2Config(
            n_embd=d, n_layer=n_layers, n_head=4, vocab_size=vocab, n_positions=128, **ids
        )
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


def _randomise_biases_and_norms(model: torch.nn.Module) -> None:
    """HF initialises biases to 0 and norm weights to 1; randomise them so a bug that drops a
    bias or a norm (or a zero-ablation shortcut) changes the numbers."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
            elif "norm" in name or "ln_" in name:
                param.add_(torch.randn_like(param) * 0.1)


def tiny_transformer(
    family: str = "llama", n_layers: int = 3, d: int = 32, vocab: int = 101, seed: int = 0
) -> Transformer:
    """A random-initialised `Transformer` of `family` with the tiny tokenizer (fixed seed)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, n_layers, d, vocab))
    _randomise_biases_and_norms(model)
    return Transformer.from_model(model, tiny_tokenizer(), name=f"tiny-{family}")
