"""Read raw records from .json (array), .jsonl and .parquet files, each tagged with where it came from."""

from __future__ import annotations

import codecs
import glob
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import numpy as np

from packer.json_array import ArrayError, read_array, starts_array

SUFFIXES = (".json", ".jsonl", ".parquet")


_scan_once = json.JSONDecoder().scan_once  # what json.loads runs, with the same (default) options
# msgspec's decoder reads a JSON Lines record in 55% of json's time (50k realistic records: 0.147 vs 0.265 s). Where
# it reads a line at all, it reads the value json.loads reads (fuzzed: 400k mutated records, 400k random floats);
# what it refuses (NaN, Infinity, numbers beyond a double, escaped lone surrogates, invalid JSON) goes through json.
# It keeps Python's limits (integers of over 4,300 digits, nesting at the recursion limit, within a few levels of
# where json stops).
_msgspec_decode = msgspec.json.Decoder().decode


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
        if isinstance(self.data, bytes):
            try:
                return _msgspec_decode(self.data)
            except Exception:  # msgspec.DecodeError, ValidationError, RecursionError: json reads it, or says why
                pass
        try:
            # Strictly UTF-8: json.loads(bytes) would guess UTF-16/32 and let encoded surrogates through.
            text = self.data.decode("utf-8") if isinstance(self.data, bytes) else self.data
            # (Here: .json array elements, which arrive as text, and the lines msgspec refused.)
            # json.loads' own scanner, called directly: the same value where it reads the whole line (json.loads
            # adds three Python calls and two whitespace matches per record: a fifth of parsing a JSON Lines
            # record). Anything else (surrounding whitespace, invalid JSON) goes through json.loads for its error.
            try:
                value, end = _scan_once(text, 0)
            except Exception:  # StopIteration (nothing at 0), JSONDecodeError, RecursionError, ...
                end = -1
            return value if end == len(text) else json.loads(text)
        except json.JSONDecodeError as e:
            text = self.data.decode("utf-8", errors="replace") if isinstance(self.data, bytes) else self.data
            hint = ("; its lines end with a bare CR (\\r): convert them to \\n (e.g. `tr '\\r' '\\n'`)"
                    if "\r" in text.rstrip("\r\n") and e.msg == "Extra data" else "")
            return BadRecord(f"invalid JSON ({e.msg.removesuffix(' at')} at column {e.colno}){hint}; fix or "
                             "remove the line", _head(self.data))
        except UnicodeDecodeError as e:
            return BadRecord(f"not UTF-8 (byte {e.start + 1} of the line); re-encode the file as UTF-8",
                             _head(self.data))
        except (ValueError, RecursionError) as e:  # valid JSON that Python cannot hold
            return BadRecord(_unparsable(e), _head(self.data))

    def where(self) -> str:
        loc = f"record {self.number}" + (f" (line {self.line})" if self.line is not None else "")
        return f"{self.source}: {loc}"


def _head(line: str | bytes) -> str:
    return line[:200] if isinstance(line, str) else line[:200].decode("utf-8", errors="replace")


@dataclass(frozen=True, slots=True)
class LineBlock:
    """Whole lines of a JSON Lines file, unparsed. The reader's work per block is a few vectorized byte scans,
    whatever the number of records: splitting, parsing and sharding happen in `records()`, in the tokenizer
    workers. Lines end at b"\\n" (a \\r before it is JSON whitespace), as `datasets` reads them; lines that
    are empty or hold only whitespace are not records."""

    source: str
    data: bytes
    first_line: int  # 1-based line number of the block's first line
    first_record: int  # 1-based record number (within the file) of its first record
    first_index: int  # 0-based index of its first record in the whole input: shards take every K-th
    num_records: int  # records in the block, over all shards
    num_shards: int = 1
    shard_index: int = 0

    def records(self) -> list[RawRecord]:
        """This shard's records of the block."""
        lines = self.data.split(b"\n")
        if lines and not lines[-1]:
            lines.pop()  # after the last line's \n
        if self.num_shards == 1 and len(lines) == self.num_records:  # no blank line: every line is a record
            new, source, number, line_no = tuple.__new__, self.source, self.first_record, self.first_line
            return [new(RawRecord, (source, number + j, line_no + j, line, True)) for j, line in enumerate(lines)]
        out = []
        number, index = self.first_record, self.first_index
        k, i = self.num_shards, self.shard_index
        for line_no, line in enumerate(lines, start=self.first_line):
            if _blank(line):
                continue
            if k == 1 or index % k == i:
                out.append(RawRecord(self.source, number, line_no, line, raw=True))
            number += 1
            index += 1
        return out


def _blank(line: bytes) -> bool:
    """Empty or whitespace only, Unicode whitespace included (a line of NBSPs is blank, as str.strip() says)."""
    rest = line.strip()
    return not rest or ((rest[0] >= 0x80 or 0x1C <= rest[0] <= 0x1F)
                        and not rest.decode("utf-8", errors="replace").strip())


_MAYBE_BLANK = np.zeros(256, dtype=bool)  # first bytes of lines that could be blank: whitespace, C1, non-ASCII
_MAYBE_BLANK[[9, 10, 11, 12, 13, 32, 0x1C, 0x1D, 0x1E, 0x1F]] = True
_MAYBE_BLANK[0x80:] = True


def _line_table(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(end offset of each line, just past its \\n; is it a record) for a chunk of whole lines. Vectorized:
    only lines whose first byte could start a blank line are looked at one by one, and JSON Lines have few."""
    if not data:
        return np.zeros(0, np.int64), np.zeros(0, bool)
    arr = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(arr == 10) + 1
    if data[-1:] != b"\n":
        ends = np.append(ends, len(data))
    starts = np.concatenate([[0], ends[:-1]])
    is_record = np.ones(ends.size, dtype=bool)
    for j in np.flatnonzero(_MAYBE_BLANK[arr[np.minimum(starts, arr.size - 1)]]).tolist():
        is_record[j] = not _blank(data[starts[j] : ends[j]])
    return ends, is_record


def _read_whole_lines(f, size: int) -> bytes:
    data = f.read(size)
    if data and not data.endswith(b"\n"):
        data += f.readline()
    return data


def read_line_blocks(path: Path, first_index: int = 0, num_shards: int = 1, shard_index: int = 0,
                     records_per_block: int = 512, read_bytes: int = 1 << 20,
                     max_block_bytes: int = 16 << 20) -> Iterator[LineBlock]:
    """A JSON Lines file as LineBlocks of `records_per_block` records, or fewer where that many would pass
    `max_block_bytes` (a block always holds at least one record) and at the end of the file. Linear: each byte
    is copied a bounded number of times, whatever the record sizes."""
    line, number, index = 1, 1, first_index  # of the first line not yet in a block
    pieces: list[bytes] = []  # whole lines read and not yet in a block, with their line tables
    tables: list[tuple[np.ndarray, np.ndarray]] = []
    held = have = 0  # their bytes and records
    eof, first = False, True
    with open(path, "rb") as f:
        while True:
            while have < records_per_block and held < max_block_bytes and not eof:
                data = _read_whole_lines(f, read_bytes)
                if first and data.startswith(codecs.BOM_UTF8):
                    data = data[len(codecs.BOM_UTF8):]  # json.loads would take the BOM for part of the record
                first = False
                if not data:
                    eof = True
                    break
                line_ends, is_record = _line_table(data)
                pieces.append(data)
                tables.append((line_ends + held, is_record))
                held += len(data)
                have += int(is_record.sum())
            if not pieces:
                return
            buf = pieces[0] if len(pieces) == 1 else b"".join(pieces)  # once per refill
            ends = np.concatenate([t[0] for t in tables])
            is_record = np.concatenate([t[1] for t in tables])
            seen = np.cumsum(is_record)  # records up to and including each line
            done = -1  # the last line already in a block
            while done + 1 < ends.size:
                start, before = (int(ends[done]), int(seen[done])) if done >= 0 else (0, 0)
                want = before + records_per_block
                last = int(np.searchsorted(seen, want)) if seen[-1] >= want else None
                if int(ends[-1]) - start >= max_block_bytes:  # the byte cap decides unless records come first
                    capped = max(int(np.searchsorted(ends, start + max_block_bytes, side="right")) - 1, done + 1)
                    if seen[-1] > before:  # at least one record, even a huge one
                        capped = max(capped, int(np.searchsorted(seen, before + 1)))
                    last = capped if last is None else min(last, capped)
                if last is None or last <= done:
                    if not eof:
                        break  # read more first
                    last = ends.size - 1
                n = int(seen[last]) - before
                if n:  # blank lines alone make no block; the numbering below still counts them
                    yield LineBlock(str(path), buf[start : int(ends[last])], line, number, index, n,
                                    num_shards, shard_index)
                line, number, index = line + last - done, number + n, index + n
                done = last
            cut = int(ends[done]) if done >= 0 else 0
            rest = buf[cut:]
            pieces, tables = ([rest], [(ends[done + 1 :] - cut, is_record[done + 1 :])]) if rest else ([], [])
            held, have = len(rest), int(seen[-1]) - (int(seen[done]) if done >= 0 else 0)
            if eof and not rest:
                return


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
        _check_content(p)
        out.append(p)
    return out


_COMPRESSED = {b"\x1f\x8b": ("gzip", "gunzip -k"), b"\x28\xb5\x2f\xfd": ("zstd", "zstd -d"),
               b"BZh": ("bzip2", "bunzip2 -k"), b"\xfd7zXZ\x00": ("xz", "unxz -k"), b"PK\x03\x04": ("zip", "unzip")}


def _check_content(p: Path) -> None:
    """What the name says: a compressed file under a .jsonl name, or a .parquet file without Parquet's magic
    bytes, is named here instead of failing deep inside a reader (pyarrow can abort on some)."""
    try:
        with open(p, "rb") as f:
            head = f.read(8)
            size = f.seek(0, os.SEEK_END)
            if size >= 4:
                f.seek(-4, os.SEEK_END)
            tail = f.read(4)
    except OSError as e:
        raise InputError(f"input {p}: cannot be read ({e.strerror})") from e
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) and p.suffix.lower() != ".parquet":
        raise InputError(f"input {p}: UTF-16 text (it starts with a UTF-16 byte-order mark); re-encode it as "
                         f"UTF-8 (e.g. `iconv -f UTF-16 -t UTF-8 {p}`)")
    for magic, (kind, command) in _COMPRESSED.items():
        if head.startswith(magic) and p.suffix.lower() != ".parquet":
            raise InputError(f"input {p}: {kind}-compressed, not {p.suffix} text; decompress it first "
                             f"(`{command} {p}`) and pass the result")
    if p.suffix.lower() == ".parquet" and (size < 12 or not head.startswith(b"PAR1") or tail != b"PAR1"):
        what = "empty" if not size else "truncated or not Parquet (no PAR1 magic at both ends)"
        raise InputError(f"input {p}: {what}; rewrite it (e.g. with pyarrow.parquet.write_table) or remove it")


def count_records(path: Path) -> int | None:
    """Record count for progress ETAs where it is cheap: parquet metadata, or JSON Lines' non-blank lines
    (one pass at ~1 GB/s, small next to tokenizing). None for JSON arrays, known only once parsed."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"{path}: Parquet metadata cannot be read ({type(e).__name__}: {e}); rewrite the "
                             "file (e.g. with pyarrow.parquet.write_table)") from e
    if path.suffix.lower() == ".jsonl" or _looks_like_jsonl(path):
        count, first = 0, True
        with open(path, "rb") as f:
            while block := _read_whole_lines(f, 1 << 24):
                if first and block.startswith(codecs.BOM_UTF8):
                    block = block[len(codecs.BOM_UTF8):]
                first = False
                count += int(_line_table(block)[1].sum())
        return count
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
    with open(path, encoding="utf-8-sig", errors="replace") as f:
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
    for block in read_line_blocks(path):
        yield from block.records()


def read_batches(paths: Sequence[Path], batch_size: int, num_shards: int = 1,
                 shard_index: int = 0) -> Iterator[LineBlock | list[RawRecord]]:
    """This shard's records of all `paths`, in order, in batches for the tokenizer workers: JSON Lines as
    unparsed LineBlocks, other files as lists of at most `batch_size` records. Record k of the whole input
    (0-based, over all files) belongs to shard k % num_shards."""
    index = 0
    for path in paths:
        if path.suffix.lower() == ".jsonl" or (path.suffix.lower() == ".json" and _looks_like_jsonl(path)):
            # Each block then holds batch_size records of this shard, on average.
            for block in read_line_blocks(path, index, num_shards, shard_index,
                                          records_per_block=batch_size * num_shards):
                index += block.num_records
                yield block
            continue
        batch: list[RawRecord] = []
        for rec in read_records([path]):
            if index % num_shards == shard_index:
                batch.append(rec)
                if len(batch) == batch_size:
                    yield batch
                    batch = []
            index += 1
        if batch:
            yield batch


def _read_json_array(path: Path) -> Iterator[RawRecord]:
    if not starts_array(path):
        yield from _read_json_document(path)
        return
    number = 0
    try:
        for line, element in read_array(path):
            number += 1
            if isinstance(element, Exception):
                yield RawRecord(str(path), number, line, BadRecord(_unparsable(element), ""))
            else:
                yield RawRecord(str(path), number, line, element, raw=True)
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 (byte {e.start + 1}: {e.reason}); re-encode the file as UTF-8") from e
    except ArrayError as e:
        raise InputError(
            f"{path}: invalid JSON at line {e.line} column {e.column} ({e.msg.removesuffix(' at')}), after {number} "
            "records; a .json "
            "input must be one JSON array of records (use .jsonl for one record per line)"
        ) from e


def _read_json_document(path: Path) -> Iterator[RawRecord]:
    """A .json file that is not an array: a {"data": [...]} wrapper, or JSON Lines whose first line is broken."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 ({e.reason}); re-encode the file as UTF-8") from e
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
    except (ValueError, RecursionError) as e:
        raise InputError(f"{path}: {_unparsable(e)}") from e
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


def _unparsable(e: Exception) -> str:
    """Why valid JSON cannot be read into Python: too deep, or an integer over Python's digit limit."""
    if isinstance(e, RecursionError):
        return ("nested deeper than the JSON parser allows (about 1,000 levels); flatten or remove the record")
    return f"{e}".split(";")[0] + "; write such numbers as strings, or remove the record"


def _read_parquet(path: Path, batch_size: int = 1024) -> Iterator[RawRecord]:
    """Rows as dicts. Columns of Arrow's JSON extension type (what `datasets` writes for its `Json` feature,
    e.g. MOSS's nested `chat`) hold JSON text and are decoded, as `datasets` reads them back."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    number = 0
    try:
        file = pq.ParquetFile(path)
        json_columns = [f.name for f in file.schema_arrow if _is_json_type(f.type)]
        for batch in file.iter_batches(batch_size=batch_size):
            for rec in batch.to_pylist():
                number += 1
                yield RawRecord(str(path), number, None, _decode_json_columns(rec, json_columns))
    except (pa.ArrowException, OSError) as e:  # corrupt pages, unsupported encodings
        raise InputError(f"{path}: Parquet cannot be read after record {number} ({type(e).__name__}: {e}); "
                         "rewrite the file (e.g. with pyarrow.parquet.write_table)") from e


def _is_json_type(t) -> bool:
    return getattr(t, "extension_name", None) == "arrow.json"


def _decode_json_columns(rec: dict, columns: list[str]) -> dict | BadRecord:
    for name in columns:
        text = rec.get(name)
        if text is None:
            continue
        try:
            rec[name] = json.loads(text)
        except json.JSONDecodeError as e:
            return BadRecord(f"column {name!r} (Arrow JSON type) holds invalid JSON ({e.msg} at column {e.colno}); "
                             "fix or remove the record", _head(text))
        except (ValueError, RecursionError) as e:
            return BadRecord(f"column {name!r}: {_unparsable(e)}", _head(text))
    return rec
