"""The authors' MagicDriveSTDiT3 configuration -> this project's ModelConfig.

Three sources give their model's keyword arguments:
- a MagicDriveDiT config .py (configs/magicdrive/{train,test,inference}/*.py): its top-level
  `model = dict(...)`, read with `ast` (never executed; model/interop/fixture_io.read_config);
  their scripts add in_channels (the VAE's 16), caption_channels 4096 and model_max_length 300,
  and "MagicDriveSTDiT3-XL/2" fixes depth 28, hidden 1152, 16 heads, patch (1, 2, 2);
- the config.json of a model folder (their save_pretrained: every MagicDriveSTDiT3Config field
  that differs from the class defaults);
- a JSON file of the config's `model` dict.
Options that only choose kernels, sequence parallelism or what trains (flash attention, xformers,
fused LayerNorm, freeze_*, simulate_sp_size) do not change the weights and are ignored; an
option this network does not implement is an error naming it.
"""
from __future__ import annotations

import json
from pathlib import Path

from model.config import ModelConfig
from pipeline.contract.cli import BadInput

# MagicDriveSTDiT3Config's class defaults that matter here (what config.json leaves out)
CLASS_DEFAULTS = dict(input_sq_size=512, force_pad_h_for_sp_size=None, in_channels=4, patch_size=(1, 2, 2),
                      hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4.0, pred_sigma=True, caption_channels=4096,
                      model_max_length=300, qk_norm=True, with_temp_block=True, control_depth=13,
                      use_x_control_embedder=False, use_st_cross_attn=False, map_embedder_downsample_rate=4,
                      micro_frame_size=17, control_skip_cross_view=True, control_skip_temporal=True)
# what their XL/2 builder and their train / inference scripts add to a config file's model dict
XL2 = dict(depth=28, hidden_size=1152, num_heads=16, patch_size=(1, 2, 2))
SCRIPT_ARGS = dict(in_channels=16, caption_channels=4096, model_max_length=300)


def read_model_kwargs(path: str | Path) -> dict:
    """MagicDriveSTDiT3Config keyword arguments from a config .py, a config.json or a model-dict JSON."""
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"--config {path}: no such file (give their config .py, a model folder's config.json "
                       "or a JSON of the config's model dict)")
    if p.suffix == ".py":
        from model.interop.fixture_io import read_config
        try:
            env = read_config(p)
        except SyntaxError as e:
            raise BadInput(f"--config {path}: not a Python file ({e.msg}, line {e.lineno})") from None
        if not isinstance(env.get("model"), dict):
            raise BadInput(f"--config {path}: no top-level `model = dict(...)` that can be read without executing it")
        kw = dict(CLASS_DEFAULTS, **SCRIPT_ARGS, **env["model"])
        if str(kw.get("type", "")).endswith("XL/2"):
            kw.update(XL2)
        return kw
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"--config {path}: not JSON ({e})") from None
    if not isinstance(d, dict):
        raise BadInput(f"--config {path}: expected a JSON object of MagicDriveSTDiT3Config fields")
    if d.get("model_type") == "MagicDriveSTDiT3":      # save_pretrained's config.json
        return dict(CLASS_DEFAULTS, **d)
    return dict(CLASS_DEFAULTS, **SCRIPT_ARGS, **d, **(XL2 if str(d.get("type", "")).endswith("XL/2") else {}))


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise BadInput(f"their config: {what} is not supported by this network (model/interop/authors_config.py)")


def _time_down(factor, where: str) -> str:
    if factor in (4.5, "4.5"):
        return "cog"
    if factor in (-1, None):
        return "mean"
    raise BadInput(f"their config: {where}.time_downsample_factor {factor!r}; supported: 4.5 (CogVideoX) or -1 (mean)")


def to_model_config(kw: dict) -> ModelConfig:
    """Their kwargs -> ModelConfig, refusing what this network does not implement."""
    D = int(kw["hidden_size"])
    patch = tuple(kw.get("patch_size", (1, 2, 2)))
    _need(len(patch) == 3 and patch[0] == 1 and patch[1] == patch[2], f"patch_size {patch}")
    _need(not kw.get("pred_sigma"), "pred_sigma=True (a learned variance)")
    _need(not kw.get("use_st_cross_attn"), "use_st_cross_attn")
    _need(kw.get("map_embedder_downsample_rate") in (4.5, "4.5"), f"map_embedder_downsample_rate "
          f"{kw.get('map_embedder_downsample_rate')!r} (only 4.5)")
    _need(kw.get("micro_frame_size") is None, f"micro_frame_size {kw.get('micro_frame_size')!r} for the map "
          "(only None)")
    cam, frame, box = kw.get("cam_encoder_param", {}), kw.get("frame_emb_param", {}), kw.get("bbox_embedder_param", {})
    _need(cam.get("input_dim", 3) == 3 and cam.get("num", 7) == 7 and cam.get("after_proj", False),
          f"cam_encoder_param {cam}")
    _need(frame.get("num", 4) == 4 and frame.get("after_proj", False) and frame.get("use_scale_shift_table"),
          f"frame_emb_param {frame}")
    _need(box.get("mode") == "all-xyz" and not box.get("minmax_normalize", True) and box.get("after_proj")
          and box.get("use_scale_shift_table") and not box.get("trainable_class_token", False),
          "bbox_embedder_param mode/minmax_normalize/after_proj/use_scale_shift_table/trainable_class_token")
    proj = list(box.get("proj_dims", []))
    _need(len(proj) == 4 and proj[0] == proj[3] == D == box.get("class_token_dim") and proj[1] == proj[2],
          f"bbox proj_dims {proj} / class_token_dim {box.get('class_token_dim')} (expected [D, m, m, D], D)")
    freqs = box.get("embedder_num_freq", 4)
    _need(cam.get("num_freqs", 4) == freqs == frame.get("num_freqs", 4), "different Fourier band counts")
    _need(box.get("num_heads", 8) == frame.get("num_heads", 8), "different box / ego-pose encoder heads")
    _need(box.get("qk_norm") and frame.get("qk_norm") and box.get("mlp_ratio", 4.0) == frame.get("mlp_ratio", 4.0)
          == 4.0, "box / ego-pose encoders without qk_norm or with mlp_ratio != 4")
    td = _time_down(box.get("time_downsample_factor", -1), "bbox_embedder_param")
    _need(td == _time_down(frame.get("time_downsample_factor", -1), "frame_emb_param"),
          "different box / ego-pose time downsampling")
    m = kw.get("map_embedder_param", {})
    fp = kw.get("force_pad_h_for_sp_size")
    return ModelConfig(
        hidden=D, depth=int(kw["depth"]), heads=int(kw["num_heads"]), mlp_ratio=float(kw.get("mlp_ratio", 4.0)),
        in_channels=int(kw["in_channels"]), patch=int(patch[1]), text_dim=int(kw["caption_channels"]),
        text_len=int(kw["model_max_length"]), qk_norm=bool(kw.get("qk_norm", True)),
        input_sq_size=int(kw.get("input_sq_size", 512)), temporal=bool(kw.get("with_temp_block", True)),
        control_depth=int(kw.get("control_depth", 13)),
        control_temporal=not kw.get("control_skip_temporal", True),
        control_cross_view=not kw.get("control_skip_cross_view", True),
        x_control_embedder=bool(kw.get("use_x_control_embedder", False)),
        num_classes=int(box.get("n_classes", 10)), box_mid_dim=int(proj[1]), fourier_freqs=int(freqs),
        cond_heads=int(box.get("num_heads", 8)), box_sample_id=bool(box.get("sample_id", False)),
        cond_time_down=td, map_channels=int(m.get("conditioning_size", [8])[0]),
        map_stem=tuple(m.get("block_out_channels", (32, 64, 128, 256))), force_pad_h=int(fp or 0))
