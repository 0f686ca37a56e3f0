"""Megatron `MMIDIDX` indexed dataset: byte-exact writer and reader.

A dataset is two files. `PREFIX.bin` holds the token ids of every sequence back to back, nothing else.
`PREFIX.idx` (all integers little-endian):

    offset  size       field
    0       9          magic  b"MMIDIDX\\x00\\x00"
    9       8   <Q     version = 1
    17      1   <B     dtype code of .bin (DTYPE_CODES: 1 uint8, 4 int32, 8 uint16, ...)
    18      8   <Q     S = sequence count
    26      8   <Q     D = document_indices count (= documents + 1)
    34      4*S int32  sequence_lengths   tokens per sequence
    ...     8*S int64  sequence_pointers  byte offset of each sequence in .bin
    ...     8*D int64  document_indices   [0, end_0, end_1, ...]: document d is sequences
                                          document_indices[d] .. document_indices[d+1]-1

This is exactly what `megatron.core.datasets.indexed_dataset.IndexedDataset(PREFIX)` reads (its reader
hard-codes the 34-byte header). In packer a *sequence* is one sample (ending with EOD) and a *document* is
one pack; see docs/format.md.

The writer is a builder (`add_sequence`, `end_document`, `finalize`, `commit`) and a context manager: it
streams into temporary files next to the target and renames them into place only in `commit()`, so a failed
or interrupted run never leaves a `PREFIX.idx` that looks valid. Sequence lengths and document indices are
spilled to temporary files as they grow, so memory stays bounded whatever the corpus size.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

from packer.manifest import DatasetError, MissingFileError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document_indices count
assert HEADER.size == 34

DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}

_CHUNK = 1 << 20  # items buffered in memory before spilling / per streamed copy


def token_dtype(vocab_size: int) -> type[np.number]:
    """Megatron's rule (DType.optimal_dtype): uint16 when the vocabulary has fewer than 65500 ids."""
    return np.uint16 if vocab_size < 65500 else np.int32


def data_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.bin")


def index_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.idx")


class _Spill:
    """An append-only int array kept in a temp file, for index columns of unbounded length."""

    def __init__(self, dtype: type[np.number], directory: Path):
        self.dtype = np.dtype(dtype)
        self._file = tempfile.TemporaryFile(dir=directory, prefix=".packer-spill-")  # noqa: SIM115
        self._buf = np.empty(_CHUNK, dtype=self.dtype)
        self._n = 0  # items in _buf
        self.count = 0  # items in total

    def append(self, value: int) -> None:
        self._buf[self._n] = value
        self._n += 1
        self.count += 1
        if self._n == _CHUNK:
            self._flush()

    def extend(self, values: np.ndarray) -> None:
        self._flush()
        values = np.ascontiguousarray(values, dtype=self.dtype)
        self._file.write(values.tobytes())
        self.count += values.size

    def _flush(self) -> None:
        if self._n:
            self._file.write(self._buf[: self._n].tobytes())
            self._n = 0

    def chunks(self):
        """Yield the whole column in order, _CHUNK items at a time."""
        self._flush()
        self._file.seek(0)
        while True:
            raw = self._file.read(_CHUNK * self.dtype.itemsize)
            if not raw:
                return
            yield np.frombuffer(raw, dtype=self.dtype)

    def close(self) -> None:
        self._file.close()


class IndexedDatasetWriter:
    """Streaming builder of one `.bin/.idx` pair.

        with IndexedDatasetWriter(prefix, np.uint16) as w:
            for pack in packs:
                for sample in pack:
                    w.add_sequence(sample_ids)
                w.end_document()
            w.finalize()   # .idx written, still under temporary names
            w.commit()     # renamed into place: .bin first, .idx last
    """

    def __init__(self, prefix: str | os.PathLike, dtype: type[np.number], min_value: int = 0):
        """`min_value`: the smallest value accepted (token ids are >= 0; labels with -100 need a signed dtype)."""
        self.prefix = os.fspath(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(f"dtype {self.dtype} has no MMIDIDX code; use one of {sorted(map(str, CODE_OF_DTYPE))}")
        self.bin_path, self.idx_path = data_path(prefix), index_path(prefix)
        directory = self.bin_path.parent
        directory.mkdir(parents=True, exist_ok=True)
        # A leading dot: readers that glob for their files (MindSpeed's PREFIX_packed_*_document*) skip it.
        tag = f".tmp-{os.getpid()}-{os.urandom(4).hex()}"
        self.tmp_bin = self.bin_path.with_name("." + self.bin_path.name + tag)
        self.tmp_idx = self.idx_path.with_name("." + self.idx_path.name + tag)
        from packer.output import create_exclusive  # (output imports this module)

        self._bin = create_exclusive(self.tmp_bin)  # closed in finalize/abort; never through a planted link
        # The manifest's checksums, of every byte as it is written (reading 100 MB back cost ~0.1 s a build).
        self._bin_sha256 = hashlib.sha256()
        self._idx_sha256 = hashlib.sha256()
        self._lengths = _Spill(np.int32, directory)
        self._doc_ends = _Spill(np.int64, directory)
        self._doc_ends.append(0)
        self._doc_ends_last = 0
        self._max_id = np.iinfo(self.dtype).max if self.dtype.kind in "iu" else None
        self._min_id = max(min_value, np.iinfo(self.dtype).min) if self.dtype.kind in "iu" else None
        self.tokens = 0
        self._finalized = False
        self._committed = False

    # -- building ---------------------------------------------------------------------------------
    def add_sequence(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"a sequence must be 1-D, got shape {ids.shape}")
        if ids.size and self._max_id is not None and (ids.max() > self._max_id or ids.min() < self._min_id):
            raise ValueError(f"token id out of range for {self.dtype}: [{ids.min()}, {ids.max()}]")
        self._write_bin(ids)
        self._lengths.append(ids.size)
        self.tokens += ids.size

    def add_sequences(self, flat_ids: np.ndarray, lengths: np.ndarray) -> None:
        """Append many sequences at once: `flat_ids` is their concatenation, `lengths` their sizes."""
        lengths = np.asarray(lengths, dtype=np.int64)
        flat_ids = np.asarray(flat_ids)
        if lengths.sum() != len(flat_ids):
            raise ValueError(f"lengths sum to {lengths.sum()} but {len(flat_ids)} ids were given")
        if lengths.size and lengths.min() < 0:
            raise ValueError(f"sequence lengths must be >= 0, got {lengths.min()}")
        if (
            flat_ids.size
            and self._max_id is not None
            and not self._holds(flat_ids.dtype)
            and (flat_ids.max() > self._max_id or flat_ids.min() < self._min_id)
        ):
            raise ValueError(f"token id out of range for {self.dtype}: [{flat_ids.min()}, {flat_ids.max()}]")
        self._write_bin(flat_ids)
        self._lengths.extend(lengths.astype(np.int32))
        self.tokens += int(lengths.sum())

    def _holds(self, dtype: np.dtype) -> bool:
        """Every value of `dtype` is in range here (uint16 ids into a uint16 dataset): no min/max pass needed."""
        if dtype.kind not in "iu":
            return False
        info = np.iinfo(dtype)
        return info.min >= self._min_id and info.max <= self._max_id

    def _write_bin(self, ids: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(ids, dtype=self.dtype)).cast("B")
        self._bin.write(data)
        self._bin_sha256.update(data)

    def end_document(self) -> None:
        self._doc_ends.append(self._lengths.count)
        self._doc_ends_last = self._lengths.count

    def end_documents(self, sequence_counts: np.ndarray) -> None:
        """End several documents at once: the sequences added since the last document end form documents of
        these many sequences (the counts must sum to exactly that number)."""
        counts = np.asarray(sequence_counts, dtype=np.int64)
        if counts.size and counts.min() < 0:
            raise ValueError(f"end_documents() counts must be >= 0, got {counts.min()}")
        first = self._lengths.count - int(counts.sum())
        if first != int(self._doc_ends_last):
            raise ValueError(
                f"end_documents() counts sum to {int(counts.sum())} but "
                f"{self._lengths.count - int(self._doc_ends_last)} sequences were added since the last document"
            )
        self._doc_ends.extend(first + np.cumsum(counts))
        self._doc_ends_last = self._lengths.count

    @property
    def sequence_count(self) -> int:
        return self._lengths.count

    @property
    def document_count(self) -> int:
        return self._doc_ends.count - 1

    # -- finishing --------------------------------------------------------------------------------
    def finalize(self) -> None:
        """Close .bin and write .idx, both still under temporary names."""
        if self._finalized:
            return
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        itemsize = self.dtype.itemsize
        from packer.output import create_exclusive

        with create_exclusive(self.tmp_idx) as f:

            def write(data: bytes) -> None:
                f.write(data)
                self._idx_sha256.update(data)

            write(HEADER.pack(MAGIC, VERSION, CODE_OF_DTYPE[self.dtype], self._lengths.count, self._doc_ends.count))
            for chunk in self._lengths.chunks():
                write(chunk.tobytes())
            pointer = 0
            for chunk in self._lengths.chunks():
                ends = np.cumsum(chunk, dtype=np.int64) * itemsize + pointer
                starts = ends - chunk.astype(np.int64) * itemsize
                write(starts.tobytes())
                pointer = int(ends[-1])
            for chunk in self._doc_ends.chunks():
                write(chunk.tobytes())
            f.flush()
            os.fsync(f.fileno())
        self._lengths.close()
        self._doc_ends.close()
        self._finalized = True

    def pending(self) -> dict[str, Path]:
        """Final file name -> the finalized temporary file holding its bytes (for checksums before commit)."""
        return {self.bin_path.name: self.tmp_bin, self.idx_path.name: self.tmp_idx}

    def sha256(self) -> dict[Path, str]:
        """The finalized temporary files -> the sha256 of the bytes written to them."""
        if not self._finalized:
            raise RuntimeError("finalize() must be called before sha256()")
        return {self.tmp_bin: self._bin_sha256.hexdigest(), self.tmp_idx: self._idx_sha256.hexdigest()}

    def commit(self) -> None:
        """Rename into place: .bin first, .idx last, so a visible .idx always has its .bin."""
        if not self._finalized:
            raise RuntimeError("finalize() must be called before commit()")
        os.replace(self.tmp_bin, self.bin_path)
        os.replace(self.tmp_idx, self.idx_path)
        self._committed = True

    def abort(self) -> None:
        if not self._bin.closed:
            self._bin.close()
        if not self._finalized:
            self._lengths.close()
            self._doc_ends.close()
        for p in (self.tmp_bin, self.tmp_idx):
            p.unlink(missing_ok=True)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed:
            self.abort()


class IndexedDataset:
    """Memory-mapped reader of a `.bin/.idx` pair (the same layout Megatron reads).

    Opening checks the whole index against itself and the size of `.bin`, in O(index) time and without reading
    `.bin`: header (magic, version, dtype code), the file size the header's counts imply, lengths >= 0, pointers
    = exclusive cumulative lengths x itemsize, `.bin` size = all sequences' bytes, document_indices rising from
    0 to the sequence count. Any failure raises `DatasetError` naming the file and the check; `build` is the
    prefix the error's fix names (`packer verify BUILD`), this dataset's own prefix by default.
    """

    def __init__(self, prefix: str | os.PathLike, build: str | os.PathLike | None = None):
        self.prefix = os.fspath(prefix)
        self.build = self.prefix if build is None else os.fspath(build)
        self.bin_path, self.idx_path = data_path(prefix), index_path(prefix)
        for p in (self.idx_path, self.bin_path):
            if not p.is_file():
                raise MissingFileError(f"{p} does not exist; is {self.prefix!r} the prefix given to `packer build`?",
                                       self.build)
        try:
            self._open()
        except OSError as e:  # unreadable, or not mappable
            raise DatasetError(f"{self.prefix}.idx/.bin: cannot be read ({type(e).__name__}: {e})", self.build) from e

    def _fail(self, check: str, detail: str) -> DatasetError:
        return DatasetError(f"{self.idx_path}: {check}: {detail}", self.build)

    def _open(self) -> None:
        idx_bytes = self.idx_path.stat().st_size
        if idx_bytes < HEADER.size:  # checked before mmap, which fails obscurely on an empty file
            raise self._fail("header", f"{idx_bytes} bytes is too short for an MMIDIDX header")
        idx = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        magic, version, code, n_seq, n_doc_idx = HEADER.unpack(idx[: HEADER.size].tobytes())
        if magic != MAGIC:
            raise self._fail("header", f"bad magic {magic!r}, expected {MAGIC!r} (not a Megatron MMIDIDX index)")
        if version != VERSION:
            raise self._fail("header", f"unsupported version {version}, expected {VERSION}")
        if code not in DTYPE_CODES:
            raise self._fail("header", f"unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = HEADER.size + 4 * n_seq + 8 * n_seq + 8 * n_doc_idx
        if idx.size != expected:
            raise self._fail("file size", f"{idx.size} bytes but the header ({n_seq} sequences, {n_doc_idx} "
                             f"document indices) implies {expected}; the file is truncated or corrupt")
        off = HEADER.size
        self.sequence_lengths = np.frombuffer(idx, dtype=np.int32, count=n_seq, offset=off)
        off += 4 * n_seq
        self.sequence_pointers = np.frombuffer(idx, dtype=np.int64, count=n_seq, offset=off)
        off += 8 * n_seq
        self.document_indices = np.frombuffer(idx, dtype=np.int64, count=n_doc_idx, offset=off)
        self._idx = idx
        total = self._check_index()
        size = self.bin_path.stat().st_size
        if size != total:
            raise DatasetError(f"{self.bin_path}: file size: {size} bytes but {self.idx_path} indexes {total} "
                               f"({int(self.sequence_lengths.astype(np.int64).sum())} x {self.dtype} tokens); "
                               "one of the two is truncated, corrupt or from another build", self.build)
        self._bin = np.memmap(self.bin_path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)

    def _check_index(self) -> int:
        """The index's own invariants; returns the bytes of `.bin` it covers. Pointers are compared chunk by
        chunk, so the check needs O(chunk) memory beyond the map."""
        lens, ptrs, docs = self.sequence_lengths, self.sequence_pointers, self.document_indices
        if lens.size and lens.min() < 0:
            bad = int(np.flatnonzero(lens < 0)[0])
            raise self._fail("sequence lengths", f"sequence {bad} has length {lens[bad]}")
        itemsize = self.dtype.itemsize
        end = 0
        for a in range(0, lens.size, _CHUNK):
            n = lens[a : a + _CHUNK].astype(np.int64) * itemsize
            ends = np.cumsum(n) + end
            wrong = np.flatnonzero(ptrs[a : a + _CHUNK] != ends - n)
            if wrong.size:
                i = int(wrong[0])
                raise self._fail("sequence pointers", f"pointer {a + i} is {ptrs[a + i]}, but the lengths before "
                                 f"it put sequence {a + i} at byte {ends[i] - n[i]}")
            end = int(ends[-1])
        if docs.size == 0:
            raise self._fail("document indices", "none (at least the leading 0 is required)")
        falls = np.flatnonzero(docs[1:] < docs[:-1])
        if docs[0] != 0 or docs[-1] != lens.size or falls.size:
            where = (f"entry {int(falls[0]) + 1} falls from {docs[falls[0]]} to {docs[falls[0] + 1]}" if falls.size
                     else f"they run from {docs[0]} to {docs[-1]}")
            raise self._fail("document indices", f"must rise from 0 to the sequence count {lens.size}, but {where}")
        return end

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def release(self) -> None:
        """Give back the resident pages of `.bin` read so far (they stay in the page cache). A file map keeps every
        page it touched counted in the process's RSS, so a pass over a large build would otherwise grow with it;
        callers that stream (verify, export) call this after each block. Arrays read before stay valid."""
        m = getattr(self._bin, "_mmap", None)
        if m is not None and hasattr(mmap, "MADV_DONTNEED"):
            m.madvise(mmap.MADV_DONTNEED)

    @property
    def num_documents(self) -> int:
        return max(len(self.document_indices) - 1, 0)

    @property
    def bin_bytes(self) -> int:
        return int(self._bin.size)

    def get(self, i: int) -> np.ndarray:
        """Token ids of sequence i."""
        return self.read(int(self.sequence_pointers[i]), int(self.sequence_lengths[i]))

    def read(self, byte_offset: int, count: int) -> np.ndarray:
        return np.frombuffer(self._bin, dtype=self.dtype, count=count, offset=byte_offset)

    def document_sequences(self, d: int) -> tuple[int, int]:
        """[first, last+1) sequence range of document d."""
        return int(self.document_indices[d]), int(self.document_indices[d + 1])

    def read_document(self, d: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids of the whole document, lengths of its sequences); sequences of a document are contiguous."""
        s0, s1 = self.document_sequences(d)
        lengths = self.sequence_lengths[s0:s1]
        if s1 == s0:
            return np.zeros(0, self.dtype), lengths
        return self.read(int(self.sequence_pointers[s0]), int(lengths.sum())), lengths
