"""The fixture network's weights (tools/make_magicdrivedit_fixture.py): their init made non-constant so every
path contributes, rounded to fp16, then conditioned so that fp32 rounding stays rounding. Runs beside the
authors' code in the scratch venv; imports nothing of theirs or of this project."""
from __future__ import annotations

import math

import torch

# The random network's conditioning (condition()): without CAM_TOKEN_GAIN it is ill-conditioned (fp32 vs
# fp64 of its own output 4e-5..5e-4 per case, 4e-3 after the 3-step loop), so a parity test would hinge on
# one machine's summation order; the two others keep every path's contribution well above the tolerance.
CAM_TOKEN_GAIN = 1 / 64  # camera emb2token columns that read the intrinsics K (pixels: 800-1266)
PIXART_MLP_GAIN = 4  # the box and frame embedders' MLPs: their PixArt std 0.02, the xavier std at 1152 wide
FRAME_PROJ_GAIN = 2  # the frame embedder's final_proj (zero in their init): std 0.5/sqrt(in) -> 1/sqrt(in)


def is_rope_freqs(key: str) -> bool:  # rotary_embedding_torch's fixed theta-10000 frequencies: not weights
    return key.endswith("rope.freqs")


def randomize(model, gen: torch.Generator, caption_std: float) -> None:
    """Constant tensors of their init (zero projections and biases, null features, unit RMSNorm weights)
    get small random values around that constant; the rest keeps their random init. All rounded to fp16;
    then condition() scales a few."""
    with torch.no_grad():
        for key, t in model.state_dict(keep_vars=True).items():
            if not t.is_floating_point() or is_rope_freqs(key):
                continue
            if key == "y_embedder.y_embedding":  # the learned null caption lives where T5 outputs do
                t.copy_(caption_std * torch.randn(t.shape, generator=gen))
            elif key.startswith("controlnet_cond_embedder.") and t.ndim == 4:  # He init: torch's default
                t.copy_(math.sqrt(2 / t[0].numel()) * torch.randn(t.shape, generator=gen))  # fades in 6 convs
            elif bool((t == t.flatten()[0]).all()):
                std = 0.5 / math.sqrt(t[0].numel()) if t.ndim >= 2 else 0.1
                t.copy_(t.flatten()[0] + std * torch.randn(t.shape, generator=gen))
            t.copy_(t.half().float())
        condition(model)


def condition(model) -> None:
    """A well-conditioned random network whose every path contributes (gains are powers of two; what a
    gain of 1/64 pushes into fp16's subnormal range is rounded to fp16 again). Camera tokens: their CamEmbedder feeds the raw camera matrix to emb2token (its
    Fourier features include the input itself), so the intrinsics' pixel values (f ~ 1266, c ~ 800) make
    tokens of ~100; as keys and values of every cross-attention they saturate its softmax, the residual
    stream grows to ~100 and a rounding error grows ~10x per block. A trained emb2token has learnt small
    weights there; CAM_TOKEN_GAIN scales the columns that read K (the first 3 of the 7 camera columns).
    The box and frame embedders' MLPs (their PixArt init: std 0.02, xavier for 1152 wide) and the frame
    embedder's final_proj are scaled to unit gain at this width, else their weights and biases move the
    output by 3e-5..1e-4 only, less than the parity tolerance (see sensitivity)."""
    cam = model.camera_embedder
    d = cam.embedder.out_dim  # features per camera column: emb is (c d), c over [K | R | t]
    cam.emb2token.weight[:, : 3 * d] *= CAM_TOKEN_GAIN
    for mlp in (model.bbox_embedder.mlp, model.frame_embedder.mlp):
        mlp.fc1.weight *= PIXART_MLP_GAIN
        mlp.fc2.weight *= PIXART_MLP_GAIN
    model.frame_embedder.final_proj.weight *= FRAME_PROJ_GAIN
    cam.emb2token.weight.copy_(cam.emb2token.weight.half().float())
