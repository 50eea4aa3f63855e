"""Parity fixtures from the authors' MagicDriveDiT code: a tiny random `MagicDriveSTDiT3`, its inputs and outputs.

Run it with the scratch venv of docs/model.md ("Rebuilding the parity fixtures"), never with this project's venv:

    /work/scratch/mdd-venv/bin/python tools/make_magicdrivedit_fixture.py --mdd /work/ref/MagicDriveDiT \\
        --out tests/data/magicdrivedit

It imports their modules from the checkout given (nothing of theirs is copied, nothing of this project is
imported: the fixtures must stay valid while model/ changes). What only their checkpoint I/O, ColossalAI,
the mmengine registry, the NPU and torchvision need is replaced by stub modules in `sys.modules`; their
attention then runs its plain-torch branches (USE_XFORMERS=False, flash attention off, no CUDA).
The model is built from THEIR stage-3 config's `model` dict (read with `ast`, never executed) at a tiny
width. Every constant tensor of their init (zero projections, unit norms) gets small random values so
every path contributes, and a few weights are scaled so that the network is well conditioned (its fp32
output within ~1e-6 of fp64: recorded per case as `fp64_rel_diff`); all weights are rounded to fp16
before the forward, so the fp16 copy is exact.
Outputs: weights.safetensors, cases.safetensors, fixture.json, config.json, stage3_keys.json
(tests/data/magicdrivedit/FORMAT.md says how to read each).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # this repo: the fixture format, the stubs
from model.interop.fixture_io import _dtype, decode_args, encode_args, read_config  # noqa: E402
from tools.magicdrivedit_stubs import install_stubs  # noqa: E402
from tools.magicdrivedit_weights import is_rope_freqs, randomize  # noqa: E402

STAGE3 = "configs/magicdrive/train/stage3_higher-b-v3.1-12Hz_stdit3_CogVAE_boxTDS_wCT_xCE_wSST_bs4_lr1e-5_sp4simu8.py"
TINY = dict(hidden_size=64, depth=3, control_depth=2, num_heads=4)  # their XL/2: 1152, 28, 13, 16
FULL = dict(hidden_size=1152, depth=28, num_heads=16, patch_size=(1, 2, 2))  # what their XL/2 builder fixes
# what their train/inference scripts add to the config's model dict (CogVAE 16 channels, T5-XXL 4096 x 300)
BUILD_ARGS = dict(in_channels=16, caption_channels=4096, model_max_length=300)
VIEWS = ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_RIGHT", "CAM_BACK", "CAM_BACK_LEFT")
VIEW_YAW_DEG = (55.0, 0.0, -55.0, -110.0, 180.0, 110.0)  # rough nuScenes rig, their view order
SEED = 21
CAPTION_STD = 0.2  # random stand-ins for T5-XXL outputs


def model_kwargs(model_dict: dict, tiny: bool) -> dict:
    """MagicDriveSTDiT3Config kwargs: the config's model dict + what their scripts and XL/2 builder add.
    Tiny: narrower and shallower, embedder widths scaled; classes and all other options as theirs.
    Both: no fused LayerNorm (apex; their LayerNorms have no affine parameters either way)."""
    kw = {k: copy.deepcopy(v) for k, v in model_dict.items() if k not in ("type", "from_pretrained",
                                                                          "force_huggingface")}
    kw.update(FULL, **BUILD_ARGS, enable_layernorm_kernel=False)
    for p in ("bbox_embedder_param", "frame_emb_param", "cam_encoder_param"):
        if "enable_layernorm_kernel" in kw[p]:
            kw[p]["enable_layernorm_kernel"] = False
    if not tiny:
        return kw
    h = TINY["hidden_size"]
    kw.update(TINY, enable_flash_attn=False, enable_xformers=False, enable_sequence_parallelism=False)
    box = kw["bbox_embedder_param"]
    box["class_token_dim"] = h  # class tokens are T5 names through y_embedder: hidden wide
    box["proj_dims"] = [h if d == FULL["hidden_size"] else max(8, round(d * h / FULL["hidden_size"]))
                        for d in box["proj_dims"]]
    for p in (box, kw["frame_emb_param"]):
        p.update(enable_flash_attn=False, enable_xformers=False)
    kw["map_embedder_param"]["block_out_channels"] = [max(4, c // 8) for c in
                                                      kw["map_embedder_param"]["block_out_channels"]]
    return kw


def build(kwargs: dict):
    from magicdrivedit.models.magicdrive.magicdrive_stdit3 import MagicDriveSTDiT3, MagicDriveSTDiT3Config
    return MagicDriveSTDiT3(MagicDriveSTDiT3Config(**copy.deepcopy(kwargs)))


def build_meta(kwargs: dict):
    """The full model without memory: parameters on the meta device; only their drop-path schedule
    (`torch.linspace(...).item()`) needs real numbers, so linspace alone runs on the CPU."""
    linspace = torch.linspace
    torch.linspace = lambda *a, **k: linspace(*a, **{**k, "device": "cpu"})
    try:
        with torch.device("meta"):
            return build(kwargs)
    finally:
        torch.linspace = linspace


# ---- inputs as their dataloader gives them -----------------------------------------------------------------
def _rz(yaw: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def camera_params(T: int, rng: np.random.Generator) -> np.ndarray:
    """(V, T, 3, 7): [K of the original 1600x900 image | camera->LiDAR(t) 3x4]; slightly different per frame
    (their data: the camera fires at its own time), so a reader of the wrong frame is caught."""
    cam_axes = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # x right, y down, z ahead
    out = np.zeros((len(VIEWS), T, 3, 7))
    for v, yaw in enumerate(np.radians(VIEW_YAW_DEG)):
        f = 809.2 if VIEWS[v] == "CAM_BACK" else 1266.4
        K = np.array([[f, 0.0, 800 + rng.uniform(-20, 20)], [0.0, f, 450 + rng.uniform(-40, 40)], [0, 0, 1.0]])
        for t in range(T):
            R = _rz(yaw + 0.002 * t * rng.standard_normal()) @ cam_axes
            trans = _rz(yaw) @ np.array([1.0, 0.0, 0.0]) + np.array([0.6, 0.0, 1.6]) + 0.01 * t
            out[v, t] = np.concatenate([K, R, trans[:, None]], axis=1)
    return out


def ego_motion(T: int, rng: np.random.Generator) -> np.ndarray:
    """(T, 4, 4) LiDAR(0) -> LiDAR(t) point transforms (their next2top, v2): identity at t = 0."""
    speed, yaw_rate = rng.uniform(0.5, 1.2), rng.uniform(-0.03, 0.03)  # metres and radians per 12 Hz frame
    out, pos = np.zeros((T, 4, 4)), np.zeros(3)
    for t in range(T):
        yaw = yaw_rate * t
        if t:
            pos = pos + speed * _rz(yaw) @ np.array([1.0, 0.0, 0.0])
        out[t, :3, :3], out[t, :3, 3], out[t, 3, 3] = _rz(yaw).T, -_rz(yaw).T @ pos, 1.0
    return out


def box_corners(center, dims, yaw) -> np.ndarray:
    """(8, 3) in mmdet3d LiDARInstance3DBoxes.corners order: x0y0z0, x0y0z1, x0y1z1, x0y1z0, x1y0z0, ...;
    origin (0.5, 0.5, 0): the centre is the bottom centre."""
    bits = np.array([[0, 0, 0], [0, 0, 1], [0, 1, 1], [0, 1, 0], [1, 0, 0], [1, 0, 1], [1, 1, 1], [1, 1, 0]])
    return (_rz(yaw) @ ((bits - [0.5, 0.5, 0.0]) * dims).T).T + center


def boxes(T: int, n: int, n_max: int, rel_pos, cams, rng, dim: int) -> dict:
    """One sample's boxes as their collate gives them, views already folded (V, T, n_max, ...):
    the same corners and classes for every view; masks per view: 1 visible (positive depth), 0 absent
    or unseen (and batch padding, class -1), -1 for a dropped non-keyframe (all views)."""
    V = len(VIEWS)
    corners, classes, masks = np.zeros((T, n_max, 8, 3)), -np.ones((T, n_max)), np.zeros((V, T, n_max))
    for i in range(n):
        c0, yaw0 = np.array([rng.uniform(-40, 40), rng.uniform(-40, 40), rng.uniform(-2, 0)]), rng.uniform(-3, 3)
        dims, vel, cls = rng.uniform([0.5, 0.5, 1.0], [10, 3, 3.5]), rng.uniform(-1, 1, 3) * [1, 1, 0], rng.integers(10)
        first, last = sorted(rng.integers(0, T, 2)) if i % 3 == 2 else (0, T - 1)  # some come and go
        for t in range(first, last + 1):
            world = box_corners(c0 + t * vel, dims, yaw0)
            corners[t, i] = world @ rel_pos[t, :3, :3].T + rel_pos[t, :3, 3]
            classes[t, i] = cls
            for v in range(V):
                R, tr = cams[v, t, :, 3:6], cams[v, t, :, 6]
                depth = ((corners[t, i] - tr) @ R)[:, 2]  # camera z of each corner
                masks[v, t, i] = float((depth > 0).any())
    for t in [t for t in range(1, T) if t % 6][::4]:  # their bbox_drop_ratio on non-keyframes
        masks[:, t] = np.where(masks[:, t] == 1, -1.0, masks[:, t])
    latent = rng.standard_normal((n_max, dim))  # their add_box_latent: one per box, shared over T and views
    return {"bboxes": np.broadcast_to(corners, (V,) + corners.shape), "classes": np.broadcast_to(classes, (V, T, n_max)),
            "masks": masks, "box_latent": np.broadcast_to(latent[None, None], (V, T, n_max, dim))}


def make_inputs(spec: dict, model, seed: int) -> dict:
    """Keyword arguments of their forward for one case, as their train/inference scripts build them."""
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    B, T, (H, W) = spec["B"], spec["T"], spec["size"]
    Tl, G = (T - 1) // 4 + 1, 200 if H < 424 else 400  # CogVAE latent frames; their map grid per bucket
    V, n_max, dim = len(VIEWS), max(spec["boxes"]), model.bbox_embedder.box_latent_shape[1]
    f32 = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)  # noqa: E731
    half = lambda t: t.half().float()  # noqa: E731
    samples = []
    for b in range(B):
        rel, cams = ego_motion(T, rng), camera_params(T, rng)
        samples.append((boxes(T, spec["boxes"][b], n_max, rel, cams, rng, dim), cams, rel))
    bbox = {k: f32(np.concatenate([s[0][k] for s in samples])) for k in samples[0][0]}  # (B V, T, N, ...)
    bbox["box_latent"] = half(bbox["box_latent"])
    lengths = spec["captions"]
    stored = max(lengths) + 2  # their model reads max(len) + 1 tokens; one more catches a wrong cut
    y = torch.zeros(B, 1, BUILD_ARGS["model_max_length"], BUILD_ARGS["caption_channels"])
    y[:, :, :stored] = half(CAPTION_STD * torch.randn(B, 1, stored, y.shape[-1], generator=gen))
    mask = (torch.arange(y.shape[2])[None] < torch.tensor(lengths)[:, None]).long()  # T5 attention mask
    args = {
        "x": half(torch.randn(B, 16 * V, Tl, H // 8, W // 8, generator=gen)),  # channels (C NC): view fastest
        "timestep": torch.tensor(spec["t"][:B], dtype=torch.float32),
        "y": y, "mask": mask,
        "maps": (torch.rand(B, T, 8, G, G, generator=gen) < 0.3).float(),
        "bbox": bbox,
        "cams": f32(np.concatenate([s[1] for s in samples]))[:, :, None],  # (B V, T, 1, 3, 7)
        "rel_pos": f32(np.stack([s[2] for s in samples])).repeat_interleave(V, 0)[:, :, None],  # (B V, T, 1, 4, 4)
        "fps": torch.full((B,), 120.0 if T == 1 else 12.0),
        "height": torch.full((B,), float(H)), "width": torch.full((B,), float(W)),
        "num_frames": torch.full((B,), float(T)),
        "drop_cond_mask": torch.ones(B), "drop_frame_mask": torch.ones(B, T),
        "mv_order_map": MV_ORDER_MAP, "t_order_map": None,
    }
    for b in spec.get("drop_all", ()):  # their training drop: every condition of sample b
        args["drop_cond_mask"][b], args["drop_frame_mask"][b], args["mask"][b] = 0, 0, 1
    for b, frames in spec.get("drop_frames", {}).items():
        args["drop_frame_mask"][b, frames] = 0
    if "x_mask" in spec:
        args["x_mask"] = torch.tensor(spec["x_mask"], dtype=torch.bool)
    return args, stored


def cfg_pair(args: dict, model) -> dict:
    """Their inference layout for classifier-free guidance: batch [cond, null] by add_null_condition
    (null boxes, learned null camera and trajectory, map kept), y_null = the learned caption embedding,
    and the text mask of the conditional half only (their model repeats it)."""
    from magicdrivedit.utils.inference_utils import add_null_condition
    cond = {k: v for k, v in args.items() if k not in ("y", "mask", "timestep", "x")}
    pair = add_null_condition(copy.deepcopy(cond), model.camera_embedder.uncond_cam, model.frame_embedder.uncond_cam)
    y_null = model.y_embedder.y_embedding[None].repeat(args["y"].shape[0], 1, 1)[:, None]
    return {"x": torch.cat([args["x"]] * 2), "timestep": torch.cat([args["timestep"]] * 2),
            "y": torch.cat([args["y"], y_null.detach().clone()]), "mask": args["mask"], **pair}


MV_ORDER_MAP = None  # their config's mv_order_map, set in main()

CASES = {  # B samples, T pixel frames, pixel size; box counts and caption lengths (tokens) per sample
    "video": dict(B=1, T=17, size=(64, 112), boxes=[6], captions=[6], t=[873.0]),
    "image": dict(B=1, T=1, size=(224, 400), boxes=[5], captions=[5], t=[512.25]),  # map grid = latent grid
    "odd_height": dict(B=1, T=1, size=(424, 64), boxes=[4], captions=[4], t=[333.5]),  # latent 53 x 8, 400 map
    "drop": dict(B=2, T=9, size=(64, 112), boxes=[5, 3], captions=[3, 6], t=[700.0, 150.5],
                 drop_all=[0], drop_frames={1: [3, 6]}),
    "cfg_pair": dict(B=1, T=5, size=(64, 112), boxes=[4], captions=[5], t=[640.0], pair=True),
    "x_mask": dict(B=2, T=9, size=(64, 112), boxes=[3, 5], captions=[4, 6], t=[920.0, 411.0],
                   x_mask=[[False, True, True], [True, True, False]]),
}
SAMPLE = dict(B=1, T=5, size=(64, 112), boxes=[4], captions=[6], t=[1000.0], steps=3, cfg_scale=2.0)


# ---- storage (FORMAT.md) -----------------------------------------------------------------------------------
def forward(model, args: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**copy.deepcopy(args))


def to_double(a):
    """The same call in float64: every floating tensor (dict members too) cast; the rest as it is."""
    if isinstance(a, dict):
        return {k: to_double(v) for k, v in a.items()}
    return a.double() if torch.is_tensor(a) and a.is_floating_point() else a


def rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in float64."""
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max())


# ---- cases, sampling, sensitivity, the full key list ----------------------------------------------------
def run_case(name: str, spec: dict, model, model64, seed: int, tensors: dict) -> dict:
    args, stored = make_inputs(spec, model, seed)
    if spec.get("pair"):
        args = cfg_pair(args, model)
    out = forward(model, args)
    entry = {"spec": spec, "seed": seed, **encode_args(f"case/{name}/input", args, stored, tensors)}
    again = forward(model, decode_args(tensors, entry))  # the stored inputs alone reproduce the output
    assert torch.equal(again, out), f"{name}: decoded inputs give another output"
    assert torch.isfinite(out).all() and out.abs().max() > 0, name
    tensors[f"case/{name}/output"] = out.contiguous()
    entry["output"] = {"key": f"case/{name}/output", "shape": list(out.shape), "dtype": _dtype(out),
                       "max_abs": float(out.abs().max()), "std": float(out.std())}
    entry["fp64_rel_diff"] = rel_diff(out, forward(model64, to_double(args)))  # the same call in float64
    print(f"case {name}: output {tuple(out.shape)} std {out.std():.4f}, "
          f"fp32 vs fp64 {entry['fp64_rel_diff']:.1e}", flush=True)
    return entry


class _Captions:
    """Their text encoder as RFLOW.sample uses it: encode -> the T5 output (y, mask), null(n) -> the
    learned null caption repeated (their T5Encoder.null)."""

    def __init__(self, y, mask, model):
        self.y, self.mask, self.model = y, mask, model

    def encode(self, prompts):
        return {"y": self.y.clone(), "mask": self.mask.clone()}

    def null(self, n):
        return self.model.y_embedder.y_embedding[None].repeat(n, 1, 1)[:, None]


def run_sample(model, model64, scheduler_cfg: dict, seed: int, tensors: dict) -> dict:
    """A short CFG sampling loop of theirs: RFLOW with their stage-3 scheduler settings, the null branch of
    scripts/inference_magicdrive.py (add_null_condition, map kept) and its all-ones mask strategy."""
    from magicdrivedit.schedulers.rf import RFLOW
    from magicdrivedit.schedulers.rf.rectified_flow import timestep_transform
    from magicdrivedit.utils.inference_utils import add_null_condition, apply_mask_strategy
    args, stored = make_inputs(SAMPLE, model, seed)
    B, z = SAMPLE["B"], args.pop("x")
    args.pop("timestep")
    y, mask = args.pop("y"), args.pop("mask")
    settings = {k: v for k, v in scheduler_cfg.items() if k != "type"}
    settings.update(num_sampling_steps=SAMPLE["steps"], cfg_scale=SAMPLE["cfg_scale"])
    scheduler = RFLOW(**settings)
    extra = add_null_condition(copy.deepcopy(args), model.camera_embedder.uncond_cam, model.frame_embedder.uncond_cam)
    with torch.no_grad():
        out = scheduler.sample(model, _Captions(y, mask, model), z=z.clone(), prompts=[""] * B, device="cpu",
                               additional_args=extra, mask=apply_mask_strategy(z, [""] * B, [""] * B, 0),
                               progress=False)
    steps = SAMPLE["steps"]
    ts = torch.stack([timestep_transform(torch.full((B,), (1 - i / steps) * 1000.0), copy.deepcopy(extra),
                                         num_timesteps=1000, cog_style=settings["cog_style_trans"])
                      for i in range(steps)])
    entry = {"spec": SAMPLE, "seed": seed, "scheduler": settings,
             "fp64_rel_diff": rel_diff(out, loop_fp64(model64, z, y, mask, extra, ts, SAMPLE["cfg_scale"])),
             **encode_args("sample/input", {"y": y, "mask": mask, **args}, stored, tensors)}
    tensors["sample/noise"], tensors["sample/output"], tensors["sample/timesteps"] = z.half(), out, ts
    entry.update(noise={"key": "sample/noise", "shape": list(z.shape), "dtype": "float32", "stored_dtype": "float16"},
                 output={"key": "sample/output", "shape": list(out.shape), "dtype": "float32"},
                 timesteps={"key": "sample/timesteps", "shape": list(ts.shape), "values": ts[:, 0].tolist()})
    print(f"sample: {steps} steps, timesteps {ts[:, 0].tolist()}, output std {out.std():.4f}, "
          f"fp32 vs fp64 {entry['fp64_rel_diff']:.1e}", flush=True)
    return entry


def loop_fp64(model64, z, y, mask, extra: dict, ts: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """The sampling loop of FORMAT.md in float64 from the same noise and the same (float32) timesteps:
    a [cond, null] call per step with an all-True x_mask, v = v_null + cfg (v_cond - v_null),
    z += v dt / 1000. (Their sampler itself cannot run in float64: its timestep transform would give
    1000 + 2e-13 and so another x_mask.)"""
    B, z = z.shape[0], z.double()
    args = to_double({**copy.deepcopy(extra), "mask": mask, "x_mask": torch.ones(2 * B, z.shape[2], dtype=torch.bool),
                      "y": torch.cat([y, model64.y_embedder.y_embedding[None].repeat(B, 1, 1)[:, None].float()])})
    ts = ts.double()
    for i in range(ts.shape[0]):
        with torch.no_grad():
            cond, null = model64(torch.cat([z, z]), torch.cat([ts[i], ts[i]]), **copy.deepcopy(args)).chunk(2)
        dt = ts[i] - ts[i + 1] if i + 1 < ts.shape[0] else ts[i]
        z = z + (null + cfg_scale * (cond - null)) * (dt / 1000.0)[:, None, None, None, None]
    return z


def pattern(key: str) -> str:
    return re.sub(r"(blocks_[st])\.\d+\.", r"\1.*.", key)


def sensitivity(model, args: dict) -> dict:
    """max |out - out'| / max |out| when every tensor of one key pattern is zeroed: every path contributes."""
    ref = forward(model, args)
    groups: dict = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if t.is_floating_point() and not is_rope_freqs(key):
            groups.setdefault(pattern(key), []).append(t)
    out = {}
    for pat, ts in sorted(groups.items()):
        saved = [t.detach().clone() for t in ts]
        with torch.no_grad():
            for t in ts:
                t.zero_()
            out[pat] = float((forward(model, args) - ref).abs().max() / ref.abs().max())
            for t, s in zip(ts, saved):
                t.copy_(s)
    return out


def key_list(kwargs: dict) -> dict:
    model = build_meta(kwargs)
    params = dict(model.named_parameters())
    keys = {k: {"shape": list(t.shape), "dtype": _dtype(t), "kind": "parameter" if k in params else "buffer"}
            for k, t in model.state_dict().items()}
    config = json.loads(model.config.to_json_string())  # the effective config: control_depth 13 is a default
    return {"config": config, "kwargs": kwargs, "parameters": sum(p.numel() for p in params.values()), "keys": keys}


def versions() -> dict:
    pk = ("torch", "numpy", "einops", "timm", "rotary-embedding-torch", "transformers", "safetensors", "tqdm", "pillow")
    return {"python": sys.version.split()[0], **{p: metadata.version(p) for p in pk}}


def git_commit(path: Path) -> str | None:
    r = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--mdd", type=Path, required=True, help="a checkout of the authors' MagicDriveDiT")
    ap.add_argument("--out", type=Path, default=Path("tests/data/magicdrivedit"), help="fixture folder")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of: " + ",".join(CASES))
    ap.add_argument("--no-sample", action="store_true", help="skip the CFG sampling loop")
    a = ap.parse_args(argv)
    cases = [c for c in a.cases.split(",") if c]
    if not (a.mdd / STAGE3).is_file() or any(c not in CASES for c in cases):
        ap.error(f"need {a.mdd / STAGE3} and cases among {','.join(CASES)}")
    install_stubs(a.mdd)
    cfg = read_config(a.mdd / STAGE3)
    global MV_ORDER_MAP
    MV_ORDER_MAP = cfg["mv_order_map"]
    tiny = model_kwargs(cfg["model"], tiny=True)
    torch.manual_seed(SEED)  # their init draws from the global generator
    model = build(tiny).eval().requires_grad_(False)  # no autograd: null inputs copy parameters
    randomize(model, torch.Generator().manual_seed(SEED), CAPTION_STD)
    model64 = copy.deepcopy(model).double()  # the same network in float64: how well conditioned it is
    tensors: dict = {}
    meta = {"format": 1, "generator": "tools/make_magicdrivedit_fixture.py", "seed": SEED, "views": list(VIEWS),
            "magicdrivedit": {"commit": git_commit(a.mdd), "config": STAGE3}, "packages": versions(),
            "model": {"kwargs": tiny, "config_model_dict": cfg["model"], "tiny": TINY},
            "forward_args": ["x", "timestep", "y", "maps", "bbox", "cams", "rel_pos", "fps", "height", "width",
                             "drop_cond_mask", "drop_frame_mask", "mv_order_map", "t_order_map", "mask", "x_mask"],
            "cases": {}}
    for name in cases:  # a case's seed follows its name, so a subset run makes the same inputs
        meta["cases"][name] = run_case(name, CASES[name], model, model64, SEED * 100 + list(CASES).index(name),
                                       tensors)
    if "drop" in cases:
        args = decode_args(tensors, meta["cases"]["drop"])
        meta["sensitivity"] = {"case": "drop", "rel_change": sensitivity(model, args)}
        weak = {k: v for k, v in meta["sensitivity"]["rel_change"].items() if v <= 2e-4}  # 2x the parity TOL
        print(f"sensitivity: {len(meta['sensitivity']['rel_change'])} key patterns, weak: {weak}", flush=True)
    if not a.no_sample:
        meta["sample"] = run_sample(model, model64, cfg["val"]["scheduler"], SEED * 100 + 99, tensors)
    from safetensors.torch import save_file
    a.out.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    weights = {k: (t if is_rope_freqs(k) or not t.is_floating_point() else t.half()).contiguous() for k, t in sd.items()}
    params = {k for k, _ in model.named_parameters()}
    meta["weights"] = {"file": "weights.safetensors", "count": len(weights), "buffers": sorted(set(sd) - params),
                       "fp32": sorted(k for k in weights if weights[k].dtype == torch.float32)}
    save_file(weights, str(a.out / "weights.safetensors"), metadata={"format": "pt"})
    save_file(tensors, str(a.out / "cases.safetensors"), metadata={"format": "pt"})
    model.config.to_json_file(str(a.out / "config.json"))  # what their save_pretrained writes (non-defaults)
    (a.out / "fixture.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    full = key_list(model_kwargs(cfg["model"], tiny=False))
    (a.out / "stage3_keys.json").write_text(json.dumps(full, indent=1, sort_keys=True) + "\n")
    print(f"wrote {a.out}: {len(weights)} weights, {len(tensors)} case tensors, "
          f"stage-3 key list {len(full['keys'])} keys / {full['parameters']:,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
