"""Bin packing of sample lengths into packs of at most `capacity` tokens.

Every algorithm returns a `PackPlan`: the sample indices in output order and the pack boundaries into that
order. Lengths are small integers (1..capacity), which the decreasing algorithms exploit: items of equal size
are placed as one group, so the work is O(n log n) for the sort plus O(distinct sizes x open capacity levels)
numpy steps, not O(n) Python steps.

Best-fit-decreasing by groups. Take all items of size s (largest s first). Best fit puts an item into the
open bin with the smallest remaining capacity r >= s. After that the bin has r - s left; if r - s >= s it is
still the best fit for the next item of size s, so a bin at level r absorbs q = r // s items in a row, and all
bins at the same level are interchangeable. Hence, per (size, level): f = min(bins at level r, m // q) bins
each take q items and move to level r - q*s, one more bin may take the remaining m % q items, and only when
no level >= s has a bin are new bins (capacity C, absorbing C // s items each) opened. This is exactly BFD's
result, computed in O(distinct sizes x levels touched).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from packer.boundaries import pack_tokens

ALGORITHMS = ("bfd", "ffd", "nf", "none")


@dataclass(frozen=True, slots=True)
class PackPlan:
    order: np.ndarray  # (n,) int64 sample indices, pack by pack; within a pack in input order
    offsets: np.ndarray  # (n_packs + 1,) int64: pack p is order[offsets[p]:offsets[p+1]]

    @property
    def num_packs(self) -> int:
        return len(self.offsets) - 1

    def pack_lengths(self, lengths: np.ndarray) -> np.ndarray:
        """Tokens per pack."""
        return pack_tokens(np.asarray(lengths, dtype=np.int64)[self.order], self.offsets)


def _tokens(tokens: int | np.ndarray) -> int:
    return int(tokens) if np.ndim(tokens) == 0 else int(np.asarray(tokens, dtype=np.int64).sum())


def lower_bound(tokens: int | np.ndarray, capacity: int) -> int:
    """The fewest packs that can hold `tokens` (a total, or the sample lengths): ceil(tokens / capacity)."""
    return -(-_tokens(tokens) // capacity)


def efficiency(tokens: int | np.ndarray, num_packs: int, capacity: int) -> float:
    """Fraction of the packs' token slots that hold real tokens (`tokens`: a total, or the sample lengths)."""
    return _tokens(tokens) / (num_packs * capacity) if num_packs else 0.0


@dataclass
class PackStats:
    """Running figures over written packs (the streaming path never holds all packs; merge adds builds')."""

    packs: int = 0
    tokens: int = 0
    min_tokens: int = 0
    max_tokens: int = 0
    max_samples: int = 0

    def add(self, seq_lens: np.ndarray, samples_per_pack: np.ndarray) -> None:
        """Packs just written: the lengths of their samples, in order, and how many samples each pack holds."""
        if samples_per_pack.size == 0:
            return
        per_pack = pack_tokens(seq_lens, np.concatenate([[0], np.cumsum(samples_per_pack)]))
        self.merge(PackStats(int(per_pack.size), int(per_pack.sum()), int(per_pack.min()), int(per_pack.max()),
                             int(samples_per_pack.max())))

    def merge(self, other: PackStats) -> None:
        if other.packs == 0:
            return
        self.min_tokens = other.min_tokens if self.packs == 0 else min(self.min_tokens, other.min_tokens)
        self.max_tokens = max(self.max_tokens, other.max_tokens)
        self.max_samples = max(self.max_samples, other.max_samples)
        self.packs += other.packs
        self.tokens += other.tokens

    @staticmethod
    def of_manifest(manifest: dict) -> PackStats:
        p = manifest["packing"]
        return PackStats(int(p["packs"]), int(manifest["counts"]["tokens"]), int(p["min_pack_tokens"]),
                         int(p["max_pack_tokens"]), int(p["max_docs_per_pack"]))

    def manifest(self, algorithm: str, seq_length: int) -> dict:
        """The manifest's `packing` section."""
        return {
            "algorithm": algorithm,
            "seq_length": seq_length,
            "packs": self.packs,
            "lower_bound": lower_bound(self.tokens, seq_length),
            "efficiency": efficiency(self.tokens, self.packs, seq_length),
            "max_pack_tokens": self.max_tokens,
            "min_pack_tokens": self.min_tokens,
            "max_docs_per_pack": self.max_samples,
        }


def pack(lengths: np.ndarray, capacity: int, algorithm: str = "bfd") -> PackPlan:
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {lengths.shape}")
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    if lengths.size and (lengths.min() < 1 or lengths.max() > capacity):
        bad = int(np.flatnonzero((lengths < 1) | (lengths > capacity))[0])
        raise ValueError(f"sample {bad} has length {lengths[bad]}, outside [1, {capacity}]")
    if algorithm == "none":
        return PackPlan(np.arange(lengths.size, dtype=np.int64), np.arange(lengths.size + 1, dtype=np.int64))
    if algorithm == "nf":
        assign = _next_fit(lengths, capacity)
    elif algorithm == "bfd":
        assign = _best_fit_decreasing(lengths, capacity)
    elif algorithm == "ffd":
        assign = _first_fit_decreasing(lengths, capacity)
    else:
        raise ValueError(f"unknown packing algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    return _plan_from_assignment(assign)


def _plan_from_assignment(assign: np.ndarray) -> PackPlan:
    # Packs in bin-creation order; samples within a pack in input order (stable sort by bin id).
    order = np.argsort(assign, kind="stable").astype(np.int64)
    counts = np.bincount(assign) if assign.size else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return PackPlan(order, offsets)


def _size_groups(lengths: np.ndarray):
    """Yield (size, sample indices of that size) from the largest size down."""
    if lengths.size == 0:
        return
    order = np.argsort(-lengths, kind="stable")
    sorted_len = lengths[order]
    cut = np.flatnonzero(np.diff(sorted_len)) + 1
    starts = np.concatenate([[0], cut])
    ends = np.concatenate([cut, [lengths.size]])
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        yield int(sorted_len[a]), order[a:b]


def _best_fit_decreasing(lengths: np.ndarray, capacity: int) -> np.ndarray:
    assign = np.empty(lengths.size, dtype=np.int64)
    levels: list[list[int]] = [[] for _ in range(capacity + 1)]  # remaining capacity -> open bin ids
    count = np.zeros(capacity + 1, dtype=np.int64)  # len(levels[r]), for vectorized search
    n_bins = 0

    def move(bins: list[int], to: int) -> None:
        levels[to].extend(bins)
        count[to] += len(bins)

    for s, items in _size_groups(lengths):
        m, pos = items.size, 0
        while m:
            nz = np.flatnonzero(count[s:])
            if nz.size == 0:  # no open bin fits: open new ones, each absorbing q items
                q = capacity // s
                full, rem = divmod(m, q)
                ids = np.arange(n_bins, n_bins + full + (rem > 0), dtype=np.int64)
                assign[items[pos:]] = np.repeat(ids, [q] * full + ([rem] if rem else []))
                n_bins += ids.size
                if full:
                    move(ids[:full].tolist(), capacity - q * s)
                if rem:
                    move([int(ids[-1])], capacity - rem * s)
                break
            r = s + int(nz[0])
            q = r // s
            k = int(count[r])
            f = min(k, m // q)
            if f:
                taken = levels[r][-f:]
                del levels[r][-f:]
                count[r] -= f
                assign[items[pos : pos + f * q]] = np.repeat(np.asarray(taken, dtype=np.int64), q)
                pos += f * q
                m -= f * q
                move(taken, r - q * s)
            if m and f < k:  # fewer than q items left: the next bin at level r takes them all
                b = levels[r].pop()
                count[r] -= 1
                assign[items[pos:]] = b
                move([b], r - m * s)
                m = 0
    return assign


def _first_fit_decreasing(lengths: np.ndarray, capacity: int) -> np.ndarray:
    assign = np.empty(lengths.size, dtype=np.int64)
    caps = np.empty(max(16, lengths.size // 8), dtype=np.int64)  # remaining capacity per bin, grown on demand
    n_bins = 0
    for s, items in _size_groups(lengths):
        m, pos = items.size, 0
        cand = np.flatnonzero(caps[:n_bins] >= s)  # lowest index first = first fit
        if cand.size:
            q = caps[cand] // s
            take = np.minimum(q, np.maximum(m - (np.cumsum(q) - q), 0))
            used = take > 0
            cand, take = cand[used], take[used]
            assign[items[: take.sum()]] = np.repeat(cand, take)
            caps[cand] -= take * s
            pos = int(take.sum())
            m -= pos
        if m:
            q = capacity // s
            full, rem = divmod(m, q)
            n_new = full + (rem > 0)
            if n_bins + n_new > caps.size:
                caps = np.concatenate([caps, np.empty(max(caps.size, n_new), dtype=np.int64)])
            ids = np.arange(n_bins, n_bins + n_new, dtype=np.int64)
            assign[items[pos:]] = np.repeat(ids, [q] * full + ([rem] if rem else []))
            caps[n_bins : n_bins + full] = capacity - q * s
            if rem:
                caps[n_bins + full] = capacity - rem * s
            n_bins += n_new
    return assign


def _next_fit(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Next-fit in data order: the naive baseline (what concatenate-and-cut packers do, minus the cutting)."""
    assign = np.empty(lengths.size, dtype=np.int64)
    b, used = 0, 0
    for i, n in enumerate(lengths.tolist()):
        if used + n > capacity:
            b, used = b + 1, 0
        assign[i] = b
        used += n
    return assign
