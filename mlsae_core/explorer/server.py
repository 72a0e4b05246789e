"""The explorer's HTTP layer: a FastAPI app (JSON API + the static page) and `mlsae explore`.

The endpoints are described at /openapi.json and in docs/explorer.md. Every parameter is
validated (strictly: `schemas`); bad input answers 4xx with {"detail": "<what is wrong>"}, never
a stack trace, and every status an operation can answer is declared in the schema with that
body (400, 413, 422, 500, 503; 405 carries `Allow`). Views run on the explorer's gate
(`memory.Gate`). No request names a file: the checkpoint and the examples table are chosen on
the command line only. The page is served at `/` and at `/prompt/<text>` (the URL holds the
state), a latent's page at `/latent/<id>` (`latent`; 404 naming the valid ids outside them).
"""

import argparse
import html
import logging
from collections.abc import Callable
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import pyarrow as pa
import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from mlsae_core.config import from_args, use_data_dir
from mlsae_core.explorer import schemas as sc
from mlsae_core.explorer.examples import ExamplesStore, examples_path
from mlsae_core.explorer.latent import LatentPages
from mlsae_core.explorer.memory import tune_allocator
from mlsae_core.explorer.options import ExplorerSettings, find_checkpoints
from mlsae_core.explorer.schemas import MAX_BODY_BYTES
from mlsae_core.explorer.service import Explorer, load_explorer
from mlsae_core.sae import MLSAE
from mlsae_core.transformer import Transformer

logger = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
STATIC = Path(str(resources.files("mlsae_core") / "explorer_static"))


# ----- errors ----------------------------------------------------------------------------------
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with one readable `detail` line and the `errors` list (FastAPI's own is a list)."""
    errors = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query"))
        msg = str(err.get("msg", "invalid"))
        if err.get("type") == "json_invalid":
            where, msg = "body", f"malformed JSON ({err.get('ctx', {}).get('error', msg)})"
        elif err.get("type") == "extra_forbidden":
            msg = "unknown field"
        errors.append({"field": where or "body", "message": msg})
    text = "; ".join(f"{e['field']}: {e['message']}" for e in errors) or "invalid request"
    return JSONResponse(status_code=422, content={"detail": text, "errors": errors})


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("explorer: unexpected error on %s", request.url.path)
    return JSONResponse(status_code=500, content={"detail": "internal error (see the server log)"})


class _BodyLimit:
    """ASGI middleware: refuse request bodies over `max_bytes` with 413, whether announced by
    Content-Length or streamed in chunks (so no request can make the server buffer a lot)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = f"request body over {self.max_bytes} bytes"
        length = dict(scope.get("headers") or []).get(b"content-length")
        try:
            n = 0 if length is None else int(length)
        except ValueError:
            n = None
        if n is None or n > self.max_bytes:
            status, detail = (400, "bad Content-Length") if n is None else (413, too_big)
            await JSONResponse(status_code=status, content={"detail": detail})(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, too_big)
            return message

        await self.app(scope, limited_receive, send)


# ----- the app -------------------------------------------------------------------------------
def create_app(
    sae: MLSAE,
    transformer: Transformer,
    examples_table: ExamplesStore | pa.Table | None = None,
    **options: Any,
) -> FastAPI:
    """Build the explorer app for an MLSAE and its transformer.

    examples_table: an `ExamplesStore`, a pyarrow Table with the max_examples schema
    (docs/tables.md), or None (the page then says how to compute them). `options` are
    `Explorer`'s: settings, repo_id, examples_message, lens, run_dir.
    """
    if examples_table is not None and not isinstance(examples_table, ExamplesStore):
        examples_table = ExamplesStore(examples_table)
    return explorer_app(Explorer(sae, transformer, examples=examples_table, **options))


def explorer_app(ex: Explorer) -> FastAPI:
    """The app over a loaded explorer: the JSON API, the page and the latent pages."""
    app = FastAPI(
        title="MLSAE explorer",
        description="Multi-layer SAE latents on a prompt: heatmaps, examples, logits, steering.",
        version="1",
        docs_url=None,  # Swagger/Redoc pages load scripts from a CDN; the schema is enough
        redoc_url=None,
    )
    app.state.explorer = ex
    app.state.latents = pages = LatentPages(ex)
    # FastAPI's own handler answers HTTPException (ExplorerInputError 422, the gate's 503 with
    # Retry-After, 405 with Allow) as {"detail": ...} with the exception's headers.
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(Exception, _internal)
    app.add_middleware(_BodyLimit, max_bytes=MAX_BODY_BYTES)
    run = ex.gate.run  # every view is computed on the gate's workers (memory.Gate)

    def post(name: str, view: Callable[..., Any], summary: str) -> None:
        """POST /api/<name>: the body is `sc.<Name>In`, whose fields are `view`'s keyword
        arguments; the answer is `sc.<Name>Out`."""
        body_model, out = (getattr(sc, f"{name.capitalize()}{end}") for end in ("In", "Out"))

        async def endpoint(body: body_model) -> dict[str, Any]:
            return await run(partial(view, **dict(body)))

        responses = sc.WITH_PARAMS_ERRORS
        app.post(
            f"/api/{name}", name=name, summary=summary, response_model=out, responses=responses
        )(endpoint)

    @app.get(
        "/api/info",
        summary="model, SAE, limits, examples, cache and memory status",
        response_model=sc.InfoOut,
        responses=sc.COMMON_ERRORS,
    )
    async def info() -> dict[str, Any]:
        return ex.info()  # cheap, so never queued: status stays readable under a burst

    post("prompt", ex.prompt_view, "tokens and per-layer metrics of a prompt")
    post("heatmap", ex.heatmap, "latents x layers at a token or summed over tokens")
    post("activations", ex.latent_activations, "one latent on every token and layer")
    post("histograms", ex.histograms, "per-layer histograms of latent values")

    @app.get(
        "/api/examples",
        summary="max-activating examples of a latent at a layer",
        response_model=sc.ExamplesOut,
        responses=sc.WITH_PARAMS_ERRORS,
    )
    async def examples(
        latent: Annotated[int, Query(ge=0, description="latent id")],
        layer: Annotated[int, Query(ge=0, description="block id")],
        limit: Annotated[int, Query(ge=1, le=1000)] = 32,
    ) -> dict[str, Any]:
        return await run(ex.examples_view, latent, layer, limit)

    post("logits", ex.logits_view, "top predictions: clean, reconstruction, steered")

    @app.get(
        "/api/latent/{latent}",
        summary="a latent's page: layers, density, values, output tokens, examples, neighbours",
        response_model=sc.LatentOut,
        responses=sc.LATENT_ERRORS,
    )
    async def latent(latent: int) -> dict[str, Any]:
        return await run(pages.page, latent)

    def static_page(name: str) -> Callable[[], FileResponse]:
        return lambda: FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})

    app.get("/", include_in_schema=False)(static_page("index.html"))
    app.get("/prompt/{text:path}", include_in_schema=False)(static_page("index.html"))
    error_div = '<div id="error" role="alert" hidden></div>'
    latent_html = (STATIC / "latent.html").read_text()

    @app.get("/latent/{latent}", include_in_schema=False)
    async def latent_page(latent: str) -> Any:
        """The latent's page; outside the MLSAE's ids, 404 with the range in its error box."""
        try:
            pages.check(latent)
        except HTTPException as exc:
            shown = f'<div id="error" role="alert">{html.escape(exc.detail)}</div>'
            page = latent_html.replace(error_div, shown)
            return HTMLResponse(page, status_code=404, headers={"Cache-Control": "no-cache"})
        return static_page("latent.html")()

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


# ----- loading a checkpoint and the CLI ------------------------------------------------------
def load_app(repo_id: str, settings: ExplorerSettings | None = None) -> FastAPI:
    """The explorer app over a checkpoint (`service.load_explorer`)."""
    return explorer_app(load_explorer(repo_id, settings))


def run(args: argparse.Namespace) -> int:
    """`mlsae explore`: list the checkpoints (and whether each has examples), or serve one
    (blocks until Ctrl-C)."""
    root = use_data_dir(args)  # also where the checkpoint's model is looked up
    if args.list:
        found = find_checkpoints(root)
        if not found:
            print(f"no trained checkpoints under {root}")
        for d in found:
            print(f"{d}    examples: {'yes' if examples_path(d).is_file() else 'no'}")
        return 0
    if not args.repo_id:
        raise ValueError("--repo_id is required (or --list to see the trained checkpoints)")
    settings = from_args(ExplorerSettings, args)  # refuses a bad setting before loading
    tuned = tune_allocator()  # before any thread starts (memory.py, docs/explorer.md)
    logger.info("glibc allocator tuned: %s", tuned)
    app = load_app(args.repo_id, settings)
    if settings.host not in LOOPBACK:
        logger.warning(
            "binding to %s: the explorer is reachable from other machines", settings.host
        )
    print(f"MLSAE explorer on http://{settings.host}:{settings.port}/  (Ctrl-C to stop)")
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
    return 0
