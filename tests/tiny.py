"""Tiny random-initialised transformers, word-level tokenizers and texts (no network, seconds).

One builder serves three users, so a tiny model means the same thing everywhere:

* the tests: `tiny_transformer(family, n_layers, d)`, in memory, with biases and norm weights
  perturbed so that a bug dropping either one changes the numbers;
* the smoke sweep: `python -m tests.tiny ROOT` writes `ROOT/models/tiny-llama/` (a model
  directory, `save_pretrained`) and `ROOT/sources/tiny-text/` (synthetic documents), which the
  sweep names like any model or source already under the storage root; the product's loaders
  know nothing of them (`tiny-llama` / `tiny-gpt-neox[-L4][-d32]` name what `build_tiny_model`
  builds);
* the benchmark: `tiny_model("gpt_neox", ...)` with Pythia-70m's shape, saved once.

Everything is deterministic: the weights depend only on the config and the seed, which is set
on torch's global generator right before the model is built (as `torch.manual_seed` callers
expect), and nothing else draws from it.
"""

from __future__ import annotations

import collections
import json
import random
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlsae_core.atomic import atomic_dir

if TYPE_CHECKING:
    import torch

    from mlsae_core.transformer import Transformer

FAMILIES = ("gpt_neox", "llama", "gpt2")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0..3, in this order
TINY_TEXT = "tiny-text"  # the smoke sweep's synthetic source, under the storage root's sources/
SMOKE_MODEL = "tiny-llama"  # the smoke sweep's model, under the storage root's models/

# Words of the synthetic `tiny-text` documents; with "." and "," they are the sweep's vocabulary.
WORDS = (
    "the a an of to and in on at with from by for as is was are were be been this that "
    "mary john store drink cat dog mat log fox quick brown lazy jumps over sat went gave "
    "residual stream layer feature model token sparse latent code read write river city "
    "house tree bird fish book table chair red green blue small large old new good bad"
).split()
SWEEP_VOCAB = (*WORDS, ".", ",")

# The tests' text: an IOI-style sentence and a few others, so prompts read naturally.
SAMPLE_TEXT = (
    "When Mary and John went to the store, John gave a drink to Mary. "
    "The quick brown fox jumps over the lazy dog. "
    "A cat sat on the mat and the dog sat on the log. "
    "Residual streams carry features from one layer to the next."
)
_PRE_TOKEN = re.compile(r"\w+|[^\w\s]+")  # what the `Whitespace` pre-tokenizer splits on
_NAME = re.compile(r"tiny-(llama|gpt-neox)(?:-L(\d+))?(?:-d(\d+))?")


def vocab_of(text: str) -> tuple[str, ...]:
    """The words of `text`, most frequent first, ties in code-point order.

    This is the order a `tokenizers` WordLevelTrainer gives, so the test tokenizer keeps the
    ids it had when it was trained on SAMPLE_TEXT.
    """
    counts = collections.Counter(_PRE_TOKEN.findall(text))
    return tuple(sorted(counts, key=lambda w: (-counts[w], w)))


SAMPLE_VOCAB = vocab_of(SAMPLE_TEXT)


def tiny_tokenizer(vocab: Sequence[str] = SAMPLE_VOCAB):
    """A word-level tokenizer: pad=0, bos=1, eos=2, unk=3, then `vocab` in order."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ids = {w: i for i, w in enumerate(dict.fromkeys([*SPECIALS, *vocab]))}
    backend = Tokenizer(models.WordLevel(vocab=ids, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )


def tiny_config(
    family: str = "llama",
    n_layers: int = 3,
    d: int = 32,
    vocab: int = 101,
    *,
    max_positions: int = 128,
    **overrides: Any,
):
    """A transformers config of `family` (4 heads, MLP width 2d); `overrides` are passed on
    in the family's own field names (e.g. num_attention_heads=8, bos_token_id=0)."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    ids = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
    if family == "gpt2":
        kw = dict(n_embd=d, n_layer=n_layers, n_head=4, vocab_size=vocab, n_positions=max_positions)
        return GPT2Config(**{**kw, **ids, **overrides})
    common = {
        "hidden_size": d,
        "num_hidden_layers": n_layers,
        "num_attention_heads": 4,
        "intermediate_size": 2 * d,
        "vocab_size": vocab,
        "max_position_embeddings": max_positions,
        **ids,
    }
    if family == "gpt_neox":
        return GPTNeoXConfig(**{**common, **overrides})
    if family == "llama":
        # Without biases a zero residual stays exactly zero, which hides zero-ablation bugs.
        extra = {"num_key_value_heads": 2, "attention_bias": True, "mlp_bias": True}
        return LlamaConfig(**{**common, **extra, **overrides})
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


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


def tiny_model(
    family: str = "llama",
    n_layers: int = 3,
    d: int = 32,
    vocab: int = 101,
    *,
    seed: int = 0,
    perturb: bool = False,
    max_positions: int = 128,
    **overrides: Any,
):
    """A random-initialised HF causal LM from `tiny_config(...)`, seeded with `seed`."""
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, n_layers, d, vocab, max_positions=max_positions, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if perturb:
        perturb_biases_and_norms(model)
    return model


def tiny_transformer(
    family: str = "llama", n_layers: int = 3, d: int = 32, vocab: int = 101, seed: int = 0
) -> Transformer:
    """The tests' model: a perturbed `tiny_model` with the SAMPLE_TEXT tokenizer, wrapped."""
    from mlsae_core.transformer import Transformer

    model = tiny_model(family, n_layers, d, vocab, seed=seed, perturb=True)
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


# ----- the smoke sweep's tiny models and synthetic text, written under a storage root -------
def parse_tiny_name(name: str) -> tuple[str, int, int]:
    """`tiny-llama-L4-d32` -> ("llama", 4, 32); layers default to 4 and width to 32."""
    m = _NAME.fullmatch(name)
    if m is None:
        raise ValueError(
            f"{name!r} is not a tiny model name (tiny-llama, tiny-gpt-neox[-L4][-d32])"
        )
    return m.group(1).replace("-", "_"), int(m.group(2) or 4), int(m.group(3) or 32)


def build_tiny_model(name: str, out_dir: Path, seed: int = 0) -> Path:
    """Build the named tiny model and save it with its tokenizer to `out_dir` (atomically)."""
    family, n_layers, d = parse_tiny_name(name)
    tok = tiny_tokenizer(SWEEP_VOCAB)
    model = tiny_model(family, n_layers, d, len(tok), seed=seed, max_positions=256)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "mlsae_source.json").write_text(json.dumps({"source": "tiny", "name": name}) + "\n")
    return out_dir


def write_tiny_text(
    out_dir: Path, n_docs: int = 40, words_per_doc: int = 120, seed: int = 0
) -> Path:
    """Synthetic documents (one .txt each) over WORDS, a full stop every 12 words."""
    rng = random.Random(seed)
    with atomic_dir(out_dir) as tmp:
        for i in range(n_docs):
            words = []
            for j in range(words_per_doc):
                words.append(rng.choice(WORDS))
                if j % 12 == 11:
                    words.append(".")
            (tmp / f"doc{i:03d}.txt").write_text(" ".join(words) + "\n", encoding="utf-8")
    return out_dir


def write_smoke_inputs(root: Path, models: Sequence[str] = (SMOKE_MODEL,)) -> Path:
    """Write what the smoke sweep names into the storage root `root` (once; reruns keep
    them): each tiny model under models/<name>/ and the synthetic text under sources/."""
    root = Path(root)
    for name in models:
        if not (root / "models" / name / "config.json").is_file():
            build_tiny_model(name, root / "models" / name)
    if not (root / "sources" / TINY_TEXT).is_dir():
        write_tiny_text(root / "sources" / TINY_TEXT)
    return root


if __name__ == "__main__":  # python -m tests.tiny ROOT [MODEL ...]
    if len(sys.argv) < 2:
        sys.exit("usage: python -m tests.tiny ROOT [tiny-llama ...]: ROOT is the storage root")
    write_smoke_inputs(Path(sys.argv[1]), sys.argv[2:] or (SMOKE_MODEL,))
    print(f"wrote the smoke sweep's model(s) and text under {sys.argv[1]}")
