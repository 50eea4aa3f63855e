"""FVD / FID of a generation folder against the real frames of the same clips: per view and overall.

Real set = one clip per key (every generation of a clip was conditioned on the same real clip);
generated set = every selected (key, generation). Per view: the Fréchet distance between the
view's real and generated features; overall: between all views' features pooled (the W-CODA
toolkit scores the 6 views' clips as one set).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from pipeline.contract import cli, schema
from train.eval import cache as cache_mod
from train.eval import weights as weights_mod
from train.eval.features import Extractor, Unit, extract
from train.eval.frechet import frechet_from_features
from train.eval.generated import Generation, check_complete, read_frames, read_manifest, real_clips, select
from train.eval.protocol import Protocol, downsampled_size, frame_indices
from train.eval.realframes import check_real_frames, read_real


@dataclass
class EvalConfig:
    metric: str                       # "fvd" | "fid"
    generated: str
    dataroot: str
    weights: str
    protocol: Protocol
    clips: list[str] | None = None    # keys to score (None: every clip of the manifest)
    generations: list[int] | None = None
    views: list[str] | None = None
    cache_dir: str | None = None      # None: no cache
    device: str = "cpu"
    batch: int = 8
    workers: int = 4
    draft: bool = True                # the pipeline's JPEG draft decoding of real frames (as the build)
    progress: bool = True


def _views(rows: list[Generation], wanted: list[str] | None) -> list[str]:
    have = {v for g in rows for v in g.views}
    order = [v for v in schema.VIEWS if v in have] + sorted(have - set(schema.VIEWS))
    if wanted is None:
        return order
    unknown = [v for v in wanted if v not in have]
    if unknown:
        raise cli.UnknownName(f"--views: {unknown[0]} is not a view of these clips (they have {order})")
    return [v for v in order if v in wanted]


def _indices(protocol: Protocol):
    def of(g: Generation, view: str | None = None) -> list[int]:
        try:
            idx = frame_indices(g.num_frames, protocol)
        except ValueError as e:
            raise cli.BadInput(f"clip {g.key}: {e}; pass --frames {g.num_frames} (or 0 for all) to score "
                               "shorter clips (not comparable with the paper's 16-frame FVD)") from None
        if protocol.keyframes_only and view is not None:
            idx = [t for t in idx if g.is_keyframe(t, view)]
        return idx
    return of


def _check_i3d_input(clips: list[Generation], protocol: Protocol, indices_of) -> None:
    from train.eval.i3d import check_input
    for g in {(g.num_frames, g.height, g.width): g for g in clips}.values():
        h, w = downsampled_size(g.height, g.width, protocol.downsample)
        if protocol.crop is not None:
            h = w = protocol.crop
        try:
            check_input(len(indices_of(g)), h, w)
        except ValueError as e:
            raise cli.BadInput(f"clip {g.key}: {e}; use the default --frames / --downsample / --crop") from None


def _fd(real: list[np.ndarray], gen: list[np.ndarray], what: str) -> float:
    a, b = np.concatenate(real), np.concatenate(gen)
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise cli.BadInput(f"{what}: {a.shape[0]} real and {b.shape[0]} generated feature vectors; a Fréchet "
                           "distance needs at least 2 on each side (score more clips)")
    return frechet_from_features(a, b)


def evaluate(cfg: EvalConfig) -> dict:
    rows = select(read_manifest(cfg.generated), cfg.clips, cfg.generations, where=f"{cfg.generated}/manifest.parquet")
    views = _views(rows, cfg.views)
    indices_of = _indices(cfg.protocol)
    reals = real_clips(rows)
    if cfg.metric == "fvd":
        _check_i3d_input(reals, cfg.protocol, indices_of)
    check_complete(cfg.generated, rows, indices_of)
    check_real_frames(cfg.dataroot, reals, indices_of)
    net = weights_mod.load(cfg.weights, weights_mod.SPECS[cfg.metric], cfg.device)
    fx = Extractor(cfg.metric, net.model, cfg.protocol, cfg.device, cfg.batch)
    context = {"metric": cfg.metric, "protocol": cfg.protocol.to_dict(), "weights": net.sha256, "draft": cfg.draft}

    # real features: from the cache where the same clip view was scored before
    store = cache_mod.FeatureCache(cfg.cache_dir, cfg.metric)
    real: dict[tuple, np.ndarray] = {}
    todo: list[tuple[Unit, str]] = []
    for g in reals:
        for view in views:
            if view not in g.views or not (idx := indices_of(g, view)):
                continue
            j = g.view_index(view)
            key = cache_mod.entry_key({**context, "size": [g.width, g.height], "view": view}, cfg.dataroot,
                                      [g.source_frames[t][j] for t in idx])
            unit = Unit((g.key, view), tuple(idx))
            hit = store.get(key)
            if hit is not None:
                real[unit.ref] = hit
            else:
                todo.append((unit, key))
    by_key = {g.key: g for g in reals}
    fresh = extract([u for u, _ in todo], lambda u: read_real(cfg.dataroot, by_key[u.ref[0]], u.ref[1],
                                                              list(u.indices), cfg.draft),
                    fx, cfg.workers, desc=f"{cfg.metric} real", progress=cfg.progress)
    for unit, key in todo:
        store.put(key, fresh[unit.ref])
        real[unit.ref] = fresh[unit.ref]

    units = [Unit((g.key, g.generation, view), tuple(indices_of(g, view))) for g in rows for view in views
             if view in g.views and indices_of(g, view)]
    by_row = {(g.key, g.generation): g for g in rows}
    gen = extract(units, lambda u: read_frames(cfg.generated, by_row[u.ref[:2]], u.ref[2], list(u.indices)),
                  fx, cfg.workers, desc=f"{cfg.metric} generated", progress=cfg.progress)

    per_view = {}
    for view in views:
        r = [f for (k, v), f in sorted(real.items()) if v == view]
        s = [f for (k, i, v), f in sorted(gen.items()) if v == view]
        per_view[view] = {"value": _fd(r, s, f"{cfg.metric} {view}"), "real": int(sum(len(f) for f in r)),
                          "generated": int(sum(len(f) for f in s))}
    overall = _fd([f for _, f in sorted(real.items())], [f for _, f in sorted(gen.items())], f"{cfg.metric} overall")
    return {
        "metric": cfg.metric, "value": overall, "views": per_view,
        "clips": len(reals), "generations": sorted({g.generation for g in rows}), "rows": len(rows),
        "real_features": int(sum(len(f) for f in real.values())),
        "generated_features": int(sum(len(f) for f in gen.values())),
        "protocol": cfg.protocol.to_dict(), "weights": {**net.describe(), "published": net.divisor == 1},
        "generated": os.path.abspath(cfg.generated), "dataroot": os.path.abspath(cfg.dataroot),
        "cache": {"dir": store.dir, "hits": store.hits, "computed": len(todo)},
    }
