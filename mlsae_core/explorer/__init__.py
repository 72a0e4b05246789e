"""The interactive explorer: a small web app over one MLSAE and its transformer.

`mlsae explore --repo_id DIR` serves it (`server.run`); one concept per module (each says
which), the page itself in `mlsae_core/explorer_static/`. This package imports nothing:
`options` is imported to build `mlsae`'s parser, and that must not pull in torch or FastAPI.
"""
