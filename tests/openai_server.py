"""An OpenAI-compatible chat-completions server for tests and benches (stdlib http.server
in a thread, 127.0.0.1, ephemeral port).

It checks every request like a strict server would (bearer key, model, a text part
containing the expected prompt fragment, >= 1 image part that is a decodable base64
JPEG/PNG data URL) and answers deterministically from the image content: the caption
names the mean colour of the images and a short hash of their pixels, so a test can
tell which image produced which caption.

Misbehaviour, for robustness tests: ``plan`` is a list of actions consumed one per
request (FIFO, then "ok"), and ``rule(images) -> action | None`` picks an action from
the decoded images (e.g. always fail one clip). Actions: "ok", "429" (Retry-After:
``retry_after``), "500", "hang" (sleep ``hang_s`` before answering), "malformed" (200
with broken JSON), "empty", "refusal", "list" (an object inventory).
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from PIL import Image

REFUSAL_TEXT = "I'm sorry, but I can't help with describing this image."


def describe(images: list[Image.Image]) -> str:
    pixels = b"".join(im.tobytes() for im in images)
    means = [im.convert("RGB").reduce(8).resize((8, 8)).getdata() for im in images]
    r, g, b = (round(sum(px[c] for m in means for px in m) / (64 * len(images))) for c in range(3))
    light = "bright daylight" if (r + g + b) / 3 > 110 else "dim evening light"
    return (f"An overcast urban street in {light} with buildings and trees along the sidewalks; "
            f"the scene colour is rgb {r} {g} {b} (id {hashlib.sha256(pixels).hexdigest()[:10]}).")


class FakeOpenAI:
    def __init__(self, model: str = "test-vlm", api_key: str | None = None, expect_prompt: str | None = None,
                 retry_after: str = "1", hang_s: float = 5.0, latency_s: float = 0.0, storm_s: float = 0.0):
        self.model, self.api_key, self.expect_prompt = model, api_key, expect_prompt
        self.storm_s = storm_s       # answer 429 to everything for storm_s seconds after the first request
        self._storm_end: float | None = None
        self.retry_after, self.hang_s, self.latency_s = retry_after, hang_s, latency_s
        self.plan: list[str] = []
        self.rule: Callable[[list[Image.Image]], str | None] | None = None
        self.lock = threading.Lock()
        self.requests = 0            # every POST
        self.answered = 0            # 200 with a valid caption
        self.in_flight = 0
        self.max_in_flight = 0
        self.log: list[dict] = []    # per request: t, action, image count, digest
        self.errors: list[str] = []  # protocol violations seen (a test asserts this stays empty)
        self._stop = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> "FakeOpenAI":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def reset_counts(self) -> None:
        with self.lock:
            self.requests = self.answered = self.max_in_flight = 0
            self.log.clear()

    # ---- request checking ----------------------------------------------------

    def check(self, headers, body: dict) -> tuple[list[Image.Image], str]:
        problems = []
        if self.api_key is not None and headers.get("Authorization") != f"Bearer {self.api_key}":
            problems.append("missing or wrong bearer key")
        if body.get("model") != self.model:
            problems.append(f"model {body.get('model')!r} != {self.model!r}")
        msgs = body.get("messages") or []
        parts = [p for m in msgs if isinstance(m.get("content"), list) for p in m["content"]]
        text = " ".join(p.get("text", "") for p in parts if p.get("type") == "text")
        if self.expect_prompt and self.expect_prompt not in text:
            problems.append("prompt text missing")
        images = []
        for p in parts:
            if p.get("type") != "image_url":
                continue
            url = p.get("image_url", {}).get("url", "")
            if not url.startswith(("data:image/jpeg;base64,", "data:image/png;base64,")):
                problems.append("image is not a base64 data URL")
                continue
            try:
                im = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1], validate=True)))
                im.load()
                images.append(im.convert("RGB"))
            except Exception as e:
                problems.append(f"image not decodable: {e}")
        if not images:
            problems.append("no images")
        return images, "; ".join(problems)

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, code: int, payload: bytes, headers: dict | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_GET(self):  # /stats: counters for a client in another process (the bench)
                with server.lock:
                    actions: dict[str, int] = {}
                    for e in server.log:
                        actions[e["action"]] = actions.get(e["action"], 0) + 1
                    stats = {"requests": server.requests, "answered": server.answered,
                             "max_in_flight": server.max_in_flight, "actions": actions}
                self._send(200, json.dumps(stats).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with server.lock:
                    server.requests += 1
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    action = server.plan.pop(0) if server.plan else None
                    now = time.monotonic()
                    if server.storm_s and server._storm_end is None:
                        server._storm_end = now + server.storm_s
                    if action is None and server._storm_end is not None and now < server._storm_end:
                        action = "429"
                try:
                    self._serve(body, action)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _serve(self, body: dict, action: str | None) -> None:
                if not self.path.endswith("/chat/completions"):
                    self._send(404, b'{"error": {"message": "not found"}}')
                    return
                images, problem = server.check(self.headers, body)
                if problem:
                    with server.lock:
                        server.errors.append(problem)
                    code = 401 if "bearer" in problem else 400
                    self._send(code, json.dumps({"error": {"message": problem}}).encode())
                    return
                if action is None and server.rule is not None:
                    action = server.rule(images)
                action = action or "ok"
                with server.lock:
                    server.log.append({"t": time.monotonic(), "action": action, "images": len(images)})
                if server.latency_s:
                    time.sleep(server.latency_s)
                if action == "429":
                    self._send(429, b'{"error": {"message": "rate limited", "type": "rate_limit"}}',
                               {"Retry-After": server.retry_after})
                    return
                if action == "500":
                    self._send(500, b'{"error": {"message": "internal error"}}')
                    return
                if action == "malformed":
                    self._send(200, b'{"id": "x", "choices": [{"message": ')
                    return
                if action == "hang":
                    server._stop.wait(server.hang_s)
                text = {"empty": "", "refusal": REFUSAL_TEXT,
                        "list": "- 3 cars\n- 2 pedestrians\n- 1 truck parked at the curb"}.get(action)
                if text is None:
                    text = describe(images)
                    if action == "ok":
                        with server.lock:
                            server.answered += 1
                out = {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": server.model,
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": text}}],
                       "usage": {"prompt_tokens": 100 * len(images), "completion_tokens": len(text.split()),
                                 "total_tokens": 100 * len(images) + len(text.split())}}
                self._send(200, json.dumps(out).encode())

        return Handler


def main() -> None:
    """Serve until killed: python tests/openai_server.py [--latency S] [--storm S] [--retry-after S]."""
    import argparse
    import sys
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="test-vlm")
    ap.add_argument("--latency", type=float, default=0.0, help="seconds added to every answer (a slow model)")
    ap.add_argument("--storm", type=float, default=0.0, help="answer 429 for this many seconds after the first request")
    ap.add_argument("--retry-after", default="1", help="Retry-After header value on 429")
    a = ap.parse_args()
    with FakeOpenAI(model=a.model, latency_s=a.latency, storm_s=a.storm, retry_after=a.retry_after) as s:
        print(s.base_url, flush=True)
        print(f"serving {a.model} on {s.base_url}; GET /stats for counters; Ctrl-C to stop", file=sys.stderr)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
