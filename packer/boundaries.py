"""Document boundaries, represented one way end to end: per-document lengths -> cumulative offsets."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def cumulative_ends(doc_lens: Sequence[int] | np.ndarray, leading_zero: bool = False) -> np.ndarray:
    """Cumulative document end offsets.

    >>> cumulative_ends([2, 2, 0, 2, 2]).tolist()            # Ascend actual_seq_len
    [2, 4, 4, 6, 8]
    >>> cumulative_ends([2, 2, 0, 2, 2], leading_zero=True).tolist()  # CUDA cu_seqlens
    [0, 2, 4, 4, 6, 8]
    """
    lens = np.asarray(doc_lens, dtype=np.int64)
    if lens.ndim != 1:
        raise ValueError(f"document lengths must be 1-D, got shape {lens.shape}")
    if lens.size and lens.min() < 0:
        raise ValueError(f"document lengths must be >= 0, got {lens.tolist()}")
    ends = np.cumsum(lens)
    if leading_zero:
        ends = np.concatenate([np.zeros(1, dtype=np.int64), ends])
    return ends


def actual_seq_len(doc_lens: Sequence[int] | np.ndarray) -> list[int]:
    """`actual_seq_len` as MindSpeed-LLM passes it to `npu_fusion_attention`: cumulative ends, no leading 0."""
    return cumulative_ends(doc_lens).tolist()


def cu_seqlens(doc_lens: Sequence[int] | np.ndarray) -> np.ndarray:
    """`cu_seqlens` as flash-attn / torch varlen take it: int32, leading 0."""
    ends = cumulative_ends(doc_lens, leading_zero=True)
    if ends[-1] > np.iinfo(np.int32).max:
        raise ValueError(f"{ends[-1]} tokens overflow int32 cu_seqlens")
    return ends.astype(np.int32)


def pack_tokens(sequence_lengths: np.ndarray, document_indices: np.ndarray) -> np.ndarray:
    """Tokens in each pack, where pack d holds sequences document_indices[d] .. document_indices[d+1]-1.

    >>> pack_tokens([3, 2, 4], [0, 2, 3]).tolist()           # packs [3, 2] and [4]
    [5, 4]
    """
    ends = cumulative_ends(sequence_lengths, leading_zero=True)
    docs = np.asarray(document_indices, dtype=np.int64)
    return ends[docs[1:]] - ends[docs[:-1]]


def row_segments(doc_lens_per_row: Sequence[Sequence[int] | np.ndarray], row_len: int) -> list[int]:
    """Attention segment lengths of rows of `row_len` tokens laid end to end: each row's documents, then its
    padding tail (row_len - sum) as ONE more segment where the row is short.

    >>> row_segments([[3, 5], [2, 2]], row_len=8)           # -> cumulative_ends: [3, 8, 10, 12, 16]
    [3, 5, 2, 2, 4]
    """
    seg_lens: list[int] = []
    for r, lens in enumerate(doc_lens_per_row):
        lens = [int(n) for n in lens]
        used = sum(lens)
        if any(n < 0 for n in lens) or used > row_len:
            raise ValueError(
                f"row {r} holds {used} tokens (doc_lens {lens}) but rows are {row_len} tokens; "
                "pass --seq-length >= the packed seq_length of the data"
            )
        seg_lens.extend(lens)
        if used < row_len:
            seg_lens.append(row_len - used)
    return seg_lens


def eod_scan_agrees(ids: np.ndarray, seq_lens: np.ndarray, samples_per_pack: np.ndarray, eod_id: int) -> np.ndarray:
    """Per pack: does a trainer that ends a segment after every EOD token (and at the pack's end) find exactly
    the index's documents? A split chunk without EOD agrees only as the last sample of its pack.

    >>> E = 9
    >>> eod_scan_agrees(np.array([1, E, 2, 3, E, 4, E, E]), np.array([2, 3, 3]), np.array([2, 1]), E).tolist()
    [True, False]
    """
    ids, seq_lens = np.asarray(ids), np.asarray(seq_lens, dtype=np.int64)
    counts = np.asarray(samples_per_pack, dtype=np.int64)
    if counts.size == 0:
        return np.zeros(0, dtype=bool)
    is_eod = ids == eod_id
    expected = np.zeros(ids.size, dtype=bool)
    last = np.cumsum(seq_lens) - 1  # each sample's last token
    expected[last[seq_lens > 0]] = True
    tokens = pack_tokens(seq_lens, cumulative_ends(counts, leading_zero=True))
    bounds = cumulative_ends(tokens, leading_zero=True)  # token offsets of the packs
    pack_last = bounds[1:][tokens > 0] - 1  # each non-empty pack's last token: a boundary for the scan either way
    expected[pack_last] = is_eod[pack_last]
    # The few tokens where the scan and the index disagree, found without an int64 pass over every token
    # (a cumsum of a 37M-token build's mismatches cost ~0.07 s): mark the packs that hold one.
    wrong_at = np.flatnonzero(is_eod != expected)
    agrees = np.ones(counts.size, dtype=bool)
    agrees[np.searchsorted(bounds, wrong_at, side="right") - 1] = False
    return agrees
