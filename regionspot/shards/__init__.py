"""The cache contract: schema, run identity, manifest, wds and zarr storage, the set writer, the per-sample
index (and reindex), verify, and padded-batch loading.

Imports nothing else of the package (except `regionspot.errors`)."""
