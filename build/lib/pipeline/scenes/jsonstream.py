"""Streaming reads of big JSON files (nuScenes tables, map expansions) in bounded memory.

Chunked reads + ``json.JSONDecoder.raw_decode`` on one element at a time: memory is one chunk plus
the largest single element, never the whole file, whatever its formatting (pretty-printed or not).
Errors say where in the file, not in the current chunk: the line and column, the record (element of
the array, 1-based) and the line it starts on; a file that ends inside a record is called truncated.
They are :class:`JsonError` (a user error: one ``error:`` line).
"""
from __future__ import annotations

import json
from typing import Any, Iterator

from pipeline.contract.cli import BadInput

CHUNK = 1 << 22


class JsonError(BadInput):
    """A JSON file that does not parse; the message names the file, line, column and record."""


class _Reader:
    def __init__(self, f, path: str, chunk: int):
        self.f, self.path, self.chunk = f, path, chunk
        self.buf, self.pos, self.eof = "", 0, False
        self.dec = json.JSONDecoder()
        self.lines_before = 0     # newlines in the text already dropped from the buffer
        self.record = 0           # elements of the current array started so far (1-based index of the last)
        self.record_line = 0      # the line the last element starts on

    def _more(self) -> bool:
        if self.eof:
            return False
        more = self.f.read(self.chunk)
        self.eof = not more
        self.lines_before += self.buf.count("\n", 0, self.pos)
        self.buf, self.pos = self.buf[self.pos:] + more, 0
        return bool(more)

    def line_col(self, pos: int) -> tuple[int, int]:
        """1-based line and column in the file of buffer position ``pos``."""
        line = self.lines_before + self.buf.count("\n", 0, pos) + 1
        return line, pos - (self.buf.rfind("\n", 0, pos) + 1) + 1

    def where(self, pos: int) -> str:
        line, col = self.line_col(pos)
        rec = f" (record {self.record}, which starts at line {self.record_line})" if self.record else ""
        return f"line {line}, column {col}{rec}"

    def truncated(self) -> JsonError:
        rec = f" inside record {self.record} (which starts at line {self.record_line})" if self.record else ""
        return JsonError(f"{self.path}: the file ends{rec} at line {self.line_col(len(self.buf))[0]}: it is "
                         f"truncated; re-download or regenerate it")

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
            if not got:
                raise self.truncated()
            raise JsonError(f"{self.path}: expected {ch!r} at {self.where(self.pos)}, got "
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
                    if e.msg.startswith("Unterminated") or not self.buf[e.pos:].strip():
                        raise self.truncated() from None
                    raise JsonError(f"{self.path}: malformed JSON at {self.where(e.pos)}: {e.msg}; fix, re-download "
                                    "or regenerate the file") from None
            if not self._more():
                self.eof = True

    def separator(self, close: str) -> bool:
        """After an element: True if another follows (',' consumed), False at ``close`` (consumed)."""
        ch = self.peek()
        if not ch:
            raise self.truncated()
        at = self.pos
        self.pos += 1
        if ch == ",":
            return True
        if ch == close:
            return False
        raise JsonError(f"{self.path}: expected ',' or {close!r} at {self.where(at)}, got {ch!r}; the file is malformed")

    def elements(self) -> Iterator[Any]:
        self.expect("[")
        if self.peek() == "]":
            self.pos += 1
            return
        while True:
            self.record += 1
            self.peek()  # past the blanks: the record starts at its first character
            self.record_line = self.line_col(self.pos)[0]
            yield self.value()
            if not self.separator("]"):
                self.record = 0
                return


def iter_json_array(path: str, chunk: int = CHUNK) -> Iterator[dict]:
    """The elements of a file holding one JSON array, one at a time."""
    for _line, el in iter_json_records(path, chunk):
        yield el


def iter_json_records(path: str, chunk: int = CHUNK) -> Iterator[tuple[int, Any]]:
    """(line the element starts on, element) for each element of a file holding one JSON array."""
    try:
        with open(path, encoding="utf-8") as f:
            r = _Reader(f, path, chunk)
            if r.peek() != "[":
                raise JsonError(f"{path}: not a JSON array (starts with {r.buf[r.pos:r.pos + 20]!r})")
            for el in r.elements():
                yield r.record_line, el
            if r.peek():
                raise JsonError(f"{path}: data after the array's end at {r.where(r.pos)}")
    except UnicodeDecodeError as e:
        raise JsonError(f"{path}: not UTF-8 text ({e.reason}); re-download or regenerate it") from None


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
