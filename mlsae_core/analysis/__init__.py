"""Analyses of trained MLSAEs (docs/method.md §5), one module each; import the one you need.

Collectors (`dists.LayerDists`, `variance.TokenLayerVariance`, `examples.MaxExamples`) ride
along one `mlsae_core.evaluate.evaluate` pass; the `geometry` and `prompts` analyses take
weights or a transformer directly; `tables` turns every result into a Parquet-ready
`pyarrow.Table` and `summaries` builds the cross-config tables.
"""
