"""Configuration of pipeline/build.py: the typed BuildConfig, its command line, and the run summary.

What goes into ``BuildConfig.content_config`` is what changes shard bytes: a resumed build
trusts only shards made with the same content config (its hash is in every manifest row).
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field

from pipeline.contract import cli, schema
from pipeline.shards.encode import EncodeConfig


@dataclass
class BuildConfig:
    stage: str                       # stage name (pipeline/configs/stages/NAME.yaml) or a yaml path
    dataroot: str
    version: str
    out: str
    vae: str
    captions: str | None = None      # dataset | mllm | none; None = mllm when $OPENAI_BASE_URL is set, else dataset
    caption_base_url: str | None = None
    caption_model: str | None = None
    caption_timeout: float | None = None      # seconds per caption request (CaptionConfig.timeout_s)
    caption_retries: int | None = None        # retries per caption item (CaptionConfig.max_retries)
    caption_concurrency: int | None = None    # caption requests in flight (CaptionConfig.concurrency)
    samples_per_shard: int = 8
    encode_actors: int = 1
    encode_cpus: float = 1.0         # CPUs per encode actor on a CPU-only cluster
    units_per_call: int = 4          # encode units per actor call (load balancing vs. overhead)
    max_inflight: int = 8            # encode calls in flight (bounds decoded frames held in memory)
    frame_budget_mb: float = 1000.0  # max bytes of one decoded frame window (object and task), 1e6 B units
    timeline: str | None = None      # write Ray's task timeline (chrome://tracing JSON) here at the end
    cpus: int | None = None          # embedded local Ray only
    address: str | None = None
    limit_scenes: int | None = None
    scenes: tuple[str, ...] = ()
    max_shards: int | None = None    # stop after this many new shards (drills/tests of resume)
    draft: bool = True               # JPEG DCT-scaled decoding (see pipeline/shards/frames.py)
    progress: bool = True
    verify_resume: bool = False      # re-hash complete shards before skipping them (reads them all)
    manifest_every_s: float = 5.0    # manifest rewrite interval while shards complete (crash loses at most this)
    encode: EncodeConfig | None = None

    def content_config(self, vae: dict, vae_digest: str, captions: str) -> dict:
        """What changes shard bytes: resume trusts only shards made with the same."""
        e = self.encode
        return {"schema": schema.SCHEMA_VERSION, "pipeline": schema.PIPELINE_VERSION, "stage": self._stage_dict(),
                "samples_per_shard": self.samples_per_shard, "captions": captions, "vae": vae,
                "vae_weights": vae_digest, "draft": self.draft,
                "encode": {k: getattr(e, k) for k in ("tiling", "tile_height", "tile_width", "tile_overlap",
                                                      "frame_batch", "store_std", "inject_nan_keys")}}

    def _stage_dict(self) -> dict:
        from pipeline.scenes.buckets import load_stage
        st = load_stage(self.stage)
        return {"name": st.name, "buckets": [asdict(b) for b in st.buckets], "max_fill_run": st.max_fill_run}


@dataclass
class BuildSummary:
    scenes: int = 0
    clips: dict = field(default_factory=dict)          # bucket -> clips in the index
    samples: dict = field(default_factory=dict)        # bucket -> samples in shards
    bytes: dict = field(default_factory=dict)          # bucket -> shard bytes
    shards_total: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    quarantined: int = 0
    seconds: dict = field(default_factory=dict)        # stage -> wall seconds (and worker seconds)
    windows: dict = field(default_factory=dict)        # frame windows: calls, peak bytes (pipeline.shards.windows)
    complete: bool = True
    yield_report: dict = field(default_factory=dict)   # per bucket possible/kept/repaired/written/lost (yieldcard)
    shards_missing: int = 0                            # planned shards not in a manifest at the end
    stop_reason: str = ""                              # why the build stopped early or is incomplete

    def judge(self, planned: list[str], records: dict, quarantine: list) -> None:
        """Complete only when every planned shard is in a manifest (records: path -> ShardRecord), whatever
        stopped the build (a failed shard, a full disk, --max-shards); the reason when it is not."""
        self.shards_missing = sum(p not in records for p in planned)
        self.complete = self.complete and self.shards_missing == 0
        if not self.complete and not self.stop_reason:
            failed = [q for q in quarantine if q.reason == "shard_failed"]
            self.stop_reason = (f"{len(failed)} shards failed, e.g. {failed[0].item}: {failed[0].detail[:200]}"
                                if failed else "stopped early")

    def status(self) -> str:
        """'complete', or 'INCOMPLETE: ...' with the counts and the reason (the summary and the dataset card)."""
        if self.complete:
            return "complete"
        what = [f"{self.shards_missing} of {self.shards_total} planned shards missing"] if self.shards_total else []
        return "INCOMPLETE: " + "; ".join(what + [self.stop_reason] if self.stop_reason else what) + \
            "; rerun the same command to complete it"

    def text(self) -> str:
        lines = [f"scenes {self.scenes}; shards {self.shards_total} ({self.shards_written} written, "
                 f"{self.shards_skipped} already complete); quarantined {self.quarantined}"
                 + ("" if self.complete else f"; {self.status()}"),
                 f"{'bucket':<22}{'clips':>7}{'samples':>9}{'MB':>9}"]
        for b in sorted(self.clips):
            lines.append(f"{b:<22}{self.clips[b]:>7}{self.samples.get(b, 0):>9}{self.bytes.get(b, 0) / 1e6:>9.2f}")
        from pipeline.shards.yieldcard import yield_lines
        lines += yield_lines(self.yield_report)
        lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items()))
        return "\n".join(lines)


class _Parser(cli.ArgumentParser):
    def parse(self, argv: list[str] | None = None) -> BuildConfig:
        return to_config(self.parse_args(argv))


def build_parser(description: str | None) -> _Parser:
    """The mdv2-build command line (pipeline/build.py passes its docstring as the description)."""
    p = _Parser(prog="mdv2-build", description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="stage name (pipeline/configs/stages/NAME.yaml, e.g. demo) or a yaml path")
    p.add_argument("--dataroot", required=True, help="nuScenes root (holds VERSION/, samples/, sweeps/, maps/)")
    p.add_argument("--version", default="v1.0-trainval", help="table folder under the dataroot (default v1.0-trainval)")
    p.add_argument("--out", required=True, help="output root (local folder or s3://...): shards, manifests, quarantine")
    p.add_argument("--vae", required=True, help="local diffusers AutoencoderKLCogVideoX folder (CogVideoX-2b/vae, or "
                                                "`python -m pipeline.shards.vae --out DIR` for a tiny random one)")
    p.add_argument("--captions", choices=["dataset", "mllm", "none"],
                   help="caption source: nuScenes scene descriptions, an OpenAI-compatible MLLM (needs OPENAI_BASE_URL "
                        "or --caption-base-url), or empty; default: mllm when OPENAI_BASE_URL is set, else dataset")
    p.add_argument("--caption-base-url", help="MLLM endpoint (default $OPENAI_BASE_URL)")
    p.add_argument("--caption-model", help="MLLM model name")
    p.add_argument("--caption-timeout", type=float, metavar="S",
                   help="seconds per caption request (default 60; the stage config's captions.timeout_s)")
    p.add_argument("--caption-retries", type=int, metavar="N",
                   help="retries per caption after the first attempt (default 5; captions.max_retries)")
    p.add_argument("--caption-concurrency", type=int, metavar="N",
                   help="caption requests in flight (default 8; captions.concurrency). The stage stops with one "
                        "line when its first requests all fail the same way (captions.fail_fast, default 8)")
    p.add_argument("--samples-per-shard", type=int, default=8, help="clips per shard (fixed: decides the shard plan)")
    p.add_argument("--encode-actors", type=int, default=1, help="VAE actors (one GPU each on a GPU cluster)")
    p.add_argument("--encode-cpus", type=float, default=1.0, help="CPUs per VAE actor on a CPU-only cluster")
    p.add_argument("--units-per-call", type=int, default=4, help="encode units per actor call")
    p.add_argument("--max-inflight", type=int, default=8, help="encode calls in flight (memory bound)")
    p.add_argument("--frame-budget-mb", type=float, default=1000.0,
                   help="most MB (1e6 B) of decoded frames in one object or task (default 1000); any value gives "
                        "the same shards")
    p.add_argument("--timeline", metavar="FILE", help="write Ray's task timeline (chrome://tracing JSON) to FILE; "
                                                     "`python -m pipeline.tools.timeline FILE` sums busy time per stage")
    p.add_argument("--cpus", type=int, help="CPUs of the embedded local Ray (default: all)")
    p.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS; none = embedded local Ray)")
    p.add_argument("--limit-scenes", type=int, help="first N scenes (sorted by name) only")
    p.add_argument("--scenes", nargs="*", default=(), help="only these scene names")
    p.add_argument("--max-shards", type=int, help="stop after writing N new shards (rerun resumes)")
    p.add_argument("--no-draft", action="store_true", help="decode JPEGs at full size before resizing (slower)")
    p.add_argument("--device", default="auto", help="encoder device: auto | cpu | cuda")
    p.add_argument("--views-per-batch", type=int, default=0, help="views encoded together (0 = all, 1 = low memory)")
    p.add_argument("--tiling", action="store_true", help="spatial VAE tiling (848x1600 buckets)")
    p.add_argument("--frame-batch", type=int, default=8,
                   help="frames per causal encoder chunk (diffusers default 8; latent reuse needs a divisor of 8)")
    p.add_argument("--mean-only", action="store_true", help="store latent_mean only (no latent_std)")
    p.add_argument("--inject-nan", nargs="*", default=(), metavar="KEY",
                   help="fault drill: feed NaN frames to the real encoder for these clip keys (they get quarantined)")
    p.add_argument("--verify-resume", action="store_true", help="re-hash shards listed in the manifest before skipping")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def to_config(a: argparse.Namespace) -> BuildConfig:
    for flag in ("samples_per_shard", "encode_actors", "encode_cpus", "units_per_call", "max_inflight", "frame_batch"):
        if getattr(a, flag) <= 0:
            raise cli.BadInput(f"--{flag.replace('_', '-')} must be > 0, got {getattr(a, flag)}")
    for flag, low in (("caption_timeout", 0), ("caption_concurrency", 0), ("caption_retries", -1)):
        if getattr(a, flag) is not None and getattr(a, flag) <= low:
            raise cli.BadInput(f"--{flag.replace('_', '-')} must be > {low}, got {getattr(a, flag)}")
    enc = EncodeConfig(vae=a.vae, device=a.device, views_per_batch=a.views_per_batch, tiling=a.tiling,
                       frame_batch=a.frame_batch, store_std=not a.mean_only, inject_nan_keys=tuple(a.inject_nan))
    return BuildConfig(stage=a.config, dataroot=a.dataroot, version=a.version, out=a.out, vae=a.vae,
                       captions=a.captions, caption_base_url=a.caption_base_url, caption_model=a.caption_model,
                       caption_timeout=a.caption_timeout, caption_retries=a.caption_retries,
                       caption_concurrency=a.caption_concurrency,
                       samples_per_shard=a.samples_per_shard, encode_actors=a.encode_actors,
                       encode_cpus=a.encode_cpus, units_per_call=a.units_per_call, max_inflight=a.max_inflight,
                       frame_budget_mb=a.frame_budget_mb, timeline=a.timeline,
                       cpus=a.cpus, address=a.address, limit_scenes=a.limit_scenes, scenes=tuple(a.scenes),
                       max_shards=a.max_shards, draft=not a.no_draft, verify_resume=a.verify_resume,
                       progress=not a.no_progress, encode=enc)
