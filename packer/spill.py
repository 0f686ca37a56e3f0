"""The spill: tokenized samples in arrival order, on disk, so that memory holds only their lengths (8 bytes per
sample) while the global packer, which needs every length at once, plans the packs.

    spill.add(ids, mask, lengths) ...    -> PREFIX-dir/.packer-spill-HOST-PID-XXXX/{ids,mask}
    lengths = spill.seal()               -> pack(lengths) -> plan
    with spill.maps() as m: m.ids[gather], m.drop()   (the pack-order writer reads it back)

The folder is private (mkdtemp: created exclusively, mode 0700) and removed on exit; a killed run's is removed by
the next spill in that folder, once its process is gone. The host is in the name because the folder may be
shared by builds on other machines, whose pids say nothing here.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
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


class SampleSpill:
    """Samples in arrival order, on disk; only their lengths stay in memory."""

    def __init__(self, directory: Path, dtype: np.dtype):
        remove_dead_spills(Path(directory))
        self.dir = Path(tempfile.mkdtemp(dir=directory, prefix=f"{_spill_prefix()}{os.getpid()}-"))
        self.dtype = dtype
        self.ids_path = self.dir / "ids"
        self.mask_path = self.dir / "mask"
        try:
            self._ids = create_exclusive(self.ids_path)
            self._mask = create_exclusive(self.mask_path)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self._lengths: list[np.ndarray] = []

    def add(self, ids: np.ndarray, mask: np.ndarray, lengths: np.ndarray) -> None:
        """Samples in arrival order: their ids and masks concatenated, and their lengths."""
        self._ids.write(ids.astype(self.dtype).tobytes())
        self._mask.write(mask.astype(np.uint8).tobytes())
        self._lengths.append(lengths)

    def seal(self) -> np.ndarray:
        """Close the files; returns every sample's length, in arrival order."""
        self._ids.close()
        self._mask.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        self._lengths = []
        return lengths

    @contextlib.contextmanager
    def maps(self) -> Iterator[SpillMaps]:
        """Read-only maps of (ids, mask), for the gather; `drop()` gives their resident pages back."""
        maps: list[mmap.mmap] = []
        view = SpillMaps(np.zeros(0, self.dtype), np.zeros(0, np.uint8), maps)
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
        try:
            for f in (self._ids, self._mask):
                f.close()
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


RESIDENT_SPILL = 32 << 20  # bytes of the spill that may stay mapped while gathering (see SpillMaps.drop)


@dataclass
class SpillMaps:
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
