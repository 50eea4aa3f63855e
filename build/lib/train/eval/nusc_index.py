"""What the export needs from the nuScenes tables, read by streaming (trainval's sample_data.json is ~1 GB).

- which version folder the dataroot holds (``--version`` or the only one there);
- for the replaced images: their sample_data records (every replaced path must be one; otherwise
  the dataroot is not the dataset the clips came from);
- for the keyframe samples those images belong to: all their camera keyframe images, so that
  ``eval_tokens.json`` lists only samples whose every camera image was replaced.
The camera channel of a record comes from calibrated_sensor -> sensor (the JSON tables do not
carry ``channel``; the devkit adds it when it loads).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from pipeline.contract import cli
from pipeline.scenes.jsonstream import iter_json_array

TABLES = "sample_data.json"


def find_version(dataroot: str, version: str | None) -> str:
    if not os.path.isdir(dataroot):
        raise cli.InputNotFound(f"--dataroot {dataroot} is not a folder: pass the nuScenes root")
    have = sorted(d for d in os.listdir(dataroot) if os.path.isfile(os.path.join(dataroot, d, TABLES)))
    if version is not None:
        if version not in have:
            raise cli.InputNotFound(f"no {version}/{TABLES} under {dataroot} (versions there: {have or 'none'})")
        return version
    if len(have) != 1:
        raise cli.BadInput(f"--dataroot {dataroot} holds {len(have)} table folders {have}: pass --version"
                           if have else f"--dataroot {dataroot} holds no VERSION/{TABLES}: pass the nuScenes root")
    return have[0]


@dataclass
class CameraIndex:
    by_file: dict[str, dict]                  # replaced path -> its sample_data record (token, sample_token, ...)
    keyframes: dict[str, dict[str, str]]      # sample token -> {channel: filename} of its camera keyframe images


def _load(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read(dataroot: str, version: str, files: set[str]) -> CameraIndex:
    d = os.path.join(dataroot, version)
    sensors = {s["token"]: s for s in _load(os.path.join(d, "sensor.json"))}
    channel = {}
    for cs in _load(os.path.join(d, "calibrated_sensor.json")):
        s = sensors[cs["sensor_token"]]
        if s["modality"] == "camera":
            channel[cs["token"]] = s["channel"]
    by_file: dict[str, dict] = {}
    key_images: dict[str, dict[str, str]] = {}
    for rec in iter_json_array(os.path.join(d, TABLES)):
        cam = channel.get(rec["calibrated_sensor_token"])
        if cam is None:
            continue
        if rec["filename"] in files:
            by_file[rec["filename"]] = {**rec, "channel": cam}
        if rec["is_key_frame"]:
            key_images.setdefault(rec["sample_token"], {})[cam] = rec["filename"]
    missing = sorted(files - by_file.keys())
    if missing:
        raise cli.BadInput(f"source frame {missing[0]} (and {len(missing) - 1} more) is not a camera image of "
                           f"{d}/{TABLES}: --dataroot/--version is not the dataset the clips were built from")
    touched = {r["sample_token"] for r in by_file.values() if r["is_key_frame"]}
    return CameraIndex(by_file, {s: key_images[s] for s in touched})
