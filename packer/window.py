"""Online best-fit packing over a bounded window, for streams that never fit in memory.

Samples arrive in arrival order. Once the window holds `window` samples (or `window` tokens), best-fit-
decreasing packs everything in it. A pack is emitted when no sample in the window could improve it (its free
space is smaller than the shortest sample in the window), and also the fullest of the others, until the
samples kept back for the next round are at most half the window. The emptiest, still-improvable packs go
back into the window and meet the next arrivals. Memory is bounded by the window, not by the input; `flush()`
packs what is left at the end of the stream.

    window of 8 samples, capacity 10:  lengths 7 6 5 4 3 3 2 2
    BFD -> [7 3] [6 4] [5 3 2] (free 0, 0, 0: emitted)  [2] (free 8: kept for the next round)

Keys are integers (the build uses arrival numbers) and everything is numpy: the per-sample cost of a
stream is a few array appends, and the per-round cost is one BFD over the window.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from packer.packing import pack


class Packs(NamedTuple):
    """Emitted packs, flat: `members` holds the keys of pack 0, then pack 1, ... (arrival order within each);
    `sizes` the number of samples in each pack."""

    members: np.ndarray
    sizes: np.ndarray

    def __len__(self) -> int:
        return len(self.sizes)

    def lists(self) -> list[list[int]]:
        return [part.tolist() for part in np.split(self.members, np.cumsum(self.sizes)[:-1])] if len(self) else []

    @staticmethod
    def join(parts: list[Packs]) -> Packs:
        if not parts:
            return Packs(np.zeros(0, np.int64), np.zeros(0, np.int64))
        if len(parts) == 1:
            return parts[0]
        return Packs(np.concatenate([p.members for p in parts]), np.concatenate([p.sizes for p in parts]))


class WindowPacker:
    def __init__(self, capacity: int, window: int, by_tokens: bool = False):
        if window < 2:
            raise ValueError(f"--pack-window must be >= 2, got {window}")
        if by_tokens and window < 2 * capacity:
            raise ValueError(f"a token window ({window}) must hold at least two packs ({2 * capacity})")
        self.capacity, self.window, self.by_tokens = capacity, window, by_tokens
        self._keys = np.zeros(0, np.int64)
        self._lengths = np.zeros(0, np.int64)
        self._tokens = 0

    def __len__(self) -> int:
        return self._keys.size

    def add(self, key: int, length: int) -> Packs:
        """Add one sample; returns the packs that are now final."""
        return self.extend([key], [length])

    def extend(self, keys, lengths) -> Packs:
        """Add samples in arrival order; the packs that became final, exactly as adding them one by one."""
        keys = np.asarray(keys, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        if keys.shape != lengths.shape or keys.ndim != 1:
            raise ValueError("keys and lengths must be 1-D and of the same size")
        if lengths.size and (lengths.min() < 1 or lengths.max() > self.capacity):
            bad = int(lengths[(lengths < 1) | (lengths > self.capacity)][0])
            raise ValueError(f"sample length {bad} outside [1, {self.capacity}]")
        out: list[Packs] = []
        i, n = 0, keys.size
        while i < n:
            # How many of the next samples fit before the window is full (a round follows the one that fills it).
            if self.by_tokens:
                need = self.window - self._tokens  # > 0: a round leaves at most half the window
                reach = np.cumsum(lengths[i:])
                j = int(np.searchsorted(reach, need))  # the first sample at which the window is full
                take, full = (j + 1, True) if j < reach.size else (n - i, False)
            else:
                room = self.window - self._keys.size
                take = min(room, n - i)
                full = take == room
            self._keys = np.concatenate([self._keys, keys[i : i + take]])
            self._lengths = np.concatenate([self._lengths, lengths[i : i + take]])
            self._tokens += int(lengths[i : i + take].sum())
            i += take
            if full:
                out.append(self._round(final=False))
        return Packs.join(out)

    def flush(self) -> Packs:
        return self._round(final=True) if self._keys.size else Packs.join([])

    def _round(self, final: bool) -> Packs:
        lengths = self._lengths
        plan = pack(lengths, self.capacity, "bfd")
        sizes = np.diff(plan.offsets)
        if final:
            emit = np.ones(plan.num_packs, dtype=bool)
        else:
            fill = plan.pack_lengths(lengths)
            free = self.capacity - fill
            # Emptiest first: these gain most from the next arrivals; keep them while the budget allows and
            # something in the window could still improve them (a prefix of this order).
            by_free = np.argsort(-free, kind="stable")
            cost = fill[by_free] if self.by_tokens else sizes[by_free]
            ok = (free[by_free] >= lengths.min()) & (np.cumsum(cost) <= self.window // 2)
            emit = np.ones(plan.num_packs, dtype=bool)
            emit[by_free[np.logical_and.accumulate(ok)]] = False
        chosen = np.repeat(emit, sizes)  # per position of plan.order
        packs = Packs(self._keys[plan.order[chosen]], sizes[emit])
        rest = np.sort(plan.order[~chosen])  # arrival order
        self._keys, self._lengths = self._keys[rest], lengths[rest]
        self._tokens = int(self._lengths.sum())
        return packs
