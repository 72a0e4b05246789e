"""The interactive explorer: a small web app over one MLSAE and its transformer.

`mlsae explore --repo_id DIR` serves it (`server.run`). The compute lives in `service`
(`Explorer`: prompt analysis with a bounded LRU cache, splices, steering), the HTTP layer in
`server` (`create_app`, a FastAPI app with a JSON API and the static page), and the page
itself (vanilla HTML/JS/CSS, no CDN) in `mlsae_core/explorer_static/`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app", "Explorer"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from mlsae_core.explorer.server import create_app

        return create_app
    if name == "Explorer":
        from mlsae_core.explorer.service import Explorer

        return Explorer
    raise AttributeError(f"module 'mlsae_core.explorer' has no attribute {name!r}")
