"""Tiny random-initialised transformers and synthetic text (no network, seconds): the smoke
sweep's inputs (`mlsae prepare --smoke`), the benchmark's model and the tests' models.

`mlsae prepare --smoke` writes `<root>/models/tiny-llama/` (a model directory,
`save_pretrained`) and `<root>/sources/tiny-text/` (synthetic documents), which the smoke sweep
names like any model or source under the storage root; the loaders know nothing of them.
Everything is deterministic: the weights depend only on the config and the seed, set on torch's
global generator right before the model is built.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlsae_core.atomic import atomic_dir
from mlsae_core.layout import StorageLayout

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
_NAME = re.compile(r"tiny-(llama|gpt-neox)(?:-L(\d+))?(?:-d(\d+))?")


def word_tokenizer(vocab: Sequence[str]):
    """A word-level tokenizer: pad=0, bos=1, eos=2, unk=3, then `vocab` in order."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ids = {w: i for i, w in enumerate(dict.fromkeys([*SPECIALS, *vocab]))}
    backend = Tokenizer(models.WordLevel(vocab=ids, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    special = dict(zip(("pad_token", "bos_token", "eos_token", "unk_token"), SPECIALS, strict=True))
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


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


def tiny_model(
    family: str = "llama",
    n_layers: int = 3,
    d: int = 32,
    vocab: int = 101,
    *,
    seed: int = 0,
    max_positions: int = 128,
    **overrides: Any,
):
    """A random-initialised HF causal LM from `tiny_config(...)`, seeded with `seed`."""
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, n_layers, d, vocab, max_positions=max_positions, **overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


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
    tok = word_tokenizer(SWEEP_VOCAB)
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
    layout = StorageLayout(Path(root))
    for name in models:
        if not (layout.model_dir(name) / "config.json").is_file():
            build_tiny_model(name, layout.model_dir(name))
    if not (layout.sources_dir / TINY_TEXT).is_dir():
        write_tiny_text(layout.sources_dir / TINY_TEXT)
    return layout.root
