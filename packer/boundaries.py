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
