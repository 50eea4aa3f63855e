"""A data source, not a stage: writes a synthetic dataset in the real nuScenes v1.0 table format
(tables, maps, rendered JPEGs, exact truth) that the real devkit reads. `python -m pipeline.synth`
or `mdv2-synth`; see docs/synth.md.
"""
