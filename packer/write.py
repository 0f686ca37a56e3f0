"""The pack-order writer: samples -> packs in the token and loss-mask datasets, the same bytes for both paths.

    global     spill (arrival order) -> gather in PackPlan order, a group of packs at a time -> PackWriter
    streaming  chunks -> WindowWriter: samples wait in a bounded window until their pack is final -> PackWriter

A pack is one Megatron *document*, each of its samples one *sequence* (docs/format.md). A context-parallel build
(`multiple` > 1, packer/cp.py) packs by padded sample lengths and writes the real samples: the same bytes a plain
build would write for the same packs.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from packer.balance import pack_attention_costs
from packer.boundaries import eod_scan_agrees, pack_tokens
from packer.cp import padded_lengths
from packer.indexed import IndexedDatasetWriter
from packer.packing import PackPlan, PackStats
from packer.progress import bar as progress_bar
from packer.spill import SampleSpill
from packer.window import Packs, WindowPacker


class PackWriter:
    """Appends whole packs to the token and loss-mask datasets and keeps their PackStats, how many packs an
    EOD scan reads exactly as the index does (`eod_scan_agrees`), and, with samples padded to `multiple`, the
    padded tokens and every pack's attention cost (8 bytes a pack)."""

    def __init__(self, tokens: IndexedDatasetWriter, mask: IndexedDatasetWriter, eod_id: int, multiple: int = 1):
        self.tokens, self.mask = tokens, mask
        self.dtype = tokens.dtype
        self.eod_id = eod_id
        self.multiple = multiple
        self.stats = PackStats()
        self.eod_agree = 0
        self.padded_tokens = 0
        self.max_padded_pack = 0
        self._costs: list[np.ndarray] = []

    def add(self, ids: np.ndarray, mask: np.ndarray, seq_lens: np.ndarray, samples_per_pack: np.ndarray) -> None:
        """Packs of samples: their ids and masks concatenated in pack order, each sample's length, and how many
        samples each pack holds."""
        self.tokens.add_sequences(ids, seq_lens)
        self.tokens.end_documents(samples_per_pack)
        self.mask.add_sequences(mask, seq_lens)
        self.mask.end_documents(samples_per_pack)
        self.stats.add(seq_lens, samples_per_pack)
        self.eod_agree += int(eod_scan_agrees(ids, seq_lens, samples_per_pack, self.eod_id).sum())
        padded = padded_lengths(seq_lens, self.multiple)
        docs = np.concatenate([[0], np.cumsum(samples_per_pack)])
        per_pack = pack_tokens(padded, docs)
        self.padded_tokens += int(padded.sum())
        self.max_padded_pack = max(self.max_padded_pack, int(per_pack.max(initial=0)))
        self._costs.append(pack_attention_costs(padded, docs))

    @property
    def attention_costs(self) -> np.ndarray:
        """(packs,) int64: every written pack's sum of squared padded sample lengths, in pack order."""
        return np.concatenate(self._costs) if self._costs else np.zeros(0, np.int64)


def token_positions(starts: np.ndarray, lengths: np.ndarray, extent: int) -> np.ndarray:
    """Positions of the tokens of samples at `starts` with `lengths`, concatenated: start_j + 0..len_j-1.
    int32 when every position is below 2**31 (`extent`): these are the writers' largest transient arrays."""
    dtype = np.int32 if extent < 2**31 else np.int64
    where = np.repeat((starts - (np.cumsum(lengths) - lengths)).astype(dtype), lengths)
    where += np.arange(where.size, dtype=dtype)
    return where


def write_global(plan: PackPlan, lengths: np.ndarray, spill: SampleSpill, out: PackWriter, progress: bool,
                 chunk_tokens: int = 1 << 18, chunk_samples: int = 4096) -> None:
    """Gather the spilled samples in pack order, a group of whole packs at a time (at most chunk_tokens tokens
    and chunk_samples samples, unless one pack alone is more), each sample read from the spill file into the
    group's buffer: memory holds one group (~1 MiB of records at the defaults), whatever the corpus."""
    starts = np.cumsum(lengths) - lengths
    ends = np.cumsum(plan.pack_lengths(lengths))  # tokens up to the end of each pack
    groups = [0]
    while groups[-1] < plan.num_packs:
        p0 = groups[-1]
        by_tokens = int(np.searchsorted(ends, (ends[p0 - 1] if p0 else 0) + chunk_tokens, side="right"))
        by_samples = int(np.searchsorted(plan.offsets, plan.offsets[p0] + chunk_samples, side="right")) - 1
        groups.append(max(p0 + 1, min(by_tokens, by_samples, plan.num_packs)))
    spans = list(zip(groups[:-1], groups[1:], strict=False))
    with (progress_bar(progress, total=plan.num_packs, unit="pack", desc="write", dynamic_ncols=True) as bar,
          spill.reader() as spilled, ThreadPoolExecutor(1, thread_name_prefix="packer-gather") as reader):

        def gather(p0: int, p1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            members = plan.order[plan.offsets[p0] : plan.offsets[p1]]
            return (*spilled.gather(starts[members], lengths[members]), lengths[members])

        # The next group is read while this one is written: the reads (a pread per sample) and the writes and
        # checksums release the GIL, so the two overlap (100k texts: median write phase 0.385 -> 0.329 s of 6 runs).
        ahead = reader.submit(gather, *spans[0]) if spans else None
        for k, (p0, p1) in enumerate(spans):
            ids, mask, seq_lens = ahead.result()
            if k + 1 < len(spans):
                ahead = reader.submit(gather, *spans[k + 1])
            out.add(ids, mask, seq_lens, np.diff(plan.offsets[p0 : p1 + 1]))
            bar.update(p1 - p0)


class WindowWriter:
    """Online packing: samples wait in a bounded window and are written as soon as their pack is final.

    Chunks are kept as they arrive and samples are gathered from them by (chunk, start, length); written
    samples leave holes. The waiting samples are compacted into one fresh buffer only when the holes outweigh
    them, so each token is copied a bounded number of times on average (compacting at every write copied the
    whole window every chunk: ~30 copies per token at the default window, 18% of a 2-worker build) and memory
    stays within about twice the window.
    """

    def __init__(self, out: PackWriter, seq_length: int, window: int, by_tokens: bool):
        self.out = out
        self.multiple = out.multiple  # the packer sees padded lengths, the buffers hold the real samples
        self.packer = WindowPacker(seq_length, window, by_tokens=by_tokens)
        self._ids: list[np.ndarray] = []  # buffers: a compacted one, then the chunks since
        self._mask: list[np.ndarray] = []
        self._keys = np.zeros(0, np.int64)  # waiting samples: arrival number (ascending), buffer, start, length
        self._bufs = np.zeros(0, np.int64)
        self._starts = np.zeros(0, np.int64)
        self._lens = np.zeros(0, np.int64)
        self._held = 0  # tokens in the buffers, waiting or not
        self._next_key = 0

    def add(self, ids: np.ndarray, mask: np.ndarray, lengths: np.ndarray) -> None:
        """Samples in arrival order (ids and masks concatenated, and their lengths)."""
        n = lengths.size
        if not n:
            return
        self._ids.append(ids.astype(self.out.dtype, copy=False))
        self._mask.append(mask)
        keys = np.arange(self._next_key, self._next_key + n, dtype=np.int64)
        self._keys = np.concatenate([self._keys, keys])
        self._bufs = np.concatenate([self._bufs, np.full(n, len(self._ids) - 1, dtype=np.int64)])
        self._starts = np.concatenate([self._starts, np.cumsum(lengths) - lengths])
        self._lens = np.concatenate([self._lens, lengths])
        self._held += int(lengths.sum())
        self._next_key += n
        self._write(self.packer.extend(keys, padded_lengths(lengths, self.multiple)))

    def flush(self) -> None:
        self._write(self.packer.flush())

    def _gather(self, at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ids and masks of waiting samples `at` (indexes into the waiting arrays), back to back."""
        where = list(zip(self._bufs[at].tolist(), self._starts[at].tolist(),
                         (self._starts[at] + self._lens[at]).tolist(), strict=True))
        if not where:
            return np.zeros(0, self.out.dtype), np.zeros(0, np.uint8)
        return (np.concatenate([self._ids[b][i:j] for b, i, j in where]),
                np.concatenate([self._mask[b][i:j] for b, i, j in where]))

    def _write(self, packs: Packs) -> None:
        if not len(packs):
            return
        at = np.searchsorted(self._keys, packs.members)  # keys are ascending
        seq_lens = self._lens[at]
        self.out.add(*self._gather(at), seq_lens, packs.sizes)
        waiting = np.ones(self._keys.size, dtype=bool)
        waiting[at] = False
        self._keys, self._bufs = self._keys[waiting], self._bufs[waiting]
        self._starts, self._lens = self._starts[waiting], self._lens[waiting]
        live = int(self._lens.sum())
        if self._held > 2 * live:  # mostly holes: the waiting samples into one buffer, in key order
            ids, mask = self._gather(np.arange(self._keys.size))
            self._ids, self._mask = [ids], [mask]
            self._bufs = np.zeros(self._keys.size, dtype=np.int64)
            self._starts = np.cumsum(self._lens) - self._lens
            self._held = live
