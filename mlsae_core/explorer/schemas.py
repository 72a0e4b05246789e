"""The explorer's API types: request bodies, response bodies and the error body, once.

They are the OpenAPI schema at /openapi.json, and the app answers what they say: bodies are
validated strictly (an integer field takes only JSON integers, not `true` or `1.5`), every
view's return value is validated against its response model, and every status an operation
can answer is declared (`responses`) with the body it has (tests/test_explorer_schema.py
checks both with schemathesis). `POST /api/<name>` takes `<Name>In` and answers `<Name>Out`
(`server.create_app` finds them by that name).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from mlsae_core.explorer.options import ExplorerSettings
from mlsae_core.explorer.steering import SteerMode

# Pydantic's caps, so a body is refused before any work; the explorer then checks the
# configured limits (ExplorerSettings), whose defaults these are.
HARD_MAX_CHARS = 20_000
MAX_BODY_BYTES = 64 * 1024
_DEFAULTS = ExplorerSettings()


# ----- request bodies ------------------------------------------------------------------------
Position = Annotated[int, Field(ge=0, description="token position, 0-based")]
Layer = Annotated[int, Field(ge=0, description="block id; one of the SAE's layers")]
Latent = Annotated[int, Field(ge=0, description="latent id, 0..n_latents-1")]
Number = float | None  # JSON has no NaN/Inf: a non-finite number is null


class PromptIn(BaseModel):  # every request body: the prompt, then the view's own fields
    # strict: pydantic's lax mode would take `true` for an integer and "1" for a number,
    # which the schema does not allow
    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str = Field(
        min_length=1,
        max_length=HARD_MAX_CHARS,
        description="the text to analyse (limits in /api/info)",
    )


class HeatmapIn(PromptIn):
    position: Position | None = Field(
        default=None, description="token position; null sums over all tokens"
    )
    threshold: float = Field(
        default=1e-3, ge=0.0, le=1e6, allow_inf_nan=False, description="minimum value shown"
    )
    max_latents: int | None = Field(default=None, ge=1, le=10_000)


class ActivationsIn(PromptIn):
    latent: Latent
    layer: Layer


class HistogramsIn(PromptIn):
    bins: int = Field(default=20, ge=1, le=_DEFAULTS.max_bins)
    position: Position | None = None


class LogitsIn(PromptIn):
    position: Position
    layer: Layer
    latent: Latent | None = Field(default=None, description="latent to steer (null: no steering)")
    factor: float = Field(
        default=2.0,
        ge=-_DEFAULTS.max_factor,
        le=_DEFAULTS.max_factor,
        allow_inf_nan=False,
        description="steering factor (see mode)",
    )
    mode: SteerMode = Field(
        default="scale",
        description="scale: set the latent's value to factor x its value; add: add factor x "
        "its activation scale (docs/explorer.md)",
    )
    top_k: int = Field(default=10, ge=1, le=_DEFAULTS.max_top_k)


# ----- errors ----------------------------------------------------------------------------------
class FieldError(BaseModel):
    field: str = Field(description="where: a body field, a query parameter, or 'body'")
    message: str


class ErrorBody(BaseModel):
    """Every 4xx/5xx: `detail` says what is wrong; 422s from validation also list `errors`."""

    detail: str
    errors: list[FieldError] | None = Field(
        default=None, description="one entry per invalid field (422 from validation only)"
    )


def _error(description: str, **extra: Any) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description, **extra}


RETRY_AFTER = {
    "Retry-After": {
        "description": "seconds after which the queue has likely drained",
        "schema": {"type": "integer", "minimum": 1},
        "required": True,
    }
}
# What any operation can answer besides 200 (the body limit and the gate apply to every one).
COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error("malformed request: a bad Content-Length, or a body that is not valid UTF-8"),
    413: _error(f"request body over {MAX_BODY_BYTES} bytes"),
    500: _error("internal error (details in the server log, never in the response)"),
    503: _error("busy: more requests waiting than --max_queue", headers=RETRY_AFTER),
}
WITH_PARAMS_ERRORS = {
    **COMMON_ERRORS,
    422: _error("a parameter is invalid or out of range (the message says which and why)"),
}
LATENT_ERRORS = {
    **WITH_PARAMS_ERRORS,
    404: _error("no such latent: the message names the valid range, 0..n_latents-1"),
}


# ----- responses -------------------------------------------------------------------------------
class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LayerMetrics(_Out):
    layer: int
    fvu: Number = Field(description="null with < 2 tokens or no variance")
    fvu_nofirst: Number = Field(description="FVU without position 0; null as fvu")
    first_share: Number = Field(description="position 0's share of the variance")
    mse: Number
    l0: Number
    l1: Number


class MeanMetrics(_Out):
    fvu: Number
    fvu_nofirst: Number
    first_share: Number
    mse: Number
    l0: Number
    l1: Number


class PromptOut(_Out):
    prompt: str
    n_tokens: int
    token_ids: list[int]
    tokens: list[str]
    special: list[bool]
    layers: list[int]
    metrics: list[LayerMetrics]
    metrics_mean: MeanMetrics


class HeatmapOut(_Out):
    position: int | None
    threshold: float
    layers: list[int]
    latents: list[int]
    layer_mean: list[Number]
    values: list[list[Number]] = Field(description="[L][m]")
    share: list[list[Number]] = Field(description="[L][m]")
    max_value: Number
    n_above_threshold: int
    truncated: bool


class ActivationsOut(_Out):
    latent: int
    layer: int
    values: list[Number]
    by_layer: list[list[Number]]
    layers: list[int]
    max_value: Number


class HistogramsOut(_Out):
    position: int | None
    layers: list[int]
    edges: list[float]
    counts: list[list[int]] = Field(description="[L][bins]")
    n_active: list[int]


class Example(_Out):
    """A row of the max_examples table (docs/tables.md); optional columns when present."""

    latent: int
    layer: int
    rank: int
    activation: Number
    token: str | None
    centre: int | None
    context_tokens: list[str | None] | None
    context_activations: list[Number] | None
    token_id: int | None = None
    row: int | None = None
    pos: int | None = None
    document: str | None = None
    genre: str | None = None


class ExamplesOut(_Out):
    latent: int
    layer: int
    available: bool
    message: str | None
    total: int | None = Field(default=None, description="examples of (latent, layer) in the table")
    examples: list[Example]


class TopToken(_Out):
    token_id: int
    token: str
    logit: Number
    prob: Number


class TokenDelta(_Out):
    token_id: int
    token: str
    delta: Number


class CleanLogits(_Out):
    top: list[TopToken]


class LogitsDiff(CleanLogits):
    increases: list[TokenDelta]
    decreases: list[TokenDelta]
    kl: Number = Field(description="KL(clean || this)")
    max_abs_delta: Number


class SteerLogits(LogitsDiff):
    mode: SteerMode
    factor: float
    latent: int
    delta_norm: Number
    scale: float | None = Field(default=None, description="a_j (mode 'add' only)")
    scale_source: str | None = None


class LogitsOut(_Out):
    position: int
    layer: int
    latent: int | None
    token: str
    clean: CleanLogits
    recons: LogitsDiff
    steer: SteerLogits | None


class LatentLayer(_Out):
    layer: int = Field(description="block id")
    p: Number = Field(description="share of the latent's total activation at this layer")
    count: int = Field(description="tokens where it fired at this layer")
    density: Number = Field(description="count / tokens evaluated")


class LatentHistogram(_Out):
    edges: list[float] = Field(description="bin edges shared by every layer")
    counts: list[list[int]] = Field(description="[L][bins] its fired values at each layer")


class OutputEffects(_Out):
    layer: int | None = Field(description="null: the same at every layer (no tuned lens)")
    positive: list[TokenDelta] = Field(description="largest logit increases")
    negative: list[TokenDelta] = Field(description="largest logit decreases")


class LayerExamples(_Out):
    layer: int
    examples: list[Example]


class QuantileExamples(_Out):
    quantile: float = Field(description="of its fired values over every layer")
    activation: Number = Field(description="the value at that quantile")
    examples: list[Example]


class Neighbour(_Out):
    latent: int
    cosine: Number = Field(description="of the decoder columns")
    layer_mean: Number


class LatentOut(_Out):
    """A latent's page (docs/explorer.md, "Latent pages"); the same JSON as the export."""

    latent: int
    n_latents: int
    layers: list[int]
    live: bool | None = Field(description="fired at least once (null: no distribution)")
    layer_mean: Number = Field(description="mean layer index (position in `layers`) of p")
    layer_std: Number = Field(description="std of the layer index under p")
    n_tokens: int | None = Field(description="tokens the distribution and densities count")
    per_layer: list[LatentLayer]
    dists_source: str | None = Field(description="the latent_layer_dists table or the sample")
    histogram: LatentHistogram | None
    output_effects: list[OutputEffects]
    max_examples: list[LayerExamples]
    examples_source: str | None
    quantile_examples: list[QuantileExamples]
    neighbours: list[Neighbour]
    sample_tokens: int = Field(description="held-out tokens sampled (0: none, see message)")
    message: str | None = Field(description="why the sample, hence some sections, is missing")


class TransformerInfo(_Out):
    name: str
    n_layers: int
    d_model: int
    vocab_size: int


class SAEInfo(_Out):
    n_inputs: int
    n_latents: int
    k: int
    expansion_factor: Any = Field(description="from the checkpoint's config")
    standardize: bool
    dead_threshold: float
    layers: list[int]
    dataset: Any = Field(description="from the checkpoint's config (null when not recorded)")
    tuned_lens: bool = Field(
        description="trained on tuned-lens inputs: latents are of the lens-transformed "
        "activations, reconstructions and steering are mapped back through its inverse"
    )


class ExamplesInfo(_Out):
    available: bool
    rows: int
    message: str | None


class Limits(_Out):
    max_prompt_chars: int
    max_prompt_tokens: int
    max_factor: float
    max_top_k: int
    max_bins: int
    max_heatmap_latents: int
    max_examples: int


class CacheStats(_Out):
    entries: int
    bytes: int
    max_entries: int
    max_bytes: int
    hits: int
    misses: int


class PromptCacheStats(CacheStats):
    prompts_analysed: int = Field(description="cache misses that ran the model")


class MemoryInfo(_Out):
    caches_bytes: int = Field(description="the caches' bound (real bytes of their entries)")
    working_set_bytes: int = Field(description="one request's working set, longest prompt")
    slack_bytes: int
    bound_bytes: int = Field(description="peak RSS above idle stays under this")
    workers: int
    max_queue: int
    in_flight: int
    peak_in_flight: int
    rejected: int


class InfoOut(_Out):
    model_name: Any
    transformer: TransformerInfo
    sae: SAEInfo
    examples: ExamplesInfo
    limits: Limits
    steer_modes: list[str]
    cache: PromptCacheStats
    splice_cache: CacheStats
    memory: MemoryInfo
