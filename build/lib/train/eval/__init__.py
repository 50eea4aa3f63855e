"""Evaluation of generated clips the way the paper does it (docs/eval.md).

- ``mdv2-eval fvd|fid``: Fréchet distances between the generated clips of an ``mdv2-generate``
  folder and the real frames of the same clips read from the nuScenes dataroot
  (train/eval/cli.py; features: train/eval/i3d.py, train/eval/inception.py; protocol:
  train/eval/protocol.py; distance: train/eval/frechet.py).
- ``mdv2-export-nuscenes``: the generated frames written back into a nuScenes dataroot, so that
  any nuScenes perception model (BEVFormer for the paper's mAP / mIoU) runs on them unchanged
  (train/eval/export.py).

Both read the generation folder through train/eval/generated.py (INTERFACES.md E).
"""
