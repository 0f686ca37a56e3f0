"""Online best-fit packing over a bounded window, for streams that never fit in memory.

Samples arrive one by one. Once the window holds `window` samples (or `window` tokens), best-fit-decreasing
packs everything in it. A pack is emitted when no sample in the window could improve it (its free space is
smaller than the shortest sample seen in the window), and also the fullest of the others, until the samples
kept back for the next round are at most half the window. The emptiest, still-improvable packs go back into
the window and meet the next arrivals. Memory is bounded by the window, not by the input; `flush()` packs what
is left at the end of the stream.

    window of 8 samples, capacity 10:  lengths 7 6 5 4 3 3 2 2
    BFD -> [7 3] [6 4] [5 3 2] (free 0, 0, 0: emitted)  [2] (free 8: kept for the next round)
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np

from packer.packing import pack


@dataclass
class WindowPacker:
    capacity: int
    window: int  # samples, or tokens when by_tokens
    by_tokens: bool = False
    _keys: list[Hashable] = field(default_factory=list)
    _lengths: list[int] = field(default_factory=list)
    _tokens: int = 0

    def __post_init__(self) -> None:
        if self.window < 2:
            raise ValueError(f"--pack-window must be >= 2, got {self.window}")
        if self.by_tokens and self.window < 2 * self.capacity:
            raise ValueError(f"a token window ({self.window}) must hold at least two packs ({2 * self.capacity})")

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: Hashable, length: int) -> list[list[Hashable]]:
        """Add one sample; returns the packs (lists of keys, in arrival order) that are now final."""
        if not 1 <= length <= self.capacity:
            raise ValueError(f"sample length {length} outside [1, {self.capacity}]")
        self._keys.append(key)
        self._lengths.append(length)
        self._tokens += length
        full = self._tokens >= self.window if self.by_tokens else len(self._keys) >= self.window
        return self._round(final=False) if full else []

    def extend(self, keys: list[Hashable], lengths: list[int]) -> list[list[Hashable]]:
        """`add` for many samples at once (the streaming build's per-chunk call)."""
        out: list[list[Hashable]] = []
        for key, length in zip(keys, lengths, strict=True):
            out += self.add(key, length)
        return out

    def flush(self) -> list[list[Hashable]]:
        return self._round(final=True) if self._keys else []

    def _round(self, final: bool) -> list[list[Hashable]]:
        lengths = np.asarray(self._lengths, dtype=np.int64)
        plan = pack(lengths, self.capacity, "bfd")
        members = [plan.order[plan.offsets[p] : plan.offsets[p + 1]] for p in range(plan.num_packs)]
        if final:
            emit = list(range(plan.num_packs))
        else:
            fill = plan.pack_lengths(lengths)
            free = self.capacity - fill
            budget = (self.window // 2) if not self.by_tokens else self.window // 2
            # Emptiest first: these gain most from the next arrivals; keep them while the budget allows.
            keep: set[int] = set()
            kept = 0
            for p in np.argsort(-free, kind="stable").tolist():
                if free[p] < lengths.min():
                    break  # nothing in the window can improve this or any fuller pack
                size = int(fill[p]) if self.by_tokens else len(members[p])
                if kept + size > budget:
                    break
                keep.add(p)
                kept += size
            emit = [p for p in range(plan.num_packs) if p not in keep]
            rest = np.concatenate([members[p] for p in sorted(keep)]) if keep else np.zeros(0, np.int64)
        out = [[self._keys[i] for i in members[p]] for p in emit]
        if final:
            self._keys, self._lengths, self._tokens = [], [], 0
        else:
            rest = np.sort(rest)  # arrival order
            self._keys = [self._keys[i] for i in rest.tolist()]
            self._lengths = lengths[rest].tolist()
            self._tokens = int(lengths[rest].sum())
        return out
