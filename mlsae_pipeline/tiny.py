"""Tiny random models and texts for the smoke sweep and the tests (no network, seconds).

A model name `tiny-llama` or `tiny-gpt-neox` (optionally `tiny-llama-L4-d32`) builds a
random-initialised model of that family deterministically from its config, with a word-level
tokenizer, and saves both with `save_pretrained` into `<storage>/models/<name>`, so the rest
of the pipeline loads it like any local model directory. The dataset `tiny-text` writes
synthetic documents over the tokenizer's words into `<storage>/sources/tiny-text`.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from mlsae_core.atomic import atomic_dir

TINY_TEXT = "tiny-text"
_NAME = re.compile(r"tiny-(llama|gpt-neox)(?:-L(\d+))?(?:-d(\d+))?")
_WORDS = (
    "the a an of to and in on at with from by for as is was are were be been this that "
    "mary john store drink cat dog mat log fox quick brown lazy jumps over sat went gave "
    "residual stream layer feature model token sparse latent code read write river city "
    "house tree bird fish book table chair red green blue small large old new good bad"
).split()
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]  # ids 0..3


def is_tiny(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


def _parse(name: str) -> tuple[str, int, int]:
    m = _NAME.fullmatch(name)
    if m is None:
        raise ValueError(
            f"{name!r} is not a tiny model name (tiny-llama, tiny-gpt-neox[-L4][-d32])"
        )
    return m.group(1).replace("-", "_"), int(m.group(2) or 4), int(m.group(3) or 32)


def tiny_tokenizer():
    """Word-level tokenizer over `_WORDS` with pad=0, bos=1, eos=2, unk=3."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*SPECIALS, *_WORDS, ".", ","])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )


def build_tiny_model(name: str, out_dir: Path, seed: int = 0) -> Path:
    """Build `name` deterministically and save model + tokenizer to `out_dir` (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig

    family, n_layers, d = _parse(name)
    tok = tiny_tokenizer()
    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    common = {
        "hidden_size": d,
        "num_hidden_layers": n_layers,
        "num_attention_heads": 4,
        "intermediate_size": 2 * d,
        "vocab_size": len(tok),
        "max_position_embeddings": 256,
        **ids,
    }
    if family == "llama":
        config = LlamaConfig(num_key_value_heads=2, attention_bias=True, mlp_bias=True, **common)
    else:
        config = GPTNeoXConfig(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "mlsae_source.json").write_text(json.dumps({"source": "tiny", "name": name}) + "\n")
    return out_dir


def write_tiny_text(
    out_dir: Path, n_docs: int = 40, words_per_doc: int = 120, seed: int = 0
) -> Path:
    """Synthetic documents (one .txt each) over the tiny tokenizer's words, deterministic."""
    rng = random.Random(seed)
    with atomic_dir(out_dir) as tmp:
        for i in range(n_docs):
            words = []
            for j in range(words_per_doc):
                words.append(rng.choice(_WORDS))
                if j % 12 == 11:
                    words.append(".")
            (tmp / f"doc{i:03d}.txt").write_text(" ".join(words) + "\n", encoding="utf-8")
    return out_dir
