"""MVDiT: the MagicDrive-V2 denoiser and its condition encoders (docs/model.md).

Entry points: model.registry.build_model / build_from_config / PRESETS, model.conditions.Conditions,
model.text (T5 encoder + caption-embedding cache)."""
