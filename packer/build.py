"""`packer build`: records -> segments -> samples -> packs -> indexed dataset.

    read_records ─> handler ─> SampleEncoder ─> overflow ─> spill (arrival order, on disk)
                                                                 │ lengths
                                                      pack(lengths) = PackPlan
                                                                 │
    PREFIX.bin/.idx, PREFIX_loss_mask.bin/.idx  <─ gather in pack order ─┘   then PREFIX.json (last)

Tokenized samples are spilled to a temporary file in arrival order, so memory holds only the lengths
(8 bytes per sample) whatever the corpus size; the global packer then needs every length at once.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from packer import __version__
from packer.indexed import IndexedDatasetWriter, token_dtype
from packer.manifest import (
    FORMAT,
    loss_mask_prefix,
    manifest_path,
    output_files,
    sha256_file,
    write_json_atomic,
)
from packer.packing import ALGORITHMS, PackPlan, efficiency, lower_bound, pack
from packer.records import Sample
from packer.sources import BadRecord, RawRecord, check_inputs, count_records, read_records
from packer.tokenize import SampleEncoder, TokenizerInfo, load_tokenizer

OVERFLOW = ("truncate", "split", "drop", "error")
ON_ERROR = ("fail", "skip")


class BuildError(Exception):
    """A user-facing failure: the message names the file, record, field and fix."""


@dataclass(frozen=True)
class BuildConfig:
    handler: str
    inputs: tuple[str, ...]
    tokenizer: str
    seq_length: int
    output_prefix: str
    eod_token: str | None = None
    map_keys: dict[str, str] = field(default_factory=dict)
    json_keys: tuple[str, ...] = ("text",)
    template: str | None = None
    system: str | None = None
    train_on_prompt: bool = False
    last_turn_only: bool = False
    overflow: str | None = None  # None: the handler's default
    pack: str = "bfd"
    on_error: str = "fail"
    workers: int = 1
    batch_size: int = 512

    def validate(self) -> None:
        if self.seq_length < 2:
            raise BuildError(f"--seq-length must be >= 2, got {self.seq_length}")
        if self.overflow is not None and self.overflow not in OVERFLOW:
            raise BuildError(f"--overflow {self.overflow!r}: choose one of {', '.join(OVERFLOW)}")
        if self.pack not in ALGORITHMS:
            raise BuildError(f"--pack {self.pack!r}: choose one of {', '.join(ALGORITHMS)}")
        if self.on_error not in ON_ERROR:
            raise BuildError(f"--on-error {self.on_error!r}: choose one of {', '.join(ON_ERROR)}")
        if self.workers < 1:
            raise BuildError(f"--workers must be >= 1, got {self.workers}")


@dataclass
class Counters:
    records: int = 0
    skipped: int = 0  # malformed records, with --on-error skip
    samples: int = 0  # samples written (a split sample counts once per chunk)
    tokens: int = 0
    target_tokens: int = 0
    truncated: int = 0
    split: int = 0  # samples split into several chunks
    dropped: int = 0  # samples dropped by --overflow drop
    dropped_no_target: int = 0  # truncation left no trainable token, or a split chunk had none
    unterminated: int = 0  # split chunks other than the last: they do not end with EOD

    def add(self, other: Counters) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class Chunk:
    """What encoding a batch of records yields: samples as flat arrays (cheap to pass between processes)."""

    ids: np.ndarray  # concatenated sample ids
    mask: np.ndarray  # concatenated loss masks
    lengths: np.ndarray  # (n_samples,)
    rejects: list[dict]
    counters: Counters


class RecordEncoder:
    """handler + tokenizer + overflow policy for one process; `encode` turns raw records into a Chunk."""

    def __init__(self, config: BuildConfig):
        from handlers import HandlerOptions, get_handler

        self.config = config
        self.tokenizer, self.info = load_tokenizer(config.tokenizer, config.eod_token)
        options = HandlerOptions(
            template=config.template,
            map_keys=dict(config.map_keys),
            json_keys=tuple(config.json_keys),
            last_turn_only=config.last_turn_only,
            system=config.system,
        )
        try:
            self.handler = get_handler(config.handler, options)
        except ValueError as e:
            raise BuildError(str(e)) from e
        self.overflow = config.overflow or self.handler.default_overflow
        self.encoder = SampleEncoder(self.tokenizer, self.info, train_on_prompt=config.train_on_prompt)

    def encode(self, records: list[RawRecord]) -> Chunk:
        from handlers import RecordError

        c = Counters(records=len(records))
        rejects: list[dict] = []
        segments, kept = [], []
        for rec in records:
            try:
                if isinstance(rec.data, BadRecord):
                    raise RecordError("<line>", rec.data.message)
                if not isinstance(rec.data, dict):
                    raise RecordError("<record>", f"expected a JSON object, got {type(rec.data).__name__}")
                segments.append(self.handler(rec.data))
                kept.append(rec)
            except RecordError as e:
                message = f"{rec.where()}: field {e.field!r}: {e.message}"
                if self.config.on_error == "fail":
                    raise BuildError(message + " (or pass --on-error skip to skip and count such records)") from e
                c.skipped += 1
                raw = rec.data.raw if isinstance(rec.data, BadRecord) else rec.data
                rejects.append({"source": rec.source, "record": rec.number, "line": rec.line, "field": e.field,
                                "error": e.message, "data": raw})
        out: list[Sample] = []
        for rec, sample in zip(kept, self.encoder.encode_batch(segments), strict=True):
            out.extend(self._fit(rec, sample, c))
        lengths = np.fromiter((s.ids.size for s in out), dtype=np.int64, count=len(out))
        ids = np.concatenate([s.ids for s in out]) if out else np.zeros(0, np.int64)
        mask = np.concatenate([s.loss_mask for s in out]) if out else np.zeros(0, np.uint8)
        c.samples, c.tokens, c.target_tokens = len(out), int(lengths.sum()), int(mask.sum())
        return Chunk(ids, mask, lengths, rejects, c)

    def _fit(self, rec: RawRecord, s: Sample, c: Counters) -> list[Sample]:
        """Apply --overflow to a sample longer than --seq-length."""
        n = self.config.seq_length
        if s.ids.size <= n:
            return [s]
        policy = self.overflow
        if policy == "error":
            raise BuildError(
                f"{rec.where()}: sample is {s.ids.size} tokens, longer than --seq-length {n}; "
                "pass --overflow truncate|split|drop, or a larger --seq-length"
            )
        if policy == "drop":
            c.dropped += 1
            return []
        if policy == "truncate":
            # Keep the first n-1 tokens and the EOD: the response is cut, the document still ends.
            ids = np.append(s.ids[: n - 1], s.ids[-1])
            mask = np.append(s.loss_mask[: n - 1], s.loss_mask[-1])
            if not mask[:-1].any():
                c.dropped_no_target += 1
                return []
            c.truncated += 1
            return [Sample(ids, mask)]
        # split: consecutive chunks of n tokens; only the last keeps the EOD.
        c.split += 1
        chunks = []
        for a in range(0, s.ids.size, n):
            mask = s.loss_mask[a : a + n]
            if not mask.any():
                c.dropped_no_target += 1
                continue
            chunks.append(Sample(s.ids[a : a + n], mask))
        c.unterminated += len(chunks) - 1  # the last chunk holds the EOD (a target, so never dropped)
        return chunks


# -- worker pool: each process builds its own RecordEncoder in the initializer ----------------------
_worker_encoder: RecordEncoder | None = None


def _init_worker(config: BuildConfig) -> None:
    global _worker_encoder
    _worker_encoder = RecordEncoder(config)


def _encode_in_worker(records: list[RawRecord]) -> Chunk:
    if _worker_encoder is None:
        raise RuntimeError("worker used before _init_worker ran")
    return _worker_encoder.encode(records)


def _batches(it: Iterable[RawRecord], size: int) -> Iterator[list[RawRecord]]:
    it = iter(it)
    while batch := list(islice(it, size)):
        yield batch


class _SampleSpill:
    """Samples in arrival order, on disk; only their lengths stay in memory."""

    def __init__(self, directory: Path, dtype: np.dtype):
        self.dir = tempfile.TemporaryDirectory(dir=directory, prefix=".packer-build-")
        self.dtype = dtype
        self.ids_path = Path(self.dir.name) / "ids"
        self.mask_path = Path(self.dir.name) / "mask"
        self._ids = open(self.ids_path, "wb")  # noqa: SIM115 -- closed in close()
        self._mask = open(self.mask_path, "wb")  # noqa: SIM115
        self._lengths: list[np.ndarray] = []

    def add(self, chunk: Chunk) -> None:
        self._ids.write(chunk.ids.astype(self.dtype).tobytes())
        self._mask.write(chunk.mask.astype(np.uint8).tobytes())
        self._lengths.append(chunk.lengths)

    def seal(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self._ids.close()
        self._mask.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        self._lengths = []
        if lengths.sum() == 0:
            return lengths, np.zeros(0, self.dtype), np.zeros(0, np.uint8)
        return (lengths, np.memmap(self.ids_path, dtype=self.dtype, mode="r"),
                np.memmap(self.mask_path, dtype=np.uint8, mode="r"))

    def close(self) -> None:
        for f in (self._ids, self._mask):
            f.close()
        self.dir.cleanup()


@dataclass
class BuildResult:
    prefix: str
    counters: Counters
    num_packs: int
    lower_bound: int
    efficiency: float
    seconds: dict[str, float]
    manifest: dict[str, Any]


def build(config: BuildConfig, progress: bool = True) -> BuildResult:
    config.validate()
    inputs = check_inputs(config.inputs)
    t0 = time.perf_counter()
    main = RecordEncoder(config)  # also validates handler/tokenizer options before any work
    info = main.info
    dtype = np.dtype(token_dtype(info.vocab_size))
    prefix = Path(config.output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    counters = Counters()
    rejects_path = Path(f"{prefix}.rejects.jsonl")
    rejects_tmp = rejects_path.with_name(rejects_path.name + f".tmp-{os.getpid()}")
    spill = _SampleSpill(prefix.parent, dtype)
    seconds: dict[str, float] = {}
    try:
        known = [count_records(p) for p in inputs]
        total = sum(known) if all(k is not None for k in known) else None
        records = read_records(inputs)
        with open(rejects_tmp, "w", encoding="utf-8") as rejects_f, contextlib.ExitStack() as stack:
            if config.workers > 1:
                ctx = mp.get_context("spawn" if sys.platform == "darwin" else "fork")
                pool = stack.enter_context(ctx.Pool(config.workers, initializer=_init_worker, initargs=(config,)))
                chunks = pool.imap(_encode_in_worker, _batches(records, config.batch_size), chunksize=1)
            else:
                chunks = map(main.encode, _batches(records, config.batch_size))
            bar = stack.enter_context(
                tqdm(total=total, unit="rec", desc="tokenize", disable=not progress, dynamic_ncols=True)
            )
            for chunk in chunks:
                spill.add(chunk)
                counters.add(chunk.counters)
                for r in chunk.rejects:
                    rejects_f.write(json.dumps(r, ensure_ascii=False) + "\n")
                bar.update(chunk.counters.records)
                bar.set_postfix(tokens=counters.tokens, tok_s=f"{counters.tokens / max(bar.format_dict['elapsed'], 1e-9):,.0f}",
                                refresh=False)
        seconds["tokenize"] = time.perf_counter() - t0

        lengths, ids, mask = spill.seal()
        if lengths.size == 0:
            raise BuildError(
                f"no samples to write: {counters.records} records read, {counters.skipped} skipped, "
                f"{counters.dropped + counters.dropped_no_target} dropped"
            )
        t = time.perf_counter()
        plan = pack(lengths, config.seq_length, config.pack)
        seconds["pack"] = time.perf_counter() - t

        t = time.perf_counter()
        _write_packed(prefix, plan, lengths, ids, mask, dtype, progress)
        seconds["write"] = time.perf_counter() - t
        if counters.skipped:
            os.replace(rejects_tmp, rejects_path)
        else:
            rejects_path.unlink(missing_ok=True)  # a stale file from an earlier build would mislead
        seconds["total"] = time.perf_counter() - t0
        manifest = _manifest(config, info, counters, plan, lengths, main.overflow, dtype, prefix, seconds)
        write_json_atomic(manifest_path(prefix), manifest)
    finally:
        spill.close()
        rejects_tmp.unlink(missing_ok=True)
    return BuildResult(str(prefix), counters, plan.num_packs, manifest["packing"]["lower_bound"],
                       manifest["packing"]["efficiency"], seconds, manifest)


def _write_packed(prefix: Path, plan: PackPlan, lengths: np.ndarray, ids: np.ndarray, mask: np.ndarray,
                  dtype: np.dtype, progress: bool, packs_per_chunk: int = 4096) -> None:
    """Gather the spilled samples in pack order into the two indexed datasets, then commit all files."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    # A stale manifest must never describe the files about to replace it.
    manifest_path(prefix).unlink(missing_ok=True)
    with (IndexedDatasetWriter(prefix, dtype) as tok_w,
          IndexedDatasetWriter(loss_mask_prefix(prefix), np.uint8) as mask_w,
          tqdm(total=plan.num_packs, unit="pack", desc="write", disable=not progress, dynamic_ncols=True) as bar):
        for p0 in range(0, plan.num_packs, packs_per_chunk):
            p1 = min(p0 + packs_per_chunk, plan.num_packs)
            members = plan.order[plan.offsets[p0] : plan.offsets[p1]]
            seq_lens = lengths[members]
            # Token positions of every member, concatenated: start_j + 0..len_j-1.
            first = np.cumsum(seq_lens) - seq_lens
            gather = np.repeat(starts[members] - first, seq_lens) + np.arange(int(seq_lens.sum()))
            per_pack = np.diff(plan.offsets[p0 : p1 + 1])
            tok_w.add_sequences(ids[gather], seq_lens)
            tok_w.end_documents(per_pack)
            mask_w.add_sequences(mask[gather], seq_lens)
            mask_w.end_documents(per_pack)
            bar.update(p1 - p0)
        tok_w.finalize()
        mask_w.finalize()
        mask_w.commit()
        tok_w.commit()  # PREFIX.idx last of the data files; the manifest follows


def _manifest(config: BuildConfig, info: TokenizerInfo, c: Counters, plan: PackPlan, lengths: np.ndarray,
              overflow: str, dtype: np.dtype, prefix: Path, seconds: dict[str, float]) -> dict[str, Any]:
    pack_lens = plan.pack_lengths(lengths)
    cfg = asdict(config)
    cfg["inputs"] = [str(Path(p).resolve()) for p in config.inputs]
    cfg["overflow_effective"] = overflow
    files = {}
    for path in output_files(prefix):
        files[path.name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return {
        "format": FORMAT,
        "packer_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": cfg,
        "tokenizer": info.to_json(),
        "token_dtype": dtype.name,
        "counts": asdict(c) | {"packs": plan.num_packs},
        "packing": {
            "algorithm": config.pack,
            "seq_length": config.seq_length,
            "packs": plan.num_packs,
            "lower_bound": lower_bound(lengths, config.seq_length),
            "efficiency": efficiency(lengths, plan.num_packs, config.seq_length),
            "max_pack_tokens": int(pack_lens.max()),
            "min_pack_tokens": int(pack_lens.min()),
            "max_docs_per_pack": int(np.diff(plan.offsets).max()),
        },
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "files": files,
    }
