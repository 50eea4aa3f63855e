"""A copy of a dataroot made of links, with real folders only where files are replaced.

Symbolic links (default), because: the dataset usually sits on another filesystem or a read-only
mount, where hard links are impossible; every folder with no replaced file (LIDAR_TOP, RADAR_*,
maps/, the table folder, the cameras' folders the clips do not touch) is one link instead of one
per file (nuScenes trainval has about 1.4 million files); and a hard link shares the inode, so a tool
that rewrote a "linked" file in place would silently change the original dataset, while a
replaced symlink only replaces the link. Targets are absolute (the root may be moved).
``mode="hardlink"`` links every file (folders are recreated): for a consumer that does not follow
symlinks (a container given only ROOT); it needs ROOT on the dataroot's filesystem.
"""
from __future__ import annotations

import errno
import os

from pipeline.contract import cli

MODES = ("symlink", "hardlink")


def parent_dirs(paths) -> set[str]:
    """Every folder (relative, '' excluded) that holds one of ``paths`` at any depth."""
    out = set()
    for p in paths:
        d = os.path.dirname(p)
        while d:
            out.add(d)
            d = os.path.dirname(d)
    return out


def _link(src: str, dst: str, mode: str) -> None:
    if os.path.lexists(dst):
        return  # resumed run: made by the previous one
    if mode == "symlink":
        os.symlink(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno == errno.EXDEV:
            raise cli.BadInput(f"--link hardlink: {dst} is on another filesystem than {src}; put --out on the "
                               "dataroot's filesystem or use --link symlink") from None
        raise


def build(source: str, out: str, replaced: set[str], mode: str = "symlink", skip: set[str] | None = None) -> int:
    """Mirror SOURCE under OUT by links, except the ``replaced`` files (dataroot-relative; left for the caller)
    and the top-level names in ``skip``. Returns the number of links made."""
    if mode not in MODES:
        raise ValueError(f"link mode {mode!r} is not one of {MODES}")
    source = os.path.realpath(source)
    dirs = parent_dirs(replaced)
    made = 0

    def walk(rel: str) -> None:
        nonlocal made
        here = os.path.join(out, rel)
        if os.path.islink(here):
            raise cli.BadInput(f"{here} is a link, but files under it are replaced now; --out holds an export of "
                               "other clips: use a new --out")
        os.makedirs(here, exist_ok=True)
        with os.scandir(os.path.join(source, rel)) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            sub = os.path.join(rel, e.name) if rel else e.name
            if not rel and skip and e.name in skip:
                continue
            if sub in replaced:
                continue
            if sub in dirs or (mode == "hardlink" and e.is_dir(follow_symlinks=True)):
                walk(sub)
            else:
                _link(os.path.join(source, sub), os.path.join(out, sub), mode)
                made += 1

    walk("")
    return made
