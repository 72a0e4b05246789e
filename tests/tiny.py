"""The tests' tiny transformers: the product's tiny builder (mlsae_core/tiny.py, which also
writes the smoke sweep's inputs: `mlsae prepare --smoke`) plus what only the tests need.

`tiny_transformer(family, n_layers, d)` is built in memory, with biases and norm weights
perturbed so that a bug dropping either one changes the numbers.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mlsae_core.tiny import (  # noqa: F401 - re-exported for the tests
    BOS_ID,
    EOS_ID,
    FAMILIES,
    PAD_ID,
    SMOKE_MODEL,
    SWEEP_VOCAB,
    TINY_TEXT,
    UNK_ID,
    WORDS,
    build_tiny_model,
    parse_tiny_name,
    tiny_config,
    tiny_model,
    word_tokenizer,
    write_smoke_inputs,
    write_tiny_text,
)

if TYPE_CHECKING:
    import torch

    from mlsae_core.transformer import Transformer

# The tests' text: an IOI-style sentence and a few others, so prompts read naturally.
SAMPLE_TEXT = (
    "When Mary and John went to the store, John gave a drink to Mary. "
    "The quick brown fox jumps over the lazy dog. "
    "A cat sat on the mat and the dog sat on the log. "
    "Residual streams carry features from one layer to the next."
)
_PRE_TOKEN = re.compile(r"\w+|[^\w\s]+")  # what the `Whitespace` pre-tokenizer splits on


def vocab_of(text: str) -> tuple[str, ...]:
    """The words of `text`, most frequent first, ties in code-point order.

    This is the order a `tokenizers` WordLevelTrainer gives, so the test tokenizer keeps the
    ids it had when it was trained on SAMPLE_TEXT.
    """
    counts = collections.Counter(_PRE_TOKEN.findall(text))
    return tuple(sorted(counts, key=lambda w: (-counts[w], w)))


SAMPLE_VOCAB = vocab_of(SAMPLE_TEXT)


def tiny_tokenizer(vocab: Sequence[str] = SAMPLE_VOCAB):
    """The tests' word-level tokenizer (pad=0, bos=1, eos=2, unk=3, then `vocab`)."""
    return word_tokenizer(vocab)


def perturb_biases_and_norms(model: torch.nn.Module) -> None:
    """HF initialises biases to 0 and norm weights to 1; perturb them (from torch's global
    generator) so a bug that drops a bias or a norm, or a zero-ablation shortcut, shows."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
            elif "norm" in name or "ln_" in name:
                param.add_(torch.randn_like(param) * 0.1)


def tiny_transformer(
    family: str = "llama", n_layers: int = 3, d: int = 32, vocab: int = 101, seed: int = 0
) -> Transformer:
    """The tests' model: a perturbed `tiny_model` with the SAMPLE_TEXT tokenizer, wrapped."""
    from mlsae_core.transformer import Transformer

    model = tiny_model(family, n_layers, d, vocab, seed=seed)
    perturb_biases_and_norms(model)  # right after the seeded build, from the same generator
    return Transformer.from_model(model, tiny_tokenizer(), name=f"tiny-{family}")


def splice_logits(
    tt: Transformer, tokens: torch.Tensor, layer: int, replacement: torch.Tensor
) -> torch.Tensor:
    """Logits [b, p, V] with block `layer`'s output replaced by `replacement`."""
    return tt.logits(tt.run_from(tt.clean_pass(tokens, with_logits=False), layer, replacement))


def dense_latents(topk: Any, n_latents: int) -> torch.Tensor:
    """[..., n_latents] dense latents of a TopK (the tests' small inputs only)."""
    import torch

    out = torch.zeros(*topk.values.shape[:-1], n_latents, dtype=topk.values.dtype)
    return out.scatter_(-1, topk.indices, topk.values)
