"""The interactive explorer: a small web app over one MLSAE and its transformer.

`mlsae explore --repo_id DIR` serves it (`server.run`). One concept per module:

    options    ExplorerSettings (every setting and limit, defined once) and the CLI flags
    cache      ByteLRU, the entry- and byte-bounded LRU cache
    examples   ExamplesStore: the run directory's max_examples table, indexed in memory
    prompt     the one analysis of a prompt (forward, MLSAE, metrics.ReconstructionMetrics)
    steering   the residual-stream edit that steers a latent
    memory     the gate on concurrent work (503 + Retry-After), the allocator, the bound
    schemas    the API's request, response and error bodies (the OpenAPI schema)
    service    Explorer, the façade the HTTP layer calls (validation, caches, views)
    server     the FastAPI app (JSON API + the static page) and `mlsae explore`
    wire       JSON-safe numbers and the error of a bad request parameter

The page itself (vanilla HTML/JS/CSS, no CDN) is in `mlsae_core/explorer_static/`. This
package imports nothing: `options` is imported to build `mlsae`'s parser, and that must not
pull in torch or FastAPI.
"""
