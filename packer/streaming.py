"""`--streaming`: read any input as a `datasets.IterableDataset`, in bounded memory.

Local files (json, jsonl, parquet; globs allowed) go through the `json`/`parquet` builders; a Hub dataset
through `load_dataset(NAME, CONFIG, split=..., streaming=True, **params)`, with `params` read from
`--hf-datasets-params FILE.json` as ModelLink does. The result is the same `RawRecord` stream the in-memory
readers give, so handlers, workers, sharding and errors behave identically. `datasets` unifies the schema
of a stream, filling keys a record lacks with None; those Nones are dropped again so that a handler sees
each record as it was written. `packer build` imports `datasets` with `USE_TORCH=0` (see packer.cli): it would
otherwise import torch, only to support DataLoader workers we do not use.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from packer.sources import InputError, RawRecord, _looks_like_jsonl, check_inputs, read_records

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _drop_nones(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _drop_nones(v) if isinstance(v, (dict, list)) else v for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [_drop_nones(v) if isinstance(v, (dict, list)) else v for v in x]
    return x


def _load_params(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        params = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"--hf-datasets-params {path}: {e}") from e
    if not isinstance(params, dict):
        raise InputError(f"--hf-datasets-params {path}: expected a JSON object of load_dataset keyword arguments")
    params.pop("streaming", None)
    return params


@dataclass(frozen=True)
class ArrowBatch:
    """A batch of streamed rows, still in Arrow form: it crosses to a worker as a few buffers (no per-record
    pickling), and the worker turns it into Python records."""

    source: str
    numbers: np.ndarray  # (n,) 1-based record numbers of the rows in the stream
    table: Any  # pyarrow.Table
    features: Any = None  # datasets.Features of the table's columns: some need decoding (e.g. Json ones)

    def __len__(self) -> int:
        return self.table.num_rows

    def __reduce__(self):
        # Pickling a sliced Arrow table ships the whole parent buffer (~9 MB per 512-row batch here); the
        # IPC stream format writes just the rows of the slice.
        import pyarrow as pa

        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, self.table.schema) as writer:
            writer.write_table(self.table)
        return _batch_from_ipc, (self.source, self.numbers, sink.getvalue().to_pybytes(), self.features)

    def records(self) -> list[RawRecord]:
        columns = self.table.to_pydict()
        if self.features is not None:
            columns = self.features.decode_batch(columns)
        names = list(columns)
        rows = [dict(zip(names, values, strict=True)) for values in zip(*columns.values(), strict=True)]
        if not names:  # no column at all: still one (empty) record per row, for the handler to reject
            rows = [{} for _ in range(self.table.num_rows)]
        return [RawRecord(self.source, n, None, _drop_nones(r))
                for n, r in zip(self.numbers.tolist(), rows, strict=True)]


def _batch_from_ipc(source: str, numbers: np.ndarray, ipc: bytes, features: Any) -> ArrowBatch:
    import pyarrow as pa

    return ArrowBatch(source, numbers, pa.ipc.open_stream(ipc).read_all(), features)


def open_stream(config, columns: set[str] | frozenset[str] | None = None) -> tuple[Iterator[ArrowBatch], int | None]:
    """(batches of this shard's records, total records of the shard if known) for a streaming BuildConfig;
    only `columns` (the handler's `input_columns`) are converted from Arrow."""
    import datasets

    datasets.logging.set_verbosity_error()  # parse failures are reported by us, with the fix
    params = _load_params(config.hf_datasets_params)
    if config.hf_dataset:
        source = config.hf_dataset + (f"/{config.hf_config}" if config.hf_config else "")
        try:
            ds = datasets.load_dataset(config.hf_dataset, config.hf_config, split=config.split, streaming=True,
                                       **params)
        except Exception as e:  # datasets raises many types for missing/unreachable datasets
            raise InputError(f"--hf-dataset {source}: {type(e).__name__}: {e}") from e
    else:
        files = [str(p) for p in check_inputs(config.inputs)]
        kinds = {_BUILDERS.get(Path(f).suffix.lower()) for f in files}
        if None in kinds or len(kinds) != 1:
            raise InputError(
                f"--streaming needs inputs of one kind (.json/.jsonl or .parquet), got {sorted(map(str, kinds))}; "
                "build them separately and `packer merge` the results"
            )
        kind = kinds.pop()
        # One stream per file, opened when reached, so that records are numbered within their own file.
        def opener(f: str):
            def open_ds():
                return datasets.load_dataset(kind, data_files=[f], split="train", streaming=True, **params)
            return open_ds

        streams = [(f, opener(f)) for f in files]
    total = None
    if not config.hf_dataset:
        from packer.sources import count_records

        counts = [count_records(Path(f)) for f in files]
        total = sum(counts) if all(c is not None for c in counts) else None
    else:
        streams = [(source, lambda: ds)]
        info_splits = getattr(ds.info, "splits", None)
        if info_splits and config.split in info_splits and info_splits[config.split].num_examples:
            total = int(info_splits[config.split].num_examples)
    if total is not None and config.num_shards > 1:
        total = len(range(config.shard_index, total, config.num_shards))
    return _stream_batches(streams, set(columns) if columns is not None else None, config), total


class StreamParseError(InputError):
    def __init__(self, source: str, start: int, cause: Exception):
        self.source, self.start = source, start
        super().__init__(
            f"{source}: `datasets` could not read the records after record {start} ({type(cause).__name__}: "
            f"{cause}); fix the file, or pass --on-error skip: JSON Lines are then re-read line by line from "
            "there, and the bad lines reported and skipped"
        )


def _stream_batches(streams, columns: set[str] | None, config) -> Iterator[ArrowBatch | list[RawRecord]]:
    seen = 0  # records before this file, over all files: shards take every K-th record of the whole input
    for source, open_ds in streams:
        try:
            for batch, n in _arrow_batches(open_ds(), source, columns, config.batch_size, config.num_shards,
                                           config.shard_index, seen):
                seen += n
                if batch is not None:
                    yield batch
        except StreamParseError as e:
            if config.on_error != "skip" or not _looks_like_lines(source):
                raise
            # The rest of this file, line by line: same records, numbered the same, bad lines become
            # per-record errors that --on-error skip counts and writes to the rejects file.
            rest = islice(read_records([Path(source)]), e.start, None)
            for batch in _batched(rest, config.batch_size):
                keep = [r for i, r in enumerate(batch, start=seen) if i % config.num_shards == config.shard_index]
                seen += len(batch)
                if keep:
                    yield keep


def _looks_like_lines(source: str) -> bool:
    path = Path(source)
    return path.is_file() and (path.suffix.lower() == ".jsonl" or _looks_like_jsonl(path))


def _batched(it: Iterator[RawRecord], size: int) -> Iterator[list[RawRecord]]:
    while batch := list(islice(it, size)):
        yield batch


def _arrow_batches(ds, source: str, columns: set[str] | None, batch_size: int, num_shards: int, shard_index: int,
                   before: int):
    """Yield (batch of this shard's rows or None, rows read). Arrow batches are ~7x cheaper than datasets'
    per-example formatting; only the handler's columns are kept, unless one it was told to read is missing
    (then every column stays, so the error can list them)."""
    from datasets import Features

    it = iter(ds.with_format("arrow").iter(batch_size=batch_size * num_shards))
    features = ds.features
    start = 0
    while True:
        try:
            table = next(it)
        except StopIteration:
            return
        except Exception as e:  # pyarrow/datasets parse errors: name where the stream broke
            raise StreamParseError(source, start, e) from e
        read = table.num_rows
        numbers = np.arange(start + 1, start + read + 1)
        start += read
        if columns is not None and columns <= set(table.column_names):
            table = table.select([c for c in table.column_names if c in columns])
        if num_shards > 1:
            keep = np.flatnonzero((before + numbers - 1) % num_shards == shard_index)
            table, numbers = table.take(keep), numbers[keep]
        if features is not None and list(features) != table.column_names:
            features = Features({c: ds.features[c] for c in table.column_names if c in ds.features})
        yield (ArrowBatch(source, numbers, table, features) if table.num_rows else None), read
