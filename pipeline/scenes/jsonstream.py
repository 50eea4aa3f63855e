"""Streaming reads of big JSON files (nuScenes tables, map expansions) in bounded memory.

Chunked reads + ``json.JSONDecoder.raw_decode`` on one element at a time: memory is one chunk plus
the largest single element, never the whole file, whatever its formatting (pretty-printed or not).
"""
from __future__ import annotations

import json
from typing import Any, Iterator

CHUNK = 1 << 22


class _Reader:
    def __init__(self, f, path: str, chunk: int):
        self.f, self.path, self.chunk = f, path, chunk
        self.buf, self.pos, self.eof = "", 0, False
        self.dec = json.JSONDecoder()

    def _more(self) -> bool:
        if self.eof:
            return False
        more = self.f.read(self.chunk)
        self.eof = not more
        self.buf, self.pos = self.buf[self.pos:] + more, 0
        return bool(more)

    def peek(self) -> str:
        """Next non-blank character ('' at the end of the file), not consumed."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._more():
                return ""

    def expect(self, ch: str) -> None:
        got = self.peek()
        if got != ch:
            raise ValueError(f"{self.path}: expected {ch!r} at character {self.pos} of the current chunk, got "
                             f"{self.buf[self.pos:self.pos + 20]!r}; the file is not the JSON layout expected")
        self.pos += 1

    def value(self) -> Any:
        self.peek()
        while True:
            try:
                v, end = self.dec.raw_decode(self.buf, self.pos)
                if end < len(self.buf) or self.eof:   # a number cut by the chunk end must not pass for whole
                    self.pos = end
                    return v
            except json.JSONDecodeError as e:
                if self.eof:
                    raise ValueError(f"{self.path}: malformed JSON near character {e.pos}: {e.msg}; re-download "
                                     "or regenerate the file") from None
            if not self._more():
                self.eof = True

    def separator(self, close: str) -> bool:
        """After an element: True if another follows (',' consumed), False at ``close`` (consumed)."""
        ch = self.peek()
        self.pos += 1
        if ch == ",":
            return True
        if ch == close:
            return False
        raise ValueError(f"{self.path}: expected ',' or {close!r}, got {ch!r}; the file is truncated or malformed")

    def elements(self) -> Iterator[Any]:
        self.expect("[")
        if self.peek() == "]":
            self.pos += 1
            return
        while True:
            yield self.value()
            if not self.separator("]"):
                return


def iter_json_array(path: str, chunk: int = CHUNK) -> Iterator[dict]:
    """The elements of a file holding one JSON array, one at a time."""
    with open(path, encoding="utf-8") as f:
        r = _Reader(f, path, chunk)
        if r.peek() != "[":
            raise ValueError(f"{path}: not a JSON array (starts with {r.buf[r.pos:r.pos + 20]!r})")
        yield from r.elements()
        if r.peek():
            raise ValueError(f"{path}: data after the array's end")


def iter_json_object(path: str, keys: set[str] | None = None, chunk: int = CHUNK) -> Iterator[tuple[str, Any]]:
    """A file holding one JSON object: (key, element) for each element of an array value, (key, value) for any
    other value; with ``keys``, the other keys' values are still parsed (one at a time) but not yielded."""
    with open(path, encoding="utf-8") as f:
        r = _Reader(f, path, chunk)
        r.expect("{")
        if r.peek() == "}":
            return
        while True:
            key = r.value()
            r.expect(":")
            want = keys is None or key in keys
            if r.peek() == "[":
                for el in r.elements():
                    if want:
                        yield key, el
            else:
                v = r.value()
                if want:
                    yield key, v
            if not r.separator("}"):
                return
