"""`--streaming --hf-dataset NAME`: read a Hub dataset as a `datasets.IterableDataset`, in bounded memory.

`load_dataset(NAME, CONFIG, split=..., streaming=True, **params)`, with `params` read from
`--hf-datasets-params FILE.json` as ModelLink does. Local files never come here: packer's own readers read
them identically with and without --streaming (`datasets`' JSON reader infers one Arrow schema per chunk and
coerces or re-parses values that do not fit it). The result is the same `RawRecord` stream the local
readers give, so handlers, workers, sharding and errors behave identically. `datasets` unifies the schema
of a stream, filling keys a record lacks with None; those Nones are dropped again so that a handler sees
each record as it was written. `packer build` imports `datasets` with `USE_TORCH=0` (see packer.cli): it would
otherwise import torch, only to support DataLoader workers we do not use.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from packer.sources import InputError, RawRecord


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
    source = config.hf_dataset + (f"/{config.hf_config}" if config.hf_config else "")
    try:
        ds = datasets.load_dataset(config.hf_dataset, config.hf_config, split=config.split, streaming=True,
                                   **params)
    except Exception as e:  # datasets raises many types for missing/unreachable datasets
        raise InputError(f"--hf-dataset {source}: {type(e).__name__}: {e}") from e
    total = None
    info_splits = getattr(ds.info, "splits", None)
    if info_splits and config.split in info_splits and info_splits[config.split].num_examples:
        total = int(info_splits[config.split].num_examples)
    if total is not None and config.num_shards > 1:
        total = len(range(config.shard_index, total, config.num_shards))
    return _stream_batches(ds, source, set(columns) if columns is not None else None, config), total


def _stream_batches(ds, source: str, columns: set[str] | None, config) -> Iterator[ArrowBatch]:
    try:
        for batch, _ in _arrow_batches(ds, source, columns, config.batch_size, config.num_shards,
                                       config.shard_index, 0):
            if batch is not None:
                yield batch
    except Exception as e:  # pyarrow/datasets errors while streaming: name the dataset
        raise InputError(f"--hf-dataset {source}: reading failed ({type(e).__name__}: {e})") from e


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
            raise InputError(f"--hf-dataset {source}: reading the records after record {start} failed "
                             f"({type(e).__name__}: {e})") from e
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
