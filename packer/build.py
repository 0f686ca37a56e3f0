"""`packer build`: records -> segments -> samples -> packs -> indexed dataset.

    read_batches ─> handler ─> SampleEncoder ─> overflow ─> spill (arrival order, on disk)
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
import mmap
import multiprocessing as mp
import os
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from packer import __version__
from packer.indexed import IndexedDatasetWriter, token_dtype
from packer.manifest import (
    FORMAT,
    file_entries,
    loss_mask_prefix,
    manifest_path,
    write_json_atomic,
)
from packer.packing import ALGORITHMS, PackPlan, pack
from packer.records import Sample
from packer.sources import BadRecord, LineBlock, RawRecord, check_inputs, count_records, read_batches
from packer.streaming import ArrowBatch
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
    streaming: bool = False
    hf_dataset: str | None = None
    hf_config: str | None = None
    split: str = "train"
    hf_datasets_params: str | None = None  # JSON file of load_dataset keyword arguments
    pack_window: tuple[int, bool] = (16384, False)  # (size, by_tokens): the streaming packer's window
    num_shards: int = 1
    shard_index: int = 0

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
        if self.batch_size < 1:
            raise BuildError(f"--batch-size must be >= 1, got {self.batch_size}")
        window, by_tokens = self.pack_window
        if self.streaming and window < 2:
            raise BuildError(f"--pack-window must hold at least 2 samples, got {window}")
        if self.streaming and by_tokens and window < 2 * self.seq_length:
            raise BuildError(f"a --pack-window of {window} tokens must hold at least two packs "
                             f"({2 * self.seq_length} tokens at --seq-length {self.seq_length})")
        if not 0 <= self.shard_index < self.num_shards:
            raise BuildError(f"--shard-index {self.shard_index} must be in [0, --num-shards {self.num_shards})")
        if self.hf_dataset and not self.streaming:
            raise BuildError("--hf-dataset reads through `datasets` streaming; add --streaming")
        if self.hf_dataset and self.inputs:
            raise BuildError("pass either --input files or --hf-dataset, not both")
        if not self.hf_dataset and not self.inputs:
            raise BuildError("no input: pass --input PATH (repeatable) or --streaming --hf-dataset NAME")
        if self.streaming and self.pack != "bfd":
            raise BuildError(f"--streaming packs with a window best-fit; --pack {self.pack} needs the global packer "
                             "(drop --streaming)")


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
    interior_eod: int = 0  # EOD ids inside samples: the record text spelled the EOD token

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

    @staticmethod
    def join(parts: list[Chunk]) -> Chunk:
        c = Counters()
        for part in parts:
            c.add(part.counters)
        return Chunk(np.concatenate([p.ids for p in parts]), np.concatenate([p.mask for p in parts]),
                     np.concatenate([p.lengths for p in parts]), [r for p in parts for r in p.rejects], c)


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
        self.dtype = np.dtype(token_dtype(self.info.vocab_size))
        self.encoder = SampleEncoder(self.tokenizer, self.info, train_on_prompt=config.train_on_prompt)

    def encode(self, batch: list[RawRecord] | ArrowBatch | LineBlock) -> Chunk:
        """A batch of raw records -> one Chunk, tokenized --batch-size records per encode_batch call."""
        records = batch if isinstance(batch, list) else batch.records()
        size = self.config.batch_size
        if len(records) <= size:
            return self._encode(records)
        return Chunk.join([self._encode(records[i : i + size]) for i in range(0, len(records), size)])

    def _encode(self, records: list[RawRecord]) -> Chunk:
        from handlers import RecordError

        c = Counters(records=len(records))
        rejects: list[dict] = []

        def reject(rec: RawRecord, data: Any, e: RecordError) -> None:
            message = f"{rec.where()}: field {e.field!r}: {e.message}"
            if self.config.on_error == "fail":
                raise BuildError(message + " (or pass --on-error skip to skip and count such records)") from e
            c.skipped += 1
            raw = data.raw if isinstance(data, BadRecord) else data
            rejects.append({"source": rec.source, "record": rec.number, "line": rec.line, "field": e.field,
                            "error": e.message, "data": raw})

        segments, kept, kept_data = [], [], []
        for rec in records:
            data = rec.parsed()
            try:
                if isinstance(data, BadRecord):
                    raise RecordError("<line>", data.message)
                if not isinstance(data, dict):
                    raise RecordError("<record>", f"expected a JSON object, got {type(data).__name__}")
                segments.append(self.handler(data))
                kept.append(rec)
                kept_data.append(data)
            except RecordError as e:
                reject(rec, data, e)
        try:
            ids, mask, lengths = self.encoder.encode_flat(segments)
        except MemoryError:
            raise
        except Exception:  # tokenizers refuses the whole batch for one text it cannot take; find which
            bad = [j for j, segs in enumerate(segments) if not all(_utf8_encodable(s.text) for s in segs)]
            if not bad:
                raise
            for j in bad:
                reject(kept[j], kept_data[j], RecordError(
                    "<text>", "a lone UTF-16 surrogate (e.g. a \\ud800 escape without its pair), which no "
                    "tokenizer can encode; fix or remove the record"))
            rejects.sort(key=lambda r: r["record"])  # the file lists a batch's rejects in record order
            keep = sorted(set(range(len(segments))) - set(bad))
            segments, kept = [segments[j] for j in keep], [kept[j] for j in keep]
            ids, mask, lengths = self.encoder.encode_flat(segments)
        if lengths.size and lengths.max() > self.config.seq_length:  # rare: apply --overflow per sample
            out: list[Sample] = []
            ends = np.cumsum(lengths)
            for rec, n, e in zip(kept, lengths.tolist(), ends.tolist(), strict=True):
                out.extend(self._fit(rec, Sample(ids[e - n : e], mask[e - n : e]), c))
            lengths = np.fromiter((s.ids.size for s in out), dtype=np.int64, count=len(out))
            ids = np.concatenate([s.ids for s in out]) if out else np.zeros(0, np.int64)
            mask = np.concatenate([s.loss_mask for s in out]) if out else np.zeros(0, np.uint8)
        c.samples, c.tokens, c.target_tokens = len(lengths), int(lengths.sum()), int(mask.sum())
        if lengths.size:
            is_eod = ids == self.info.eod_id
            c.interior_eod = int(is_eod.sum()) - int(is_eod[np.cumsum(lengths) - 1].sum())
        # In the output's dtype already: a quarter of the bytes to send back for a < 65536 vocabulary.
        return Chunk(ids.astype(self.dtype), mask, lengths, rejects, c)

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


def _utf8_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# -- worker pool: each process builds its own RecordEncoder in the initializer ----------------------
_worker_encoder: RecordEncoder | None = None


def _init_worker(config: BuildConfig) -> None:
    global _worker_encoder
    # The pool is the parallelism: rayon threads inside each worker's encode_batch would only oversubscribe
    # the cores (measured: ~10% slower with 2 workers on 2 cores).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_encoder = RecordEncoder(config)


def _encode_in_worker(records: list[RawRecord] | ArrowBatch | LineBlock) -> Chunk:
    if _worker_encoder is None:
        raise RuntimeError("worker used before _init_worker ran")
    return _worker_encoder.encode(records)


def _ordered_map(pool, fn, items: Iterable, max_in_flight: int) -> Iterator:
    """pool.imap with back-pressure: imap reads its whole input ahead, so memory would grow with the input."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= max_in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


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

    def seal(self) -> np.ndarray:
        """Close the files; returns every sample's length, in arrival order."""
        self._ids.close()
        self._mask.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        self._lengths = []
        return lengths

    @contextlib.contextmanager
    def maps(self) -> Iterator[_SpillMaps]:
        """Read-only maps of (ids, mask), for the gather; `drop()` gives their resident pages back."""
        maps: list[mmap.mmap] = []
        view = _SpillMaps(np.zeros(0, self.dtype), np.zeros(0, np.uint8), maps)
        try:
            for name, path, dtype in (("ids", self.ids_path, self.dtype), ("mask", self.mask_path, np.uint8)):
                if path.stat().st_size:
                    with open(path, "rb") as f:
                        maps.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
                    setattr(view, name, np.frombuffer(maps[-1], dtype=dtype))
            yield view
        finally:
            view.ids = view.mask = None  # the maps can close only once no array views them
            for m in maps:
                with contextlib.suppress(BufferError):  # a caller kept a view: the map closes with it instead
                    m.close()

    def close(self) -> None:
        for f in (self._ids, self._mask):
            f.close()
        self.dir.cleanup()

    def __enter__(self) -> _SampleSpill:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


RESIDENT_SPILL = 32 << 20  # bytes of the spill that may stay mapped while gathering (see _SpillMaps.drop)


@dataclass
class _SpillMaps:
    ids: np.ndarray
    mask: np.ndarray
    maps: list[mmap.mmap]

    def drop(self) -> None:
        """Unmap the pages read so far (they stay in the page cache). Every fault on a file map also maps the
        cached pages around it (the kernel's fault-around, 64 KiB; MADV_RANDOM does not stop it), so a gather
        of scattered samples would otherwise leave the whole spill resident, growing with the corpus. A spill
        within RESIDENT_SPILL is left mapped: re-faulting its pages would only cost time (~1 us per sample)."""
        if sum(len(m) for m in self.maps) <= RESIDENT_SPILL or not hasattr(mmap, "MADV_DONTNEED"):
            return
        for m in self.maps:
            m.madvise(mmap.MADV_DONTNEED)


@dataclass
class BuildResult:
    prefix: str
    counters: Counters
    num_packs: int
    lower_bound: int
    efficiency: float
    seconds: dict[str, float]
    manifest: dict[str, Any]


@dataclass
class PackStats:
    """Running figures over written packs (the streaming path never holds all packs)."""

    packs: int = 0
    tokens: int = 0
    min_tokens: int = 0
    max_tokens: int = 0
    max_samples: int = 0

    def add(self, seq_lens: np.ndarray, samples_per_pack: np.ndarray) -> None:
        """Packs just written: the lengths of their samples, in order, and how many samples each pack holds."""
        if samples_per_pack.size == 0:
            return
        csum = np.concatenate([[0], np.cumsum(seq_lens)])
        bounds = np.concatenate([[0], np.cumsum(samples_per_pack)])
        pack_tokens = csum[bounds[1:]] - csum[bounds[:-1]]
        lo, hi = int(pack_tokens.min()), int(pack_tokens.max())
        self.min_tokens = lo if self.packs == 0 else min(self.min_tokens, lo)
        self.max_tokens = max(self.max_tokens, hi)
        self.max_samples = max(self.max_samples, int(samples_per_pack.max()))
        self.packs += int(pack_tokens.size)
        self.tokens += int(pack_tokens.sum())


def output_prefix_for_shard(prefix: str, num_shards: int, shard_index: int) -> str:
    return prefix if num_shards == 1 else f"{prefix}_shard{shard_index:05d}_of_{num_shards:05d}"


def build(config: BuildConfig, progress: bool = True) -> BuildResult:
    config.validate()
    t0 = time.perf_counter()
    main = RecordEncoder(config)  # validates handler/tokenizer options before any work
    dtype = np.dtype(token_dtype(main.info.vocab_size))
    prefix = Path(output_prefix_for_shard(config.output_prefix, config.num_shards, config.shard_index))
    prefix.parent.mkdir(parents=True, exist_ok=True)
    if config.streaming:
        from packer.streaming import open_stream

        batches, total = open_stream(config)  # already this shard's, in Arrow batches
    else:
        inputs = check_inputs(config.inputs)
        known = [count_records(p) for p in inputs]
        total = sum(known) if all(k is not None for k in known) else None
        if total is not None and config.num_shards > 1:
            total = len(range(config.shard_index, total, config.num_shards))
        batches = read_batches(inputs, config.batch_size, config.num_shards, config.shard_index)

    counters = Counters()
    stats = PackStats()
    seconds: dict[str, float] = {}
    rejects_path = Path(f"{prefix}.rejects.jsonl")
    rejects_tmp = rejects_path.with_name(rejects_path.name + f".tmp-{os.getpid()}")
    with contextlib.ExitStack() as stack:
        stack.callback(rejects_tmp.unlink, missing_ok=True)
        rejects_f = stack.enter_context(open(rejects_tmp, "w", encoding="utf-8"))
        if config.workers > 1:
            ctx = mp.get_context("spawn" if sys.platform == "darwin" else "fork")
            pool = stack.enter_context(ctx.Pool(config.workers, initializer=_init_worker, initargs=(config,)))
            chunks = _ordered_map(pool, _encode_in_worker, batches, 2 * config.workers)
        else:
            chunks = map(main.encode, batches)
        bar = stack.enter_context(tqdm(total=total, unit="rec", desc="tokenize", disable=not progress,
                                       dynamic_ncols=True, smoothing=0.1))

        def encoded():
            for chunk in chunks:
                counters.add(chunk.counters)
                for r in chunk.rejects:
                    line = json.dumps(r, ensure_ascii=False)
                    if not _utf8_encodable(line):  # a lone surrogate: keep it as its JSON escape
                        line = json.dumps(r)
                    rejects_f.write(line + "\n")
                bar.update(chunk.counters.records)
                rate = counters.tokens / max(bar.format_dict["elapsed"], 1e-9)
                bar.set_postfix_str(f"{counters.tokens:,} tok, {rate:,.0f} tok/s", refresh=False)
                yield chunk

        tok_w = stack.enter_context(IndexedDatasetWriter(prefix, dtype))
        mask_w = stack.enter_context(IndexedDatasetWriter(loss_mask_prefix(prefix), np.uint8))
        if config.streaming:
            _write_streaming(config, encoded(), tok_w, mask_w, stats)
            seconds["tokenize"] = time.perf_counter() - t0  # packing and writing interleaved
        else:
            spill = stack.enter_context(_SampleSpill(prefix.parent, dtype))
            for chunk in encoded():
                spill.add(chunk)
            bar.close()
            seconds["tokenize"] = time.perf_counter() - t0
            lengths = spill.seal()
            t = time.perf_counter()
            plan = pack(lengths, config.seq_length, config.pack)
            seconds["pack"] = time.perf_counter() - t
            t = time.perf_counter()
            _write_global(plan, lengths, spill, tok_w, mask_w, stats, progress)
            seconds["write"] = time.perf_counter() - t
        if stats.packs == 0:
            hint = ""
            if counters.skipped:
                rejects_f.close()
                os.replace(rejects_tmp, rejects_path)
                hint = f"; the skipped records and why are in {rejects_path}"
            raise BuildError(
                f"no samples to write: {counters.records} records read, {counters.skipped} skipped, "
                f"{counters.dropped + counters.dropped_no_target} dropped{hint}"
            )
        tok_w.finalize()
        mask_w.finalize()
        # The manifest (with every checksum) is complete before anything is renamed, so the window in which
        # the new files are in place without their manifest is a few renames long.
        seconds["total"] = time.perf_counter() - t0
        manifest = _manifest(config, main.info, counters, stats, main.overflow, dtype, prefix, seconds,
                             tok_w.pending() | mask_w.pending())
        # Up to here an earlier build at PREFIX is untouched. Its manifest goes first, so that its files
        # and ours can never be mistaken for a complete build while they are being replaced.
        manifest_path(prefix).unlink(missing_ok=True)
        mask_w.commit()
        tok_w.commit()  # PREFIX.idx last of the data files; the manifest follows
        write_json_atomic(manifest_path(prefix), manifest)
        rejects_f.close()
        if counters.skipped:
            os.replace(rejects_tmp, rejects_path)
        else:
            rejects_path.unlink(missing_ok=True)  # a stale file from an earlier build would mislead
    return BuildResult(str(prefix), counters, stats.packs, manifest["packing"]["lower_bound"],
                       manifest["packing"]["efficiency"], seconds, manifest)


def _token_positions(starts: np.ndarray, lengths: np.ndarray, extent: int) -> np.ndarray:
    """Positions of the tokens of samples at `starts` with `lengths`, concatenated: start_j + 0..len_j-1.
    int32 when every position is below 2**31 (`extent`): these are the writers' largest transient arrays."""
    dtype = np.int32 if extent < 2**31 else np.int64
    where = np.repeat((starts - (np.cumsum(lengths) - lengths)).astype(dtype), lengths)
    where += np.arange(where.size, dtype=dtype)
    return where


def _write_global(plan: PackPlan, lengths: np.ndarray, spill: _SampleSpill, tok_w: IndexedDatasetWriter,
                  mask_w: IndexedDatasetWriter, stats: PackStats, progress: bool, chunk_tokens: int = 1 << 18,
                  chunk_samples: int = 256) -> None:
    """Gather the spilled samples in pack order into the two indexed datasets, a group of whole packs at a time
    (at most chunk_tokens tokens and chunk_samples samples, unless one pack alone is more). The map's pages
    are dropped after each group, so the resident spill stays within max(RESIDENT_SPILL, ~2 x chunk_samples x
    64 KiB) = 32 MiB, whatever the corpus."""
    starts = np.cumsum(lengths) - lengths
    ends = np.cumsum(plan.pack_lengths(lengths))  # tokens up to the end of each pack
    groups = [0]
    while groups[-1] < plan.num_packs:
        p0 = groups[-1]
        by_tokens = int(np.searchsorted(ends, (ends[p0 - 1] if p0 else 0) + chunk_tokens, side="right"))
        by_samples = int(np.searchsorted(plan.offsets, plan.offsets[p0] + chunk_samples, side="right")) - 1
        groups.append(max(p0 + 1, min(by_tokens, by_samples, plan.num_packs)))
    with (tqdm(total=plan.num_packs, unit="pack", desc="write", disable=not progress, dynamic_ncols=True) as bar,
          spill.maps() as spilled):
        for p0, p1 in zip(groups[:-1], groups[1:], strict=False):
            members = plan.order[plan.offsets[p0] : plan.offsets[p1]]
            seq_lens = lengths[members]
            gather = _token_positions(starts[members], seq_lens, int(starts[-1] + lengths[-1]))
            per_pack = np.diff(plan.offsets[p0 : p1 + 1])
            tok_w.add_sequences(spilled.ids[gather], seq_lens)
            tok_w.end_documents(per_pack)
            mask_w.add_sequences(spilled.mask[gather], seq_lens)
            mask_w.end_documents(per_pack)
            spilled.drop()
            stats.add(seq_lens, per_pack)
            bar.update(p1 - p0)


def _write_streaming(config: BuildConfig, chunks: Iterable[Chunk], tok_w: IndexedDatasetWriter,
                     mask_w: IndexedDatasetWriter, stats: PackStats) -> None:
    """Online packing: samples wait in a bounded window and are written as soon as their pack is final.

    The waiting samples' tokens live in arrays: chunks are appended as they arrive, and each time packs are
    written the samples still waiting are compacted into one fresh buffer, so memory follows the window (a
    sample that waits many rounds does not keep its whole chunk alive) at about one copy per token.
    """
    from packer.window import WindowPacker

    window, by_tokens = config.pack_window
    packer = WindowPacker(config.seq_length, window, by_tokens=by_tokens)
    parts_ids: list[np.ndarray] = []  # the waiting tokens: the compacted buffer, then the chunks since
    parts_mask: list[np.ndarray] = []
    keys = np.zeros(0, np.int64)  # waiting samples: arrival number (ascending), start in the parts, length
    starts = np.zeros(0, np.int64)
    lens = np.zeros(0, np.int64)
    held = 0  # tokens in the parts
    next_key = 0

    def write(packs) -> None:
        nonlocal parts_ids, parts_mask, keys, starts, lens, held
        if not len(packs):
            return
        ids = parts_ids[0] if len(parts_ids) == 1 else np.concatenate(parts_ids)
        mask = parts_mask[0] if len(parts_mask) == 1 else np.concatenate(parts_mask)
        at = np.searchsorted(keys, packs.members)  # keys are ascending
        seq_lens = lens[at]
        where = _token_positions(starts[at], seq_lens, held)
        tok_w.add_sequences(ids[where], seq_lens)
        mask_w.add_sequences(mask[where], seq_lens)
        tok_w.end_documents(packs.sizes)
        mask_w.end_documents(packs.sizes)
        stats.add(seq_lens, packs.sizes)
        del where
        waiting = np.ones(keys.size, dtype=bool)
        waiting[at] = False
        # The buffer is the waiting samples' tokens back to back, in key order: keep the rest, in place order.
        keep = np.repeat(waiting, lens)
        parts_ids, parts_mask = [ids[keep]], [mask[keep]]
        del ids, mask, keep
        keys, lens = keys[waiting], lens[waiting]
        starts = np.cumsum(lens) - lens
        held = int(lens.sum())

    for chunk in chunks:
        n = chunk.lengths.size
        if not n:
            continue
        parts_ids.append(chunk.ids.astype(tok_w.dtype, copy=False))
        parts_mask.append(chunk.mask)
        new_keys = np.arange(next_key, next_key + n, dtype=np.int64)
        keys = np.concatenate([keys, new_keys])
        starts = np.concatenate([starts, held + np.cumsum(chunk.lengths) - chunk.lengths])
        lens = np.concatenate([lens, chunk.lengths])
        held += int(chunk.lengths.sum())
        next_key += n
        write(packer.extend(new_keys, chunk.lengths))
    write(packer.flush())


def _manifest(config: BuildConfig, info: TokenizerInfo, c: Counters, stats: PackStats, overflow: str,
              dtype: np.dtype, prefix: Path, seconds: dict[str, float], files: dict[str, Path]) -> dict[str, Any]:
    cfg = asdict(config)
    cfg["inputs"] = [str(Path(p).resolve()) if Path(p).exists() else p for p in config.inputs]
    cfg["overflow_effective"] = overflow
    cfg["output_prefix"] = str(prefix)
    return {
        "format": FORMAT,
        "packer_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": cfg,
        "tokenizer": info.to_json(),
        "token_dtype": dtype.name,
        "counts": asdict(c) | {"packs": stats.packs},
        "packing": {
            "algorithm": f"window-bfd({config.pack_window[0]}{' tokens' if config.pack_window[1] else ''})"
            if config.streaming else config.pack,
            "seq_length": config.seq_length,
            "packs": stats.packs,
            "lower_bound": -(-stats.tokens // config.seq_length),
            "efficiency": efficiency_of(stats.tokens, stats.packs, config.seq_length),
            "max_pack_tokens": stats.max_tokens,
            "min_pack_tokens": stats.min_tokens,
            "max_docs_per_pack": stats.max_samples,
        },
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "files": file_entries(files),
    }


def efficiency_of(tokens: int, packs: int, seq_length: int) -> float:
    return tokens / (packs * seq_length) if packs else 0.0
