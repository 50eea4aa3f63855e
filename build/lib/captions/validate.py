"""Answer validation: is what the MLLM returned usable as a caption?

The heuristic, in order (the first failure is the reason recorded in quarantine):
1. ``truncated``: finish_reason == "length" (the answer was cut at max_tokens).
2. ``empty``: nothing left after normalising whitespace and stripping quotes and
   a leading "Caption:"/"Description:" label.
3. ``too_short`` / ``too_long``: fewer than ``min_chars`` or more than ``max_chars`` characters.
4. ``refusal``: starts with, or contains early on, refusal boilerplate
   ("I'm sorry", "I cannot", "as an AI", "unable to describe", ...).
5. ``object_list`` (when ``reject_object_lists``; the default prompt forbids objects):
   a bulleted or numbered list (two or more lines starting with -, *, • or "1."), or a
   count of objects ("3 cars", "two pedestrians"), or 4+ distinct object-class words.
   Mentioning "many parked cars" is fine: only inventories and exact counts are rejected.
A failed validation is retried like a server error (sampling may differ), then quarantined.
"""
from __future__ import annotations

import re

REFUSAL = re.compile(
    r"(i'?m sorry|i am sorry|i apologi[sz]e|i cannot|i can'?t|i can not|i'?m unable|i am unable|unable to "
    r"(help|assist|provide|describe|comply)|as an ai\b|i'?m not able to|cannot (help|assist) with)",
    re.IGNORECASE)
OBJECT_WORDS = ("car", "truck", "bus", "trailer", "pedestrian", "person", "people", "bicycle", "cyclist",
                "motorcycle", "barrier", "traffic cone", "cone", "construction vehicle", "van", "vehicle")
_OBJ = r"(?:" + "|".join(re.escape(w) for w in sorted(OBJECT_WORDS, key=len, reverse=True)) + r")(?:e?s)?"
COUNT = re.compile(r"\b(?:\d+|one|two|three|four|five|six|seven|eight|nine|ten|a dozen)\s+"
                   r"(?:\w+\s+)?" + _OBJ + r"\b", re.IGNORECASE)
OBJECT_WORD = re.compile(r"\b(" + _OBJ + r")\b", re.IGNORECASE)
LIST_LINE = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+", re.MULTILINE)
LABEL_PREFIX = re.compile(r"^\s*(?:caption|description|answer)\s*:\s*", re.IGNORECASE)


class InvalidAnswer(ValueError):
    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


def normalise(text: str) -> str:
    """One line, single spaces, without wrapping quotes or a 'Caption:' label."""
    t = LABEL_PREFIX.sub("", text.strip())
    t = " ".join(t.split())
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "\"'“”":
        t = t[1:-1].strip()
    return t.strip("“”").strip()


def check_answer(text: str | None, finish_reason: str | None, *, min_chars: int, max_chars: int,
                 reject_object_lists: bool) -> str:
    """Return the normalised caption or raise InvalidAnswer(reason)."""
    if finish_reason == "length":
        raise InvalidAnswer("truncated", "finish_reason=length; raise max_tokens or shorten the prompt")
    raw = text or ""
    t = normalise(raw)
    if not t:
        raise InvalidAnswer("empty", "the server returned no text")
    if len(t) < min_chars:
        raise InvalidAnswer("too_short", f"{len(t)} < {min_chars} characters: {t[:80]!r}")
    if len(t) > max_chars:
        raise InvalidAnswer("too_long", f"{len(t)} > {max_chars} characters")
    if REFUSAL.search(t[:160]):
        raise InvalidAnswer("refusal", t[:120])
    if reject_object_lists:
        if len(LIST_LINE.findall(raw)) >= 2:
            raise InvalidAnswer("object_list", "answer is a bulleted/numbered list")
        m = COUNT.search(t)
        if m:
            raise InvalidAnswer("object_list", f"counts objects: {m.group(0)!r}")
        words = {w.lower().rstrip("s") for w in OBJECT_WORD.findall(t)}
        if len(words) >= 4:
            raise InvalidAnswer("object_list", f"names {len(words)} object kinds: {sorted(words)}")
    return t
