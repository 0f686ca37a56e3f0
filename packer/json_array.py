"""A .json file holding one JSON array of records, read element by element in bounded memory.

`json.load` holds the whole document and all its records at once (a 20 GB array needs several times that).
Here the text is decoded in 1 MiB pieces and each element is found with the C decoder's `raw_decode`;
the element's *text* is what travels on (a `RawRecord` with `raw=True`), parsed again where it is used, as a
JSON Lines line is. So records, values and errors are exactly `json.load`'s, element by element:

    [ {"a": 1} , {"a": 2} ]      ->  RawRecord(record 1, line 1, '{"a": 1}'), RawRecord(record 2, ...)
    [ {"a": 1} {"a": 2} ]        ->  record 1, then InputError "Expecting ',' delimiter" at line 1 column 12

An element the decoder cannot hold (an integer of over 4,300 digits, nesting deeper than the recursion
limit) is still delimited (by a bracket scan that skips strings) and becomes that one record's error, so
`--on-error skip` can skip it. Anything that is not an array at the top level goes back to the caller.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from pathlib import Path

_WS = re.compile(r"[ \t\n\r]*")
_STRING_OR_BRACKET = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|"|[\[\]{}]', re.DOTALL)  # a lone " is a cut string
_NUMBER = re.compile(r"-?[0-9.eE+-]+")
_DECODER = json.JSONDecoder()


class ArrayError(ValueError):
    """Invalid JSON in the array: (message, line, column), the column 1-based as `json` gives it."""

    def __init__(self, msg: str, line: int, column: int):
        self.msg, self.line, self.column = msg, line, column
        super().__init__(f"{msg}: line {line} column {column}")


class _Window:
    """A sliding window of decoded text over a file: `buf[pos:]` is what is not consumed yet."""

    def __init__(self, f, piece: int):
        self.f, self.piece = f, piece
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")("strict")
        self.buf, self.pos, self.eof = "", 0, False
        self.line, self.column = 1, 1  # of buf[0]
        self.offset = 0  # bytes read so far

    def more(self, want: int = 0) -> bool:
        """Read at least one more piece (or `want` more characters); False at the end of the file."""
        if self.eof:
            return False
        if self.pos:
            self.line, self.column = self.where(self.pos)
            self.buf, self.pos = self.buf[self.pos :], 0
        start = len(self.buf)
        while not self.eof and len(self.buf) - start < max(want, 1):
            data = self.f.read(max(self.piece, want))
            pending = len(self.decoder.getstate()[0])  # bytes of a character cut by the last piece
            try:
                self.buf += self.decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                base = self.offset - pending
                raise UnicodeDecodeError(e.encoding, e.object, base + e.start, base + e.end, e.reason) from None
            self.offset += len(data)
            self.eof = not data
        return True

    def where(self, i: int) -> tuple[int, int]:
        newlines = self.buf.count("\n", 0, i)
        if not newlines:
            return self.line, self.column + i
        return self.line + newlines, i - self.buf.rfind("\n", 0, i)

    def skip_ws(self) -> str:
        """Skip whitespace; the next character, or "" at the end of the file."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.more():
                return ""

    def error(self, msg: str, i: int | None = None) -> ArrayError:
        return ArrayError(msg, *self.where(self.pos if i is None else i))


def starts_array(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096)
    return head.removeprefix(codecs.BOM_UTF8).lstrip(b" \t\n\r").startswith(b"[")


def read_array(path: Path, piece: int = 1 << 20) -> Iterator[tuple[int, str | Exception]]:
    """(line, element text) for each element of the top-level array in `path`, or (line, ValueError/
    RecursionError) for an element the decoder cannot hold. Raises ArrayError on invalid JSON and
    UnicodeDecodeError (byte offsets into the file) on text that is not UTF-8."""
    with open(path, "rb") as f:
        w = _Window(f, piece)
        if w.skip_ws() != "[":
            raise w.error("Expecting '['")
        w.pos += 1
        if w.skip_ws() == "]":
            w.pos += 1
            return _expect_end(w)
        while True:
            if not w.skip_ws():
                raise w.error("Expecting value")
            line = w.where(w.pos)[0]
            end, failure = _element(w)
            yield line, failure if failure is not None else w.buf[w.pos : end]
            w.pos = end
            c = w.skip_ws()
            if c == "]":
                w.pos += 1
                return _expect_end(w)
            if c != ",":
                raise w.error("Expecting ',' delimiter")
            w.pos += 1


def _element(w: _Window) -> tuple[int, Exception | None]:
    """(end of the element at w.pos, None) or (its end, why the decoder cannot hold it)."""
    while True:
        try:
            _, end = _DECODER.raw_decode(w.buf, w.pos)
        except json.JSONDecodeError as e:
            # Near the window's end the element may just be cut off: read on (doubling, so that a huge element
            # costs linear time) and try again. Elsewhere the document is invalid whatever follows.
            cut = e.pos >= len(w.buf) - 8 or e.msg.startswith("Unterminated string")
            if cut and w.more(len(w.buf)):
                continue
            raise w.error(e.msg, e.pos) from None
        except (ValueError, RecursionError) as e:  # too many digits, too deep: delimit it without the decoder
            end = _scan_end(w.buf, w.pos)
            if end is None:
                if w.more(len(w.buf)):
                    continue
                raise w.error("Unterminated value") from None
            return end, e
        if w.buf[w.pos] in "-0123456789" and _NUMBER.match(w.buf, w.pos).end() == len(w.buf) and w.more():
            continue  # a number may go on in the next piece ("1" of "1.5e-07")
        return end, None


def _scan_end(buf: str, pos: int) -> int | None:
    """End of the array or object at `pos` by bracket counting (strings skipped), or None if not in `buf`."""
    if buf[pos] not in "[{":
        m = _NUMBER.match(buf, pos)  # a bare number: to its last digit
        return m.end() if m and m.end() < len(buf) else None
    depth = 0
    for m in _STRING_OR_BRACKET.finditer(buf, pos):
        c = m.group()
        if c == '"':
            return None
        if c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if not depth:
                return m.end()
    return None


def _expect_end(w: _Window) -> None:
    if w.skip_ws():
        raise w.error("Extra data")
