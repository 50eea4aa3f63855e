"""mdv2-caption / python -m captions: caption clips with a multimodal LLM.

Subcommands:
  clips    caption the clip index of a build output folder (--out), like the build's stage
  shards   re-caption existing shards in place (new prompt or model); no VAE, no GPU
  folder   caption a folder of new clips (clip/VIEW.mp4 or clip/VIEW/*.jpg) into a caption table
  prompts  list the prompt versions (or print one with --show)

The server is any OpenAI-compatible chat-completions endpoint: set OPENAI_BASE_URL (or
--base-url) and put the key in OPENAI_API_KEY (or the env var named by --api-key-env).
The key is never printed, logged or written. See docs/captions.md.
"""
from __future__ import annotations

import argparse
import logging
import sys

from captions.config import LAYOUTS, MODES, CaptionConfig, load_prompt, prompt_versions
from pipeline.contract import cli

EXAMPLES = """examples:
  # vLLM serving Qwen2.5-VL on this machine
  export OPENAI_BASE_URL=http://localhost:8000/v1 OPENAI_API_KEY=EMPTY
  mdv2-caption clips --out data/out --dataroot data/nuscenes --model Qwen/Qwen2.5-VL-7B-Instruct
  # OpenAI, 300 requests/min, with a cost estimate
  export OPENAI_BASE_URL=https://api.openai.com/v1 OPENAI_API_KEY=sk-...
  mdv2-caption shards --out data/out --dataroot data/nuscenes --model gpt-4o-mini --prompt-version v1 \\
      --rpm 300 --price-input 0.15 --price-output 0.60
  # a new dataset
  mdv2-caption folder my_videos/ --out my_videos_captions.parquet --model gpt-4o-mini
"""


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("caption source and server")
    g.add_argument("--config", help="YAML/JSON file of CaptionConfig fields (may name the key's env var, "
                                    "never the key)")
    g.add_argument("--mode", choices=MODES, help="mllm: ask the server; dataset: nuScenes scene.description; "
                                                 "none: empty caption (default: mllm if OPENAI_BASE_URL is set, "
                                                 "else dataset)")
    g.add_argument("--base-url", help="OpenAI-compatible base URL (default $OPENAI_BASE_URL)")
    g.add_argument("--model", help="model name as the server knows it (default gpt-4o-mini or $CAPTION_MODEL)")
    g.add_argument("--api-key-env", help="NAME of the env var holding the API key (default OPENAI_API_KEY)")
    g.add_argument("--prompt-version", help=f"prompt file captions/prompts/<version>.txt "
                                            f"(have: {', '.join(prompt_versions())}; default v1)")
    g = p.add_argument_group("images and generation (part of the cache key)")
    g.add_argument("--layout", choices=LAYOUTS, help="one labelled 2x3 mosaic (default, fewer image tokens) "
                                                     "or one image per view")
    g.add_argument("--tile-width", type=int, help="width each view is resized to (default 512)")
    g.add_argument("--detail", choices=("auto", "low", "high"), help="OpenAI image detail (default auto)")
    g.add_argument("--max-tokens", type=int, help="answer length cap (default 200)")
    g.add_argument("--temperature", type=float, help="sampling temperature (default 0)")
    g = p.add_argument_group("throughput, robustness and cost")
    g.add_argument("--concurrency", type=int, help="requests in flight (default 8)")
    g.add_argument("--rpm", type=float, help="requests-per-minute ceiling (default: none)")
    g.add_argument("--timeout", type=float, dest="timeout_s", help="seconds per request (default 60)")
    g.add_argument("--max-retries", type=int, help="retries per item on 429/5xx/timeout/bad answer (default 5)")
    g.add_argument("--fail-fast", type=int, metavar="N",
                   help="stop (exit 3) when the first N requests all fail the same way, e.g. nothing listening or "
                        "a server that never answers (default 8; 0 = never)")
    g.add_argument("--backoff-base", type=float, dest="backoff_base_s",
                   help="first retry wait in seconds, doubled each retry, with jitter (default 1)")
    g.add_argument("--price-input", type=float, dest="price_input_per_mtok",
                   help="USD per 1M prompt tokens, for the cost estimate")
    g.add_argument("--price-output", type=float, dest="price_output_per_mtok",
                   help="USD per 1M completion tokens, for the cost estimate")
    g.add_argument("--flush-every", type=int, help="answers between table checkpoints (resume; default 32)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="log retries")


OVERRIDES = ("mode", "base_url", "model", "api_key_env", "prompt_version", "layout", "tile_width", "detail",
             "max_tokens", "temperature", "concurrency", "rpm", "timeout_s", "max_retries", "fail_fast", "backoff_base_s",
             "price_input_per_mtok", "price_output_per_mtok", "flush_every")


def config_from_args(args: argparse.Namespace, default_mode: str | None = None) -> CaptionConfig:
    kw = {k: getattr(args, k, None) for k in OVERRIDES}
    if kw["mode"] is None and default_mode:
        kw["mode"] = default_mode
    if args.config:
        return CaptionConfig.from_file(args.config, **kw)
    return CaptionConfig.from_env(**kw)


def build_parser() -> argparse.ArgumentParser:
    ap = cli.ArgumentParser(prog="mdv2-caption", description=__doc__, epilog=EXAMPLES,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="{clips,shards,folder,prompts}")
    p = sub.add_parser("clips", help="caption the clip index of a build output folder",
                       description="Caption the middle frame of every clip in the clip index into "
                                   "OUT/captions.parquet (the cache: a re-run asks only for what is missing). "
                                   "Failures go to OUT/quarantine.parquet.")
    p.add_argument("--out", required=True, help="build output folder (local or s3://...)")
    p.add_argument("--dataroot", required=True, help="nuScenes root the clip index paths are relative to")
    p.add_argument("--clips", help="clip index parquet (default OUT/_work/clips.parquet)")
    _common(p)
    p = sub.add_parser("shards", help="re-caption existing shards in place",
                       description="Rewrite caption.txt and meta.json['caption'] of every sample of every shard "
                                   "listed in OUT/<split>/manifest.parquet; every other member is copied byte for "
                                   "byte, each shard is replaced atomically and its manifest row updated.")
    p.add_argument("--out", required=True, help="build output folder holding <split>/manifest.parquet")
    p.add_argument("--dataroot", help="the folder meta.json 'frames' paths are relative to (needed for "
                                      "--mode mllm and dataset)")
    p.add_argument("--split", action="append", help="only this split (repeatable; default all)")
    _common(p)
    p = sub.add_parser("folder", help="caption a folder of new clips",
                       description="Caption ROOT/<clip>/<VIEW>.mp4, ROOT/<clip>/<VIEW>/*.jpg, ROOT/<clip>.mp4 or "
                                   "ROOT/<clip>/*.jpg (middle frame of each view) into a caption table; failures "
                                   "go to <table>.quarantine.parquet. Default mode: mllm.")
    p.add_argument("root", help="folder of clips")
    p.add_argument("--out", required=True, help="caption table to create or extend (.parquet)")
    _common(p)
    p = sub.add_parser("prompts", help="list prompt versions")
    p.add_argument("--show", metavar="VERSION", help="print the text sent for this version")
    return ap


@cli.entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # WARNING by default: the HTTP stack logs every request at INFO (one line per caption); -v shows our
    # retry messages (DEBUG) and the requests, not the HTTP stack's DEBUG dumps
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for name in ("openai", "httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        if args.command == "prompts":
            if args.show:
                print(load_prompt(args.show))
            else:
                print("\n".join(prompt_versions()))
            return 0
        progress = not args.quiet
        if args.command == "clips":
            return _clips(args, config_from_args(args), progress)
        if args.command == "shards":
            from captions.regenerate import recaption_shards
            from pipeline.contract.outlock import OutputLock
            with OutputLock(args.out, "mdv2-caption shards"):  # it rewrites shards: not beside a build
                res = recaption_shards(args.out, config_from_args(args), args.dataroot, args.split, progress)
            print(res.summary())
            return _exit(res.captions)
        if args.command == "folder":
            from captions.videos import caption_folder
            res = caption_folder(args.root, args.out, config_from_args(args, default_mode="mllm"), progress)
            print(res.summary())
            return _exit(res)
    except Exception as e:
        from captions.config import CaptionFatal
        if isinstance(e, CaptionFatal) and not cli.debug_requested(argv):  # the server refused: exit code 3
            print(f"error: {cli.one_line(e)}", file=sys.stderr)
            return EXIT_NOTHING
        raise
    return 1


EXIT_NOTHING = 3  # nothing captioned, or the server failed the run (docs/cluster.md)


def _exit(res) -> int:
    """0 when something was captioned (or nothing needed it); 3 with one line when every item failed."""
    if res.items and not res.captions:
        first = res.quarantine[0] if res.quarantine else None
        print(f"error: nothing captioned: all {res.items} items failed"
              + (f" (first: {first.reason}: {first.detail[:200]})" if first else "")
              + "; see the quarantine table, fix the cause and rerun", file=sys.stderr)
        return EXIT_NOTHING
    return 0


def _clips(args: argparse.Namespace, cfg: CaptionConfig, progress: bool) -> int:
    from captions.stage import caption_clips
    from captions.table import write_quarantine_file
    from pipeline.contract import schema, storage
    from pipeline.contract.manifest import read_table
    uri = args.clips or storage.join(args.out, schema.CLIP_INDEX_FILE)
    if not storage.exists(uri):
        raise cli.InputNotFound(f"no clip index at {uri}: run the build's clip stage first or pass --clips")
    clips = read_table(uri)
    res = caption_clips(clips, args.dataroot, cfg, args.out, progress=progress)
    write_quarantine_file(storage.join(args.out, schema.QUARANTINE_FILE), res.quarantine,
                          set(clips.column("key").to_pylist()))
    print(res.summary())
    return _exit(res)


if __name__ == "__main__":
    sys.exit(main())
