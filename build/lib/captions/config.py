"""Caption stage configuration: which captions, which server, how hard to push it.

The API key is never a field of the config. The config names the environment
variable that holds it (``api_key_env``, default ``OPENAI_API_KEY``) and the key is
read from the environment only at the moment the HTTP client is built, so no
``repr``, log line, config dump or output file can contain it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.contract.cli import UserError

MODES = ("mllm", "dataset", "none")
LAYOUTS = ("mosaic", "separate")
DETAILS = ("auto", "low", "high")
PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
DEFAULT_PROMPT_VERSION = "v1"


class CaptionConfigError(UserError, ValueError):
    """A caption configuration that cannot work; the message says what to set."""


class CaptionFatal(RuntimeError):
    """A failure that every request would hit (authentication, unknown model, a server that fails the first
    requests all the same way): stop the run (exit 3, docs/cluster.md)."""


@dataclass
class CaptionConfig:
    mode: str = "dataset"                 # mllm | dataset (nuScenes scene.description) | none (empty)
    base_url: str | None = None           # OpenAI-compatible endpoint, e.g. http://host:8000/v1
    model: str = "gpt-4o-mini"
    api_key_env: str = "OPENAI_API_KEY"   # NAME of the env var holding the key, never the key itself
    prompt_version: str = DEFAULT_PROMPT_VERSION
    layout: str = "mosaic"                # one labelled 2x3 mosaic (cheaper) or one image per view
    tile_width: int = 512                 # each view is resized to this width before sending
    detail: str = "auto"                  # OpenAI image detail hint; other servers ignore it
    jpeg_quality: int = 90
    max_tokens: int = 200
    temperature: float = 0.0
    seed: int | None = 0                  # sent to the server; only some servers honour it
    concurrency: int = 8                  # requests in flight at once
    rpm: float | None = None              # requests per minute ceiling (None = unlimited)
    timeout_s: float = 60.0
    max_retries: int = 5                  # extra attempts per item after the first
    fail_fast: int = 8                    # stop the run when the first N requests all fail the same way (0: never)
    backoff_base_s: float = 1.0           # attempt k waits base * 2**k * jitter, capped by backoff_max_s
    backoff_max_s: float = 60.0
    max_retry_after_s: float = 300.0      # a server asking to wait longer than this is an error
    min_chars: int = 20                   # answer validation (see captions/validate.py)
    max_chars: int = 1500
    reject_object_lists: bool = True
    price_input_per_mtok: float | None = None   # USD per 1M prompt tokens, for the cost estimate
    price_output_per_mtok: float | None = None  # USD per 1M completion tokens
    flush_every: int = 32                 # answers between checkpoints of the caption table (resume)
    extra: dict[str, Any] = field(default_factory=dict)  # extra request body fields (e.g. vLLM top_k)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise CaptionConfigError(f"caption mode {self.mode!r} is not one of {MODES}")
        if self.layout not in LAYOUTS:
            raise CaptionConfigError(f"image layout {self.layout!r} is not one of {LAYOUTS}")
        if self.detail not in DETAILS:
            raise CaptionConfigError(f"image detail {self.detail!r} is not one of {DETAILS}")
        if self.fail_fast < 0 or self.max_retries < 0 or self.timeout_s <= 0:
            raise CaptionConfigError(f"fail_fast >= 0, max_retries >= 0 and timeout_s > 0 please, got {self.fail_fast}, "
                                     f"{self.max_retries}, {self.timeout_s}")
        if self.concurrency < 1:
            raise CaptionConfigError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.rpm is not None and self.rpm <= 0:
            raise CaptionConfigError(f"rpm must be > 0 or None, got {self.rpm}")
        if self.tile_width < 16:
            raise CaptionConfigError(f"tile_width must be >= 16 pixels, got {self.tile_width}")
        if self.base_url is not None and not str(self.base_url).strip():
            self.base_url = None

    # ---- endpoint ---------------------------------------------------------------

    def endpoint(self) -> str | None:
        """The base URL from the config, else from $OPENAI_BASE_URL."""
        return self.base_url or os.environ.get("OPENAI_BASE_URL") or None

    def api_key(self) -> str:
        """Read the key from the named env var at call time. Servers without auth (vLLM, Ollama)
        accept any string, so a missing key becomes a placeholder rather than an error."""
        return os.environ.get(self.api_key_env) or "EMPTY"

    def require_endpoint(self) -> str:
        url = self.endpoint()
        if not url:
            raise CaptionConfigError(
                "caption mode 'mllm' needs an OpenAI-compatible endpoint: set OPENAI_BASE_URL "
                "(e.g. http://localhost:8000/v1 for vLLM, https://api.openai.com/v1 for OpenAI) or pass "
                "--base-url, and put the key in the env var named by --api-key-env (default OPENAI_API_KEY); "
                "or use --mode dataset for nuScenes' own scene descriptions")
        return url

    # ---- identity of a generation (the cache key) -------------------------------

    def generation_params(self) -> dict[str, Any]:
        """Everything besides image, prompt and model that changes the answer."""
        return {"layout": self.layout, "tile_width": self.tile_width, "detail": self.detail,
                "jpeg_quality": self.jpeg_quality, "max_tokens": self.max_tokens,
                "temperature": self.temperature, "seed": self.seed, "extra": self.extra}

    def params_json(self) -> str:
        return json.dumps(self.generation_params(), sort_keys=True, separators=(",", ":"))

    # ---- loading ----------------------------------------------------------------

    @classmethod
    def from_env(cls, **overrides: Any) -> "CaptionConfig":
        """Defaults + environment: mode 'mllm' when OPENAI_BASE_URL is set, else 'dataset'.
        $CAPTION_MODEL overrides the model name."""
        kw: dict[str, Any] = {}
        if os.environ.get("CAPTION_MODEL"):
            kw["model"] = os.environ["CAPTION_MODEL"]
        kw["mode"] = "mllm" if os.environ.get("OPENAI_BASE_URL") else "dataset"
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides: Any) -> "CaptionConfig":
        """A YAML or JSON file with CaptionConfig fields. It may name the key's env var
        (``api_key_env``) but must not contain a key."""
        if not Path(path).is_file():
            raise CaptionConfigError(f"caption config {path} not found; pass a YAML or JSON file of CaptionConfig fields")
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            import yaml
            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise CaptionConfigError(f"{path}: expected a mapping of CaptionConfig fields")
        data = data.get("captions", data)
        if "api_key" in data:
            raise CaptionConfigError(f"{path}: do not put an API key in a config file; put it in an environment "
                                     f"variable and name that variable with 'api_key_env'")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CaptionConfigError(f"{path}: unknown caption config fields {unknown}; known: {sorted(known)}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        if "mode" not in data:  # same default as from_env: ask a server only when one is configured
            data["mode"] = "mllm" if (data.get("base_url") or os.environ.get("OPENAI_BASE_URL")) else "dataset"
        return cls(**data)


def prompt_path(version: str) -> Path:
    return PROMPT_DIR / f"{version}.txt"


def prompt_versions() -> list[str]:
    return sorted(p.stem for p in PROMPT_DIR.glob("*.txt"))


def load_prompt(version: str) -> str:
    """The prompt text of a version (lines starting with '#' are notes for humans, not sent)."""
    p = prompt_path(version)
    if not p.exists():
        raise CaptionConfigError(f"no prompt version {version!r}: {p} does not exist; "
                                 f"available: {prompt_versions()} (add captions/prompts/<version>.txt)")
    lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if not ln.startswith("#")]
    text = "\n".join(lines).strip()
    if not text:
        raise CaptionConfigError(f"prompt file {p} is empty")
    return text


def prompt_sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
