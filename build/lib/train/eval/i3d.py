"""The Inflated 3D ConvNet (Carreira & Zisserman 2017) with the parameter names of VideoGPT's port.

VideoGPT's ``i3d_pretrained_400.pt`` (converted from DeepMind's TF-Hub i3d-kinetics-400, the
network of the original FVD) is a state dict of this layout: ``Conv3d_1a_7x7.conv3d.weight``,
``Mixed_4b.b1b.bn.running_mean``, ..., ``logits.conv3d.bias``. Written here from the architecture
(same module names, TF "SAME" padding computed per input, BatchNorm eps 1e-5 as in the port), so
that the file loads with ``load_state_dict`` and nothing else is needed. FVD uses the 400 logits,
averaged over the remaining time steps (VideoGPT's ``forward``; the W-CODA toolkit marks
``extract_features`` as wrong).

``divisor`` divides every channel count (the tests' tiny networks: same parameter names, narrower
tensors); the published network is divisor 1.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from train.eval.narrow import DIVISORS, channels  # noqa: F401  (DIVISORS: part of this module's API)

NUM_CLASSES = 400
STEM_CHANNELS = 64          # Conv3d_1a_7x7's output channels at divisor 1 (train/eval/weights.py infers the divisor)

# name, input channels, the six branch widths (b0, b1a, b1b, b2a, b2b, b3b) at divisor 1
MIXED = (
    ("Mixed_3b", 192, (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", 256, (128, 128, 192, 32, 96, 64)),
    ("Mixed_4b", 480, (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", 512, (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", 512, (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", 512, (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", 528, (256, 160, 320, 32, 128, 128)),
    ("Mixed_5b", 832, (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", 832, (384, 192, 384, 48, 128, 128)),
)
FINAL_CHANNELS = 1024       # Mixed_5c's output
MIN_FRAMES, MIN_SIZE = 9, 193  # the final 2x7x7 average pool needs ceil(T / 8) >= 2 and ceil(S / 32) >= 7


def check_input(frames: int, height: int, width: int) -> None:
    """ValueError when a (T, H, W) clip is too small for the network's final pool."""
    if frames < MIN_FRAMES or min(height, width) < MIN_SIZE:
        raise ValueError(f"the I3D needs at least {MIN_FRAMES} frames of {MIN_SIZE}x{MIN_SIZE} pixels, the protocol "
                         f"gives {frames} frames of {height}x{width}")


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF 'SAME' padding (before, after) of one axis: output = ceil(size / stride)."""
    total = max(kernel - stride, 0) if size % stride == 0 else max(kernel - size % stride, 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> torch.Tensor:
    """Zero-pad (B, C, T, H, W) so that a kernel/stride gives ceil(size / stride) outputs per axis."""
    pads = [same_padding(s, k, st) for s, k, st in zip(x.shape[2:], kernel, stride)]
    (tf, tb), (hf, hb), (wf, wb) = pads
    return F.pad(x, (wf, wb, hf, hb, tf, tb))


class Unit3D(nn.Module):
    """Conv3d (no padding; SAME padding per input) + BatchNorm + ReLU; parameter names conv3d.*, bn.*."""

    def __init__(self, cin: int, cout: int, kernel=(1, 1, 1), stride=(1, 1, 1), batch_norm: bool = True,
                 bias: bool = False, relu: bool = True):
        super().__init__()
        self.kernel, self.stride, self.relu = tuple(kernel), tuple(stride), relu
        self.conv3d = nn.Conv3d(cin, cout, self.kernel, self.stride, padding=0, bias=bias)
        self.bn = nn.BatchNorm3d(cout, eps=1e-5, momentum=0.001) if batch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(pad_same(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.relu else x


class MaxPoolSame(nn.Module):
    """Max pooling with TF 'SAME' zero padding (inputs are post-ReLU, so zeros never win over data)."""

    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(pad_same(x, self.kernel, self.stride), self.kernel, self.stride)


class InceptionModule(nn.Module):
    def __init__(self, cin: int, widths: tuple[int, ...]):
        super().__init__()
        w0, w1a, w1b, w2a, w2b, w3 = widths
        self.b0 = Unit3D(cin, w0)
        self.b1a = Unit3D(cin, w1a)
        self.b1b = Unit3D(w1a, w1b, kernel=(3, 3, 3))
        self.b2a = Unit3D(cin, w2a)
        self.b2b = Unit3D(w2a, w2b, kernel=(3, 3, 3))
        self.b3a = MaxPoolSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(cin, w3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


class I3D(nn.Module):
    """(B, 3, T, 224, 224) in [-1, 1] -> (B, num_classes) logits averaged over time (T >= 9)."""

    def __init__(self, divisor: int = 1, num_classes: int = NUM_CLASSES):
        super().__init__()
        c = channels(divisor)
        self.divisor = divisor
        # attribute order = execution order (forward walks the children)
        self.Conv3d_1a_7x7 = Unit3D(3, c(64), kernel=(7, 7, 7), stride=(2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPoolSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(c(64), c(64))
        self.Conv3d_2c_3x3 = Unit3D(c(64), c(192), kernel=(3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPoolSame((1, 3, 3), (1, 2, 2))
        for name, cin, widths in MIXED:
            if name == "Mixed_4b":
                self.MaxPool3d_4a_3x3 = MaxPoolSame((3, 3, 3), (2, 2, 2))
            if name == "Mixed_5b":
                self.MaxPool3d_5a_2x2 = MaxPoolSame((2, 2, 2), (2, 2, 2))
            setattr(self, name, InceptionModule(c(cin), tuple(c(w) for w in widths)))
        self.logits = Unit3D(c(FINAL_CHANNELS), num_classes, batch_norm=False, bias=True, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name, module in self.named_children():
            if name == "logits":
                break
            x = module(x)
        # (B, C, T', 7, 7): VideoGPT's AvgPool3d([2, 7, 7], stride 1), dropout (identity in eval), 1x1x1 logits
        x = self.logits(F.avg_pool3d(x, kernel_size=(2, 7, 7), stride=1))   # (B, classes, T'-1, 1, 1)
        return x.flatten(2).mean(dim=2)                                      # (B, classes)
