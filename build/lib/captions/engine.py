"""Caption a list of items (clip key + its middle-frame views) into the caption table.

Shared by the pipeline stage (clip index), regeneration (shards) and new datasets
(folders). Work happens in three passes:
1. hash: read every item's views and hash them (thread pool, I/O bound);
2. plan: group items by cache key; keys with a row in the table are done, identical
   middle frames collapse into one request;
3. request: a thread pool of ``cfg.concurrency`` workers sends the missing requests
   (one shared client: one connection pool, one rpm limiter); this thread collects the
   answers, writes table rows and checkpoints every ``cfg.flush_every`` answers.
Why threads, not Ray tasks: requests are network-bound, a thread costs nothing while it
waits, and one process gives one global rpm limiter and one table writer. On a Ray
cluster the stage runs inside the driver (or one task) and the limit is ``concurrency``.
"""
from __future__ import annotations

import datetime as dt
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable

from tqdm import tqdm

from captions.config import CaptionConfig, load_prompt, prompt_sha
from captions.images import View, image_hash
from captions.table import CaptionTable, cache_key
from pipeline.contract.manifest import QuarantineRecord


@dataclass
class CaptionItem:
    key: str
    load_views: Callable[[], list[View]]  # middle-frame views, read lazily (twice: hash, then send)
    scene_name: str = ""
    scene_token: str = ""


@dataclass
class CaptionResult:
    captions: dict[str, tuple[str, dict]] = field(default_factory=dict)  # key -> (text, meta.json caption)
    quarantine: list[QuarantineRecord] = field(default_factory=list)     # stage "captions"; key absent above
    items: int = 0
    unique_images: int = 0
    cached: int = 0          # unique images answered from the table
    requested: int = 0       # unique images sent to the server in this run
    succeeded: int = 0
    failed: int = 0          # items (keys) quarantined
    http_requests: int = 0   # attempts, retries included
    retries: int = 0
    rate_limited: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    est_cost_usd: float | None = None
    seconds: float = 0.0
    table: str | None = None

    def summary(self) -> str:
        cost = f", est. cost ${self.est_cost_usd:.4f}" if self.est_cost_usd is not None else ""
        return (f"captions: {self.items} clips, {self.unique_images} unique middle frames, {self.cached} cached, "
                f"{self.requested} requested ({self.succeeded} ok), {self.failed} clips quarantined; "
                f"{self.http_requests} HTTP requests ({self.retries} retries, {self.rate_limited} x 429); "
                f"tokens {self.prompt_tokens} in / {self.completion_tokens} out{cost}; {self.seconds:.1f} s")


def caption_meta(source: str, prompt_version: str | None = None, model: str | None = None) -> dict:
    """The `caption` field of meta.json (pipeline/contract/schema.py CAPTION_META_FIELDS)."""
    return {"source": source, "prompt_version": prompt_version, "model": model}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _hash_items(items: list[CaptionItem], workers: int, progress: bool) -> tuple[dict[str, str], list]:
    hashes: dict[str, str] = {}
    bad: list[QuarantineRecord] = []

    def one(item: CaptionItem) -> tuple[str, str | None, str]:
        try:
            views = item.load_views()
            if not views:
                return item.key, None, "no views"
            return item.key, image_hash(views), ""
        except Exception as e:  # missing file, unreadable video: quarantine the item, keep going
            return item.key, None, f"{type(e).__name__}: {e}"

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for key, h, err in tqdm(pool.map(one, items), total=len(items), desc="hash middle frames",
                                disable=not progress, leave=False):
            if h is None:
                bad.append(QuarantineRecord("captions", key, "unreadable_image", err[:500]))
            else:
                hashes[key] = h
    return hashes, bad


def caption_items_mllm(items: list[CaptionItem], cfg: CaptionConfig, table: CaptionTable,
                       progress: bool = True) -> CaptionResult:
    from captions.client import CaptionClient, CaptionFailure, CaptionFatal  # openai import only when needed

    t0 = time.monotonic()
    cfg.require_endpoint()
    prompt = load_prompt(cfg.prompt_version)
    psha, params = prompt_sha(prompt), cfg.params_json()
    res = CaptionResult(items=len(items), table=table.uri)
    hashes, res.quarantine = _hash_items(items, max(1, min(cfg.concurrency, 8)), progress)

    groups: dict[str, list[CaptionItem]] = {}   # cache key -> items sharing that middle frame
    for item in items:
        if item.key in hashes:
            groups.setdefault(cache_key(hashes[item.key], cfg.prompt_version, psha, cfg.model, params), []).append(item)
    res.unique_images = len(groups)
    meta = caption_meta("mllm", cfg.prompt_version, cfg.model)

    def record(ck: str, text: str, ptok: int, ctok: int, created: str | None) -> None:
        for item in groups[ck]:
            table.add({"key": item.key, "source": "mllm", "model": cfg.model, "prompt_version": cfg.prompt_version,
                       "text": text, "prompt_tokens": ptok, "completion_tokens": ctok, "created_at": created,
                       "image_hash": hashes[item.key], "cache_key": ck, "params": params})
            res.captions[item.key] = (text, dict(meta))

    todo = []
    for ck in sorted(groups):
        row = table.cached(ck)
        if row is not None:
            res.cached += 1
            record(ck, row["text"], row["prompt_tokens"], row["completion_tokens"], row["created_at"])
        else:
            todo.append(ck)
    res.requested = len(todo)

    client = CaptionClient(cfg, prompt) if todo else None
    since_flush = 0

    def collect(fut, ck: str) -> None:
        nonlocal since_flush
        try:
            ans = fut.result()
        except CaptionFatal:
            raise
        except CaptionFailure as e:
            reason, detail = e.reason, e.detail
        except Exception as e:  # undecodable or vanished image: this item only
            reason, detail = "bad_image", f"{type(e).__name__}: {e}"
        else:
            res.succeeded += 1
            res.prompt_tokens += ans.prompt_tokens
            res.completion_tokens += ans.completion_tokens
            record(ck, ans.text, ans.prompt_tokens, ans.completion_tokens, _now())
            since_flush += 1
            if since_flush >= cfg.flush_every:
                table.checkpoint()
                since_flush = 0
            return
        res.quarantine.extend(QuarantineRecord("captions", it.key, reason, detail[:500]) for it in groups[ck])

    pool = ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="caption")
    bar = tqdm(total=len(todo), desc=f"caption ({cfg.model})", disable=not progress or not todo)
    finished = False
    try:
        # submit lazily (at most 2x concurrency queued) so a fatal error or an abort wastes little
        pending, queue = {}, list(reversed(todo))
        while queue or pending:
            while queue and len(pending) < 2 * cfg.concurrency:
                ck = queue.pop()
                pending[pool.submit(lambda f=groups[ck][0].load_views: client.caption(f()))] = ck
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                bar.update(1)
                collect(fut, pending.pop(fut))
        finished = True
    finally:
        # on an abort (Ctrl-C, fatal error) do not wait for requests in flight; keep what was answered
        pool.shutdown(wait=finished, cancel_futures=True)
        bar.close()
        table.checkpoint()
        if client is not None:
            res.http_requests, res.retries, res.rate_limited = client.requests, client.retries, client.rate_limited
    res.failed = len({q.item for q in res.quarantine})
    if cfg.price_input_per_mtok is not None or cfg.price_output_per_mtok is not None:
        res.est_cost_usd = (res.prompt_tokens * (cfg.price_input_per_mtok or 0.0)
                            + res.completion_tokens * (cfg.price_output_per_mtok or 0.0)) / 1e6
    res.seconds = time.monotonic() - t0
    return res


def caption_items_fixed(items: list[CaptionItem], mode: str, table: CaptionTable,
                        descriptions: dict[str, str] | None = None) -> CaptionResult:
    """Modes without a server: 'dataset' (scene description, looked up by scene name then
    token) and 'none' (empty caption)."""
    t0 = time.monotonic()
    res = CaptionResult(items=len(items), table=table.uri)
    for item in items:
        if mode == "none":
            text = ""
        else:
            d = descriptions or {}
            text = d.get(item.scene_name, d.get(item.scene_token))
            if text is None:
                res.quarantine.append(QuarantineRecord("captions", item.key, "no_scene_description",
                                                       f"scene {item.scene_name!r} has no description"))
                continue
        res.captions[item.key] = (text, caption_meta(mode))
        table.add({"key": item.key, "source": mode, "text": text, "prompt_tokens": 0, "completion_tokens": 0})
        res.succeeded += 1
    res.failed = len(res.quarantine)
    res.seconds = time.monotonic() - t0
    return res


def run_captions(items: list[CaptionItem], cfg: CaptionConfig, table_uri: str,
                 descriptions: dict[str, str] | None = None, progress: bool = True) -> CaptionResult:
    """Caption items per cfg.mode, update the table at table_uri (compacted at the end)."""
    table = CaptionTable(table_uri)
    if cfg.mode == "mllm":
        res = caption_items_mllm(items, cfg, table, progress)
    else:
        res = caption_items_fixed(items, cfg.mode, table, descriptions)
    table.compact()
    res.captions = dict(sorted(res.captions.items()))  # completion order must not leak into outputs
    res.quarantine.sort(key=lambda q: (q.item, q.reason))
    return res  # the command that asked prints res.summary() once
