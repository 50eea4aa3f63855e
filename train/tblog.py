"""TensorBoard beside log.jsonl (optional: the `tb` extra, `pip install 'magicdrive-engine[tb]'`).

`tensorboard: auto` (the default) writes OUT/tb/ when the tensorboard package is installed and
says in one line that it does not when it is not; `true` makes a missing package an error before
training starts; `false` turns it off. Rank 0 only. Every scalar of a log.jsonl record goes in
under its own name (nested ones as `loss_by_bucket/<bucket>`, `loader/<field>`), so the two logs
never disagree; the clips sampled during training (train/livesample.py) go in as videos.

The videos are animated GIFs written with Pillow into TensorBoard's image summary: what
SummaryWriter.add_video does, without its moviepy dependency (moviepy 2 has no moviepy.editor,
which add_video imports, and it would pull another Pillow).
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.contract.cli import BadInput

INSTALL = "pip install 'magicdrive-engine[tb]'"


def available() -> bool:
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


def check(setting, say=lambda m: None) -> bool:
    """Whether to write TensorBoard for config value `setting` (auto | true | false); `true` without
    the package is a user error (exit 2), `auto` without it says so once (`say`: rank 0's stderr)."""
    if setting is False or setting == "false":
        return False
    if available():
        return True
    if setting is True or setting == "true":
        raise BadInput(f"tensorboard: true, but the tensorboard package is not installed: {INSTALL}, "
                       f"or set tensorboard: false")
    say(f"tensorboard is not installed: logging to log.jsonl only ({INSTALL} for OUT/tb/)")
    return False


def scalars(rec: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a log record, flattened: {'loss': .., 'loss_by_bucket/64x128_t9': .., ...}."""
    out: dict[str, float] = {}
    for k, v in rec.items():
        if k == "step":
            continue
        if isinstance(v, dict):
            out.update(scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def gif_bytes(frames: np.ndarray, fps: int) -> bytes:
    """(T, H, W, 3) uint8 -> an animated GIF (looping)."""
    images = [Image.fromarray(f) for f in np.asarray(frames)]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=max(1, 1000 // fps), loop=0)
    return buf.getvalue()


class TBLog:
    """A SummaryWriter on OUT/tb/."""

    def __init__(self, out: Path, purge_step: int | None = None):
        """purge_step: a resumed run redoes the steps from there; TensorBoard drops the old events of those."""
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(Path(out) / "tb"), purge_step=purge_step)

    def record(self, rec: dict) -> None:
        for k, v in scalars(rec).items():
            self.writer.add_scalar(k, v, rec["step"])

    def video(self, tag: str, frames: np.ndarray, step: int, fps: int) -> None:
        """(T, H, W, 3) uint8 as a TensorBoard video (an animated image)."""
        from torch.utils.tensorboard.summary import Summary
        t, h, w, _ = frames.shape
        img = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=gif_bytes(frames, fps))
        self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=img)]), step)

    def image(self, tag: str, path: Path, step: int) -> None:
        self.writer.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")

    def clip(self, clip: dict, step: int) -> None:
        """A training-time sample (train/livesample.py): the view grid as a video, the contact sheet as an image."""
        from train.video import grid
        frames = clip["frames"]                                                   # (V, T, H, W, 3) uint8
        self.video("samples/grid", grid(frames, cols=min(3, frames.shape[0])), step, clip["fps"])
        self.image("samples/contact_sheet", clip["sheet"], step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
