"""The spill: tokenized samples in arrival order, on disk, so that memory holds only their lengths (8 bytes per
sample) while the global packer, which needs every length at once, plans the packs.

    spill.add(ids, mask, lengths) ...    -> PREFIX-dir/.packer-spill-HOST-PID-XXXX/samples
    lengths = spill.seal()               -> pack(lengths) -> plan
    with spill.reader() as r: ids, mask = r.gather(starts, lengths)   (the pack-order writer reads it back)

One file holds both arrays, token by token: (id, mask) records of dtype.itemsize + 1 bytes, so a sample is
one contiguous range and the gather reads each sample with ONE pread (a map of the file faulted in every
sample again, with its 64 KiB fault-around, once its pages were dropped to bound memory: 3x slower), and
nothing of the spill stays mapped or resident in the process.

    ids  [5, 6, 50256]  mask [0, 1, 1]   ->   samples  (5,0) (6,1) (50256,1)    uint16: 3 bytes a token

The folder is private (mkdtemp: created exclusively, mode 0700) and removed on exit; a killed run's is removed by
the next spill in that folder, once its process is gone. The host is in the name because the folder may be
shared by builds on other machines, whose pids say nothing here.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from packer.output import create_exclusive, pid_gone


def _spill_prefix() -> str:
    return f".packer-spill-{socket.gethostname()}-"


def remove_dead_spills(directory: Path) -> None:
    """Spill folders in `directory` of runs on this host whose process is gone (not following symlinks)."""
    mine = re.compile(re.escape(_spill_prefix()) + r"(?P<pid>\d+)-[^/]+")
    dead: list[Path] = []
    with contextlib.suppress(FileNotFoundError), os.scandir(directory) as entries:
        dead += [Path(e.path) for e in entries if (m := mine.fullmatch(e.name)) and e.is_dir(follow_symlinks=False)
                and pid_gone(int(m["pid"]))]
    for path in dead:
        shutil.rmtree(path, ignore_errors=True)


def record_dtype(dtype: np.dtype) -> np.dtype:
    """A spilled token: its id in the output's dtype, then its loss-mask byte, packed (no padding)."""
    return np.dtype([("id", np.dtype(dtype)), ("mask", np.uint8)])


class SampleSpill:
    """Samples in arrival order, on disk; only their lengths stay in memory."""

    def __init__(self, directory: Path, dtype: np.dtype):
        remove_dead_spills(Path(directory))
        self.dir = Path(tempfile.mkdtemp(dir=directory, prefix=f"{_spill_prefix()}{os.getpid()}-"))
        self.dtype = np.dtype(dtype)
        self.record = record_dtype(self.dtype)
        self.path = self.dir / "samples"
        try:
            self._file = create_exclusive(self.path)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self._lengths: list[np.ndarray] = []

    def add(self, ids: np.ndarray, mask: np.ndarray, lengths: np.ndarray) -> None:
        """Samples in arrival order: their ids and masks concatenated, and their lengths."""
        records = np.empty(ids.size, self.record)
        records["id"] = ids  # cast as astype(self.dtype) casts
        records["mask"] = mask
        self._file.write(memoryview(records).cast("B"))
        self._lengths.append(lengths)

    def seal(self) -> np.ndarray:
        """Close the file; returns every sample's length, in arrival order."""
        self._file.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        self._lengths = []
        return lengths

    @contextlib.contextmanager
    def reader(self) -> Iterator[SpillReader]:
        """The sealed spill opened for `SpillReader.gather`."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            yield SpillReader(fd, self.record)
        finally:
            os.close(fd)

    def close(self) -> None:
        try:
            self._file.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SampleSpill:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except OSError:
            if exc is None:
                raise  # else closing a file that failed to write fails again: the first error is the one to report


class SpillReader:
    def __init__(self, fd: int, record: np.dtype):
        self.fd, self.record = fd, record

    def gather(self, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask) of the samples at token offsets `starts` with `lengths`, concatenated in that order.
        Samples that follow each other in the spill as well (next-fit packs, one pack's consecutive records)
        are read as one range:

            starts [0, 3, 9], lengths [3, 2, 4]  ->  reads tokens 0..4 and 9..12 (2 preads), ids (9,), mask (9,)
        """
        lengths = np.asarray(lengths, dtype=np.int64)
        starts = np.asarray(starts, dtype=np.int64)
        if not lengths.size:
            return np.zeros(0, self.record["id"]), np.zeros(0, np.uint8)
        # A new range wherever a sample does not start where the one before it ends.
        new = np.ones(lengths.size, dtype=bool)
        new[1:] = starts[1:] != starts[:-1] + lengths[:-1]
        first = np.flatnonzero(new)
        run_lengths = np.add.reduceat(lengths, first)
        size = self.record.itemsize
        ranges = list(zip((starts[first] * size).tolist(), (run_lengths * size).tolist(), strict=True))
        pread, fd = os.pread, self.fd
        data = b"".join([pread(fd, n, at) for at, n in ranges])
        if len(data) != int(run_lengths.sum()) * size:  # a read stops short at 2 GiB: read on
            data = b"".join([_pread_exactly(fd, n, at) for at, n in ranges])
        records = np.frombuffer(data, self.record)
        return np.ascontiguousarray(records["id"]), np.ascontiguousarray(records["mask"])


def _pread_exactly(fd: int, n: int, at: int) -> bytes:
    data = os.pread(fd, n, at)
    while len(data) < n:
        more = os.pread(fd, n - len(data), at + len(data))
        if not more:  # never: the plan's samples are all in the spill
            raise RuntimeError(f"the spill ends at byte {at + len(data)}, before a sample's end ({at + n})")
        data += more
    return data
