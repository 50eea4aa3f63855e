"""Operator tools, after the stages: mdv2-inspect (one sample drawn over its source frames),
mdv2-stats (dataset statistics, viewstats for the per-view time model), boxcheck (projected
boxes vs the synthetic truth, in pixels) and timeline (where a build's time went, from Ray's
task timeline). They read the contract and may reuse stage code (JPEG decode, the VAE config);
no stage imports them.
"""
