"""The cache contract: schema, manifest, wds and zarr storage, verify, and padded-batch loading.

Imports nothing else of the package (except `regionspot.errors`)."""
