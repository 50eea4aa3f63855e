"""The sample contract every stage shares (DESIGN.md section 3): the member table, views, classes,
key and path templates (schema), fast .npy reads (npyio), deterministic tar IO (shardio),
manifest and quarantine tables (manifest), local/object storage (storage) and the coordinate
conventions' math (geometry). Imports numpy, pyarrow and fsspec only; never a later stage.
"""
