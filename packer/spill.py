"""The spill: tokenized samples in arrival order, on disk, so that memory holds only their lengths (8 bytes per
sample) while the global packer, which needs every length at once, plans the packs.

    spill.add(ids, mask, lengths) ...    -> PREFIX-dir/.packer-build-XXXX/{ids,mask}
    lengths = spill.seal()               -> pack(lengths) -> plan
    with spill.maps() as m: m.ids[gather], m.drop()   (the pack-order writer reads it back)
"""

from __future__ import annotations

import contextlib
import mmap
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class SampleSpill:
    """Samples in arrival order, on disk; only their lengths stay in memory."""

    def __init__(self, directory: Path, dtype: np.dtype):
        self.dir = tempfile.TemporaryDirectory(dir=directory, prefix=".packer-build-")
        self.dtype = dtype
        self.ids_path = Path(self.dir.name) / "ids"
        self.mask_path = Path(self.dir.name) / "mask"
        self._ids = open(self.ids_path, "wb")  # noqa: SIM115 -- closed in close()
        self._mask = open(self.mask_path, "wb")  # noqa: SIM115
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
        for f in (self._ids, self._mask):
            f.close()
        self.dir.cleanup()

    def __enter__(self) -> SampleSpill:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
