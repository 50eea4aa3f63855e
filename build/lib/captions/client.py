"""One caption request, done robustly: the real `openai` client, a requests-per-minute limiter,
and our own retry loop (the client's built-in retries are off, so every attempt is counted,
rate-limited and bounded by our policy).

Retried: 429 (waiting at least what Retry-After / retry-after-ms asks), 5xx, timeouts,
connection errors, malformed responses, and answers that fail validation. Attempt k
(0-based) waits ``min(backoff_max, backoff_base * 2**k) * U(0.5, 1.5)`` (jitter spreads a
storm of clients) or the server's Retry-After if that is longer. Not retried: 400 (the
item is bad: quarantine it). Fatal for the whole run: 401/403/404 (wrong key, no access,
unknown model): every item would fail the same way; and, before any request succeeded, the
first ``fail_fast`` requests all failing with one reason (nothing listening, a server that
accepts and never answers, a model that cannot see images): :class:`CaptionsFailing`. 429s
do not count towards that (they are the server pacing us). Once the run is stopped, no thread
starts another attempt and the ones waiting to retry wake up.
"""
from __future__ import annotations

import email.utils
import logging
import random
import threading
import time
from dataclasses import dataclass

import openai

from captions.config import CaptionConfig, CaptionFatal  # noqa: F401  (CaptionFatal: re-exported)
from captions.images import View, data_url, request_images
from captions.validate import InvalidAnswer, check_answer

log = logging.getLogger(__name__)


class CaptionsFailing(CaptionFatal):
    """The first requests of the run all failed the same way: the server is down or wrong, not the items."""


class CaptionFailure(Exception):
    """An item that could not be captioned; goes to quarantine with `reason`."""

    def __init__(self, reason: str, detail: str = "", attempts: int = 0):
        self.reason, self.detail, self.attempts = reason, detail, attempts
        super().__init__(f"{reason}: {detail}")


@dataclass
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    attempts: int
    retries_429: int


class RateLimiter:
    """At most `rpm` request starts per minute, spaced evenly (no bursts that trip the server's limiter)."""

    def __init__(self, rpm: float | None):
        self.interval = 60.0 / rpm if rpm else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            time.sleep(start - now)


def retry_after_s(exc: openai.APIStatusError) -> float | None:
    """Seconds the server asked us to wait (retry-after-ms, or Retry-After as seconds or an HTTP date)."""
    headers = exc.response.headers if exc.response is not None else {}
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000.0
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if not ra:
        return None
    try:
        return float(ra)
    except ValueError:
        dt = email.utils.parsedate_to_datetime(ra) if ra else None
        return max(0.0, dt.timestamp() - time.time()) if dt else None


def build_messages(prompt: str, images: list[tuple[str, bytes]], layout: str, detail: str) -> list[dict]:
    labels = [lab for lab, _ in images]
    if layout == "mosaic" and len(images) == 1 and " | " in labels[0]:
        where = (f"The image is a mosaic of the camera views; each tile is labelled with its camera name "
                 f"({labels[0]}), front cameras in the top row.")
    else:
        where = f"The images are the camera views, in this order: {', '.join(labels)}."
    content: list[dict] = [{"type": "text", "text": f"{prompt}\n\n{where}"}]
    for _, jpeg in images:
        content.append({"type": "image_url", "image_url": {"url": data_url(jpeg), "detail": detail}})
    return [{"role": "user", "content": content}]


class CaptionClient:
    """Thread-safe: one instance serves all worker threads (one HTTP connection pool, one limiter)."""

    def __init__(self, cfg: CaptionConfig, prompt: str):
        self.cfg = cfg
        self.prompt = prompt
        self.limiter = RateLimiter(cfg.rpm)
        # max_retries=0: our loop below owns retries; the key is read from the env var here only.
        self.client = openai.OpenAI(base_url=cfg.require_endpoint(), api_key=cfg.api_key(),
                                    max_retries=0, timeout=cfg.timeout_s)
        self.requests = 0       # HTTP attempts made
        self.retries = 0        # attempts beyond each item's first
        self.rate_limited = 0   # 429 answers received
        self._lock = threading.Lock()
        self.answered = 0                     # successful answers
        self._first_failures: list[CaptionFailure] = []  # failed attempts before any success (fail_fast)
        self.stopped = threading.Event()     # set when the run is stopped: no new attempts, retries wake up
        self.stop_reason: CaptionFatal | None = None

    def stop(self, reason: CaptionFatal) -> None:
        with self._lock:
            self.stop_reason = self.stop_reason or reason
        self.stopped.set()

    def _note_failure(self, failure: CaptionFailure) -> None:
        """Fail fast: the first ``fail_fast`` attempts of the run, all failed with one reason, stop it."""
        n = self.cfg.fail_fast
        if not n or failure.reason == "rate_limited":
            return
        with self._lock:
            if self.answered or len(self._first_failures) >= n:
                return
            self._first_failures.append(failure)
            first = self._first_failures
            if len(first) < n or len({f.reason for f in first}) != 1:
                return
        self.stop(CaptionsFailing(
            f"the first {n} caption requests all failed the same way ({failure.reason}: {failure.detail}) at "
            f"{self.cfg.endpoint()} for model {self.cfg.model!r}; nothing more is sent: check that the server is up "
            f"and answers (or raise --caption-timeout / fail_fast), then rerun: answers so far are kept"))

    def _count(self, attempt: int) -> None:
        with self._lock:
            self.requests += 1
            self.retries += attempt > 0

    def _backoff(self, attempt: int) -> float:
        base = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * (2 ** attempt))
        return base * (0.5 + random.random())

    def caption(self, views: list[View]) -> Answer:
        cfg = self.cfg
        images = request_images(views, cfg.layout, cfg.tile_width, cfg.jpeg_quality)
        messages = build_messages(self.prompt, images, cfg.layout, cfg.detail)
        body: dict = {"model": cfg.model, "messages": messages, "max_tokens": cfg.max_tokens,
                      "temperature": cfg.temperature}
        if cfg.seed is not None:
            body["seed"] = cfg.seed
        extra = dict(cfg.extra) or None
        retries_429 = 0
        last: CaptionFailure | None = None
        for attempt in range(cfg.max_retries + 1):
            if self.stopped.is_set():
                raise self.stop_reason or CaptionFatal("the caption run was stopped")
            self.limiter.acquire()
            self._count(attempt)
            wait = None
            try:
                resp = self.client.chat.completions.create(**body, extra_body=extra)
                choice = resp.choices[0] if resp.choices else None
                if choice is None or choice.message is None:
                    raise InvalidAnswer("malformed", "response has no choices/message")
                text = check_answer(choice.message.content, choice.finish_reason, min_chars=cfg.min_chars,
                                    max_chars=cfg.max_chars, reject_object_lists=cfg.reject_object_lists)
                usage = resp.usage
                with self._lock:
                    self.answered += 1
                return Answer(text, int(getattr(usage, "prompt_tokens", 0) or 0),
                              int(getattr(usage, "completion_tokens", 0) or 0), attempt + 1, retries_429)
            except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
                self.stop(CaptionFatal(f"the caption server refused the request with HTTP {e.status_code} "
                                       f"({type(e).__name__}) at {cfg.endpoint()} for model {cfg.model!r}: check the "
                                       f"key in ${cfg.api_key_env}, the model name and the base URL"))
                raise self.stop_reason from None
            except openai.RateLimitError as e:
                retries_429 += 1
                with self._lock:
                    self.rate_limited += 1
                last = CaptionFailure("rate_limited", "HTTP 429")
                wait = retry_after_s(e)
                if wait is not None and wait > cfg.max_retry_after_s:
                    raise CaptionFailure("rate_limited", f"server asked to wait {wait:.0f} s > max_retry_after_s",
                                         attempt + 1) from None
            except openai.InternalServerError as e:
                last = CaptionFailure("server_error", f"HTTP {e.status_code}")
                wait = retry_after_s(e)
            except openai.BadRequestError as e:
                bad = CaptionFailure("bad_request", f"HTTP 400: {str(e)[:200]}", attempt + 1)
                self._note_failure(bad)
                if self.stopped.is_set():
                    raise self.stop_reason from None
                raise bad from None
            except openai.APITimeoutError:
                last = CaptionFailure("timeout", f"no answer within {cfg.timeout_s} s")
            except openai.APIConnectionError as e:
                last = CaptionFailure("connection_error", type(e.__cause__ or e).__name__)
            except openai.APIStatusError as e:  # other 4xx
                last = CaptionFailure("http_error", f"HTTP {e.status_code}")
            except InvalidAnswer as e:
                last = CaptionFailure(e.reason, e.detail)
            except (ValueError, TypeError, AttributeError, openai.APIResponseValidationError) as e:
                # 200 with a body that is not JSON or not a chat completion
                last = CaptionFailure("malformed", f"{type(e).__name__}: {str(e)[:120]}")
            self._note_failure(last)
            if self.stopped.is_set():
                raise self.stop_reason from None
            if attempt == cfg.max_retries:
                break
            delay = max(self._backoff(attempt), wait or 0.0)
            log.debug("caption attempt %d failed (%s); retrying in %.2f s", attempt + 1, last.reason, delay)
            self.stopped.wait(delay)  # a stopped run wakes every waiting retry at once
        assert last is not None
        raise CaptionFailure(last.reason, f"{last.detail} (gave up after {cfg.max_retries + 1} attempts)",
                             cfg.max_retries + 1)
