"""Read raw records from .json (array), .jsonl and .parquet files, each tagged with where it came from."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

SUFFIXES = (".json", ".jsonl", ".parquet")


class RawRecord(NamedTuple):
    """A record and where it came from. A NamedTuple, not a dataclass: batches of these are pickled to the
    tokenizer workers, and a tuple pickles about 4x faster."""

    source: str  # file path
    number: int  # 1-based record number within the file
    line: int | None  # 1-based line number for JSON Lines input
    data: Any  # the record (a dict, or any JSON value), its unparsed JSON text when `raw`, or a BadRecord
    raw: bool = False  # data is one JSON Lines line, parsed where it is used: in the worker, not the reader

    def parsed(self) -> Any:
        if not self.raw:
            return self.data
        try:
            return json.loads(self.data)
        except json.JSONDecodeError as e:
            return BadRecord(f"invalid JSON ({e.msg} at column {e.colno}); fix or remove the line", self.data[:200])

    def where(self) -> str:
        loc = f"record {self.number}" + (f" (line {self.line})" if self.line is not None else "")
        return f"{self.source}: {loc}"


@dataclass(frozen=True, slots=True)
class BadRecord:
    """A record that could not even be parsed: the reader does not decide whether this is fatal."""

    message: str
    raw: str


class InputError(ValueError):
    pass


def check_inputs(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The input files, shell-style globs expanded (sorted), each checked to exist and be a known format."""
    if not paths:
        raise InputError("no --input given")
    expanded: list[str] = []
    for pattern in map(os.fspath, paths):
        matched = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matched:
            raise InputError(f"--input {pattern!r} matches no file")
        expanded.extend(matched)
    out = []
    for p in map(Path, expanded):
        if not p.exists():
            raise InputError(f"input {p} does not exist")
        if p.is_dir():
            raise InputError(f"input {p} is a directory; pass the .json/.jsonl/.parquet files (a shell glob works)")
        if p.suffix.lower() not in SUFFIXES:
            raise InputError(f"input {p}: unsupported extension {p.suffix!r}; expected one of {', '.join(SUFFIXES)}")
        out.append(p)
    return out


def count_records(path: Path) -> int | None:
    """Record count for progress ETAs where it is cheap: parquet metadata, or JSON Lines' non-blank lines
    (one pass at ~1 GB/s, small next to tokenizing). None for JSON arrays, known only once parsed."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if path.suffix.lower() == ".jsonl" or _looks_like_jsonl(path):
        count, last = 0, b"\n"
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                count += block.count(b"\n") - block.count(b"\n\n") - block.count(b"\n\r\n")
                last = block[-1:]
        return count + (last != b"\n")
    return None


def read_records(paths: Sequence[Path]) -> Iterator[RawRecord]:
    for path in paths:
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            yield from _read_parquet(path)
        elif suffix == ".jsonl" or _looks_like_jsonl(path):
            yield from _read_jsonl(path)
        else:
            yield from _read_json_array(path)


def _looks_like_jsonl(path: Path) -> bool:
    """Some .json files (e.g. BELLE's) are really JSON Lines: their first line is a whole JSON object."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                if not line.lstrip().startswith("{"):
                    return False
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    return False  # a pretty-printed document: its first line is not a whole object
                # A one-line {"data": [{...}, ...]} document is a wrapper, not the first of many records.
                wrapper = (isinstance(first, dict) and len(first) == 1
                           and isinstance(v := next(iter(first.values())), list) and v and isinstance(v[0], dict))
                return isinstance(first, dict) and not wrapper
    return False


def _read_jsonl(path: Path) -> Iterator[RawRecord]:
    number = 0
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            number += 1
            yield RawRecord(str(path), number, line_no, line, raw=True)


def _read_json_array(path: Path) -> Iterator[RawRecord]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        with open(path, "rb") as f:
            if f.read(4096).lstrip().startswith(b"{"):
                # JSON Lines whose first line is broken: read line by line so only that record is bad.
                yield from _read_jsonl(path)
                return
        raise InputError(
            f"{path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg}); a .json input must be one JSON "
            "array of records (use .jsonl for one record per line)"
        ) from e
    if isinstance(data, dict):
        # A single record, or the common {"data": [...]} wrapper.
        lists = [v for v in data.values() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
        if len(data) == 1 and len(lists) == 1:
            data = lists[0]
        else:
            raise InputError(f"{path}: top-level JSON object; expected an array of records")
    if not isinstance(data, list):
        raise InputError(f"{path}: top-level JSON {type(data).__name__}; expected an array of records")
    for i, rec in enumerate(data, start=1):
        yield RawRecord(str(path), i, None, rec)


def _read_parquet(path: Path, batch_size: int = 1024) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
        for rec in batch.to_pylist():
            number += 1
            yield RawRecord(str(path), number, None, rec)
