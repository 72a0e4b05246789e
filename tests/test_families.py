"""Splicing, splice metrics and activations are exact for every decoder family we accept.

Tiny random models (3 layers, d=32, vocab 101, float32, eager attention) built in-process:
each reference is the unmodified HF model itself (`model(input_ids).logits`, a forward hook
replacing block l's output, `output_hidden_states`), so a per-block argument reused for the
wrong block (sliding vs global masks, per-layer rotary tables) or a final logit transform
left out (soft-capping, logit scaling) shows as a mismatch.
"""

from __future__ import annotations

import math

import pytest
import torch

from mlsae_core.evaluate import evaluate, prediction_mask
from mlsae_core.sae import MLSAE
from mlsae_core.transformer import Transformer, UnsupportedModelError
from tests.tiny import BOS_ID, EOS_ID, PAD_ID, perturb_biases_and_norms, tiny_tokenizer

L, D, V, P = 3, 32, 101, 12
IDS = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
LLAMA_LIKE = {
    "hidden_size": D,
    "num_hidden_layers": L,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 2 * D,
    "vocab_size": V,
    "max_position_embeddings": 128,
    **IDS,
}
GPT2_LIKE = {"n_embd": D, "n_layer": L, "n_head": 4, "vocab_size": V, "n_positions": 128, **IDS}
SLIDING = ["sliding_attention", "full_attention", "sliding_attention"]

# name -> (config class, fields); sliding windows (4) are shorter than the sequence (12).
FAMILIES: dict[str, tuple[str, dict]] = {
    "gpt_neox": ("GPTNeoXConfig", {**LLAMA_LIKE, "num_key_value_heads": 4}),
    "gpt2": ("GPT2Config", GPT2_LIKE),
    "gptj": ("GPTJConfig", {**GPT2_LIKE, "rotary_dim": 4}),
    "llama": ("LlamaConfig", {**LLAMA_LIKE, "attention_bias": True, "mlp_bias": True}),
    "qwen2": ("Qwen2Config", LLAMA_LIKE),
    "mistral": ("MistralConfig", {**LLAMA_LIKE, "sliding_window": 4}),
    "gemma2": (
        "Gemma2Config",
        {**LLAMA_LIKE, "head_dim": 8, "sliding_window": 4, "final_logit_softcapping": 0.5},
    ),
    "gemma3_text": (
        "Gemma3TextConfig",
        {**LLAMA_LIKE, "head_dim": 8, "sliding_window": 4, "layer_types": SLIDING},
    ),
    "phi3": ("Phi3Config", LLAMA_LIKE),
    "olmo2": ("Olmo2Config", LLAMA_LIKE),
    "cohere": ("CohereConfig", {**LLAMA_LIKE, "logit_scale": 0.5}),
    "granite": ("GraniteConfig", {**LLAMA_LIKE, "logits_scaling": 3.0, "residual_multiplier": 0.7}),
}
NONLINEAR_HEADS = {"gemma2"}  # final_logit_softcapping


def _build(name: str) -> Transformer:
    import transformers
    from transformers import AutoModelForCausalLM

    cls_name, fields = FAMILIES[name]
    config = getattr(transformers, cls_name)(**fields)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    perturb_biases_and_norms(model)
    return Transformer.from_model(model.float(), tiny_tokenizer(), name=f"tiny-{name}")


@pytest.fixture(scope="module", params=list(FAMILIES))
def tt(request: pytest.FixtureRequest) -> Transformer:
    return _build(request.param)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    toks = torch.randint(4, V, (2, P), generator=gen)
    toks[:, 0] = BOS_ID
    toks[0, 6] = EOS_ID
    toks[1, 9] = PAD_ID
    return toks


def _hf_logits(tt: Transformer, tokens: torch.Tensor, layer=None, replacement=None):
    """The unmodified model's logits, block `layer`'s output replaced through a forward hook."""

    def hook(module, args, out):
        if isinstance(out, tuple):
            return (replacement, *out[1:])
        return replacement

    handle = tt.blocks[layer].register_forward_hook(hook) if layer is not None else None
    try:
        with torch.no_grad():
            return tt.model(input_ids=tokens, use_cache=False).logits
    finally:
        if handle is not None:
            handle.remove()


def test_splice_own_output_reproduces_logits(tt: Transformer, tokens: torch.Tensor) -> None:
    want = _hf_logits(tt, tokens)
    clean = tt.clean_pass(tokens)
    torch.testing.assert_close(clean.log_probs, torch.log_softmax(want, -1), rtol=0, atol=1e-5)
    worst = 0.0
    for layer in range(L):
        got = tt.logits(tt.run_from(clean, layer, clean.hidden[layer]))
        worst = max(worst, float((got - want).abs().max()))
    print(f"{tt.model_type}: splice max |logit diff| {worst:.2e}")
    assert worst <= 1e-5, worst


def test_head_choice(tt: Transformer) -> None:
    assert tt.linear_head is (tt.name.removeprefix("tiny-") not in NONLINEAR_HEADS)
    if not tt.linear_head:
        with pytest.raises(UnsupportedModelError, match="linear head"):
            tt.logit_difference(torch.zeros(1, D))
    else:  # the shortcut is the difference of the model's own logits (scale included)
        g = torch.Generator().manual_seed(2)
        a, b = torch.randn(5, D, generator=g), torch.randn(5, D, generator=g)
        want = tt.logits(b).double() - tt.logits(a).double()
        torch.testing.assert_close(tt.logit_difference(b - a).double(), want, rtol=0, atol=1e-5)


def _reference_metrics(tt, sae, tokens, mask, layer):
    """ce_clean, ce_spliced, kl from hooked HF forwards, in float64 over evaluate's positions."""
    with torch.no_grad():
        acts = tt.activations(tokens, [layer])[0]
        replacement = acts.clone()
        replacement[mask] = sae(acts[mask][None]).recons[0]
    pred = prediction_mask(mask)[:, :-1]
    targets = tokens[:, 1:][pred]
    lp_c = torch.log_softmax(_hf_logits(tt, tokens).double(), -1)[:, :-1][pred]
    hooked = _hf_logits(tt, tokens, layer, replacement)
    lp_s = torch.log_softmax(hooked.double(), -1)[:, :-1][pred]
    ce_c = -lp_c.gather(-1, targets[:, None]).mean()
    ce_s = -lp_s.gather(-1, targets[:, None]).mean()
    kl = (lp_c.exp() * (lp_c - lp_s)).sum(-1).mean()
    return float(ce_c), float(ce_s), float(kl)


def test_evaluate_matches_hooked_model(tt: Transformer, tokens: torch.Tensor) -> None:
    mask = ~torch.isin(tokens, torch.tensor([PAD_ID, BOS_ID, EOS_ID]))
    torch.manual_seed(0)
    sae = MLSAE(D, 64, 4)
    layers = [0, 2]
    res = evaluate(
        tt, sae, tokens, mask, layers, batch_size=2, progress=False, delta_dtype="float32"
    )
    assert res.linear_head is tt.linear_head
    worst = 0.0
    for i, layer in enumerate(layers):
        ce_c, ce_s, kl = _reference_metrics(tt, sae, tokens, mask, layer)
        row = res.rows[i]
        assert row["kl"] > 1e-4  # a random SAE: a real, measurable splice effect
        for got, want in ((row["ce_clean"], ce_c), (row["ce_spliced"], ce_s), (row["kl"], kl)):
            worst = max(worst, abs(got - want) / abs(want))
            assert math.isclose(got, want, rel_tol=1e-4), (tt.model_type, layer, got, want)
    print(f"{tt.model_type}: evaluate max relative error {worst:.2e}")


def test_activations_match_hidden_states(tt: Transformer, tokens: torch.Tensor) -> None:
    acts = tt.activations(tokens)
    with torch.no_grad():
        out = tt.model(input_ids=tokens, output_hidden_states=True, use_cache=False)
    hs = out.hidden_states
    assert len(hs) == L + 1
    for layer in range(L - 1):
        torch.testing.assert_close(acts[layer], hs[layer + 1], rtol=0, atol=1e-6)
    # The last entry is block L-1's output, or (most families) that after the final norm.
    raw = (acts[-1] - hs[-1]).abs().max()
    normed = (tt.final_norm(acts[-1]) - hs[-1]).abs().max()
    assert min(raw, normed) <= 1e-5, (tt.model_type, raw, normed)
    clean = tt.clean_pass(tokens, with_logits=False)
    torch.testing.assert_close(clean.hidden, acts, rtol=0, atol=1e-6)


def test_softcap_head_is_not_linear_and_matters() -> None:
    """Gemma-2's soft-capping is applied (the logits are bounded by the cap)."""
    tt = _build("gemma2")
    assert tt.head.softcap == 0.5 and not tt.linear_head
    clean = tt.clean_pass(torch.arange(4, 16)[None])
    normed = tt.final_norm(clean.hidden[-1])
    raw, capped = tt.unembed(normed), tt.logits(normed)
    torch.testing.assert_close(capped, 0.5 * torch.tanh(raw / 0.5))
    assert (capped - raw).abs().max() > 1e-2  # the cap changes these logits
    assert capped.abs().max() < 0.5


def test_blocks_not_found_is_unsupported() -> None:
    from transformers import OPTConfig, OPTForCausalLM

    opt = OPTForCausalLM(
        OPTConfig(
            hidden_size=D,
            num_hidden_layers=2,
            ffn_dim=64,
            num_attention_heads=4,
            vocab_size=V,
            word_embed_proj_dim=D,
        )
    )
    with pytest.raises(UnsupportedModelError, match="cannot locate the decoder blocks"):
        Transformer.from_model(opt, None)


def test_unknown_final_transform_is_unsupported() -> None:
    """A head transform we do not know is refused at load, not silently mis-measured."""
    from transformers import LlamaConfig, LlamaForCausalLM

    class Doubled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = 2 * out.logits + 1
            return out

    torch.manual_seed(0)
    model = Doubled(LlamaConfig(**LLAMA_LIKE))
    with pytest.raises(UnsupportedModelError, match="does not reproduce"):
        Transformer.from_model(model, None)
