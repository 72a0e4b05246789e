"""mlsae_core: Multi-Layer Sparse Autoencoders over any HuggingFace causal LM.

Import what you use from its module (docs/architecture.md lists them): the model from
`mlsae_core.sae` (`MLSAE`), settings from `mlsae_core.config`, `train` from
`mlsae_core.train`, `evaluate` from `mlsae_core.evaluate`, the language model wrapper from
`mlsae_core.transformer` (`Transformer`). Importing the package itself loads nothing, so
Dagster's code server starts fast (torch and transformers load on first use).
"""
