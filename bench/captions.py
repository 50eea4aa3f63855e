"""Caption client throughput and behaviour under a 429 storm, against the local
OpenAI-compatible test server (tests/openai_server.py) running in its own process.

Figures (each with its baseline from the same run):
- req_per_s_default: unique middle frames captioned per second at the default
  concurrency (8), tiny 96x54 views (client + HTTP + server overhead); baseline concurrency 1.
- req_per_s_latency: same with a server that takes LATENCY s per answer (a real VLM is
  slower still): shows that concurrency, not the client, sets the pace.
- req_per_s_nuscenes_size: six 1600x900 JPEG views per clip (decode, mosaic, encode on
  the client; decode + hash on the server).
- storm: the server answers 429 (Retry-After: 1) to everything for STORM s; default
  retry policy (5 retries, backoff base 1 s). Total time, 429s, retries, successes,
  quarantined; baseline the same items without the storm.
Usage: python bench/captions.py [--n 200] [--storm 5]
"""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from _common import Timer, save  # noqa: E402  (puts the repo root on sys.path)

import numpy as np
from PIL import Image

from captions.config import CaptionConfig
from captions.engine import CaptionItem, run_captions
from captions.images import View
from pipeline.contract import schema

REPO = Path(__file__).resolve().parents[1]


def jpeg(i: int, v: int, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(i * 10 + v)
    small = rng.integers(0, 255, (9, 16, 3), dtype=np.uint8)  # smooth-ish content, like a photo
    img = Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_items(n: int, size: tuple[int, int], offset: int = 0) -> list[CaptionItem]:
    items = []
    for i in range(offset, offset + n):
        views = [View(name, jpeg(i, v, size)) for v, name in enumerate(schema.VIEWS)]
        items.append(CaptionItem(key=f"clip-{i:05d}", load_views=lambda vs=views: vs))
    return items


class Server:
    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "openai_server.py"), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
        self.url = self.proc.stdout.readline().strip()

    def stats(self) -> dict:
        with urllib.request.urlopen(self.url.rsplit("/v1", 1)[0] + "/stats") as r:
            return json.loads(r.read())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def run(url: str, items: list[CaptionItem], **kw):
    cfg = CaptionConfig(mode="mllm", base_url=url, model="test-vlm", **kw)
    with tempfile.TemporaryDirectory() as d, Timer() as t:
        res = run_captions(items, cfg, str(Path(d) / "captions.parquet"), progress=False)
    return res, t.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=120, help="clips per throughput run")
    ap.add_argument("--latency", type=float, default=0.25, help="server seconds per answer for the latency run")
    ap.add_argument("--storm", type=float, default=5.0, help="seconds of 429s in the storm run")
    ap.add_argument("--storm-n", type=int, default=60, help="clips in the storm run")
    ap.add_argument("--long-storm", type=float, default=40.0,
                    help="seconds of 429s in a second storm, longer than the default retry budget (0 = skip)")
    a = ap.parse_args()
    default_c = CaptionConfig().concurrency
    figures: dict = {"default_concurrency": default_c}

    tiny = make_items(a.n, (96, 54))
    with Server() as srv:
        run(srv.url, make_items(8, (96, 54), offset=10_000), tile_width=96)  # warm-up: imports, pools
        r1, t1 = run(srv.url, tiny, concurrency=1, tile_width=96)  # tiny tiles: protocol overhead only
        r8, t8 = run(srv.url, tiny, tile_width=96)
        assert r1.succeeded == r8.succeeded == a.n, (r1.summary(), r8.summary())
    figures["req_per_s_default"] = a.n / t8
    figures["req_per_s_concurrency1"] = a.n / t1
    figures["ratio_default_vs_c1"] = t1 / t8

    lat_items = tiny[: min(a.n, 64)]
    with Server("--latency", str(a.latency)) as srv:
        rl1, tl1 = run(srv.url, lat_items, concurrency=1, tile_width=96)
        rl8, tl8 = run(srv.url, lat_items, tile_width=96)
        figures["latency_server_s"] = a.latency
        figures["req_per_s_latency_default"] = len(lat_items) / tl8
        figures["req_per_s_latency_c1"] = len(lat_items) / tl1
        figures["ratio_latency_default_vs_c1"] = tl1 / tl8
        figures["max_in_flight_latency"] = srv.stats()["max_in_flight"]

    big = make_items(16, (1600, 900), offset=20_000)  # default tile width 512
    with Server() as srv:
        rb, tb = run(srv.url, big)
        figures["req_per_s_nuscenes_size_default"] = len(big) / tb
        figures["ratio_nuscenes_size_vs_tiny"] = (len(big) / tb) / figures["req_per_s_default"]

    storm_items = make_items(a.storm_n, (96, 54), offset=30_000)
    with Server() as srv:
        base, tbase = run(srv.url, storm_items, tile_width=96)
    with Server("--storm", str(a.storm), "--retry-after", "1") as srv:
        st, tst = run(srv.url, storm_items, tile_width=96)
        stats = srv.stats()
    figures["storm"] = {"storm_s": a.storm, "clips": a.storm_n, "total_s": tst, "baseline_s": tbase,
                        "ratio_vs_baseline": tst / tbase, "http_requests": st.http_requests,
                        "rate_limited_429": st.rate_limited, "retries": st.retries, "succeeded": st.succeeded,
                        "quarantined": st.failed, "server_actions": stats["actions"]}
    if a.long_storm:
        with Server("--storm", str(a.long_storm), "--retry-after", "1") as srv, \
                tempfile.TemporaryDirectory() as d:
            cfg = CaptionConfig(mode="mllm", base_url=srv.url, model="test-vlm", tile_width=96)
            table = str(Path(d) / "captions.parquet")
            with Timer() as t:
                ls = run_captions(storm_items, cfg, table, progress=False)
            tls = t.seconds
            stats = srv.stats()
            rerun = run_captions(storm_items, cfg, table, progress=False)  # the quarantined clips, after the storm
        figures["long_storm"] = {"storm_s": a.long_storm, "clips": a.storm_n, "total_s": tls,
                                 "http_requests": ls.http_requests, "rate_limited_429": ls.rate_limited,
                                 "retries": ls.retries, "succeeded": ls.succeeded, "quarantined": ls.failed,
                                 "server_actions": stats["actions"], "rerun_requested": rerun.requested,
                                 "rerun_succeeded": rerun.succeeded}
    summary = (f"{figures['req_per_s_default']:.1f} req/s at concurrency {default_c} "
               f"({figures['ratio_default_vs_c1']:.2f}x concurrency 1); with {a.latency}s server latency "
               f"{figures['req_per_s_latency_default']:.1f} req/s ({figures['ratio_latency_default_vs_c1']:.2f}x); "
               f"1600x900 views {figures['req_per_s_nuscenes_size_default']:.1f} req/s; "
               f"429 storm {a.storm}s: {a.storm_n} clips in {tst:.1f}s vs {tbase:.1f}s, "
               f"{st.rate_limited} x 429, {st.retries} retries, {st.succeeded} ok, {st.failed} quarantined")
    if a.long_storm:
        ls = figures["long_storm"]
        summary += (f"; {a.long_storm:.0f}s storm: {ls['total_s']:.1f}s, {ls['rate_limited_429']} x 429, "
                    f"{ls['succeeded']} ok, {ls['quarantined']} quarantined")
    save("captions", figures, summary)


if __name__ == "__main__":
    main()
