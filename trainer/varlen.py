"""`VarlenMeta`: where the segments of a flattened (TND) token stream begin and end, built once per micro-batch.

Rows of S=8 tokens, docs [3, 2] then [5] + 3 padding tokens (a short row's padding tail is ONE segment):

    tokens           a a a b b | c c c c c p p p
    cu_seqlens       [0, 3, 5, 8, 13, 16]      (CUDA form, int32, leading 0)
    actual_seq_len   [3, 5, 8, 13, 16]         (Ascend form, cumulative ends)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from packer import boundaries


@dataclass(frozen=True, slots=True)
class VarlenMeta:
    cu_seqlens: torch.Tensor  # (n_seg+1,) int32, leading 0, last == T, on the tensors' device
    max_seqlen: int  # longest segment
    actual_seq_len: list[int]  # cu_seqlens[1:] as python ints (Ascend form)
    num_rows: int  # B
    row_len: int  # S; T = B*S

    @property
    def total_tokens(self) -> int:
        return self.num_rows * self.row_len

    def __post_init__(self) -> None:
        # Checked on the python copy of the offsets so that building a meta never syncs with the device.
        ends = self.actual_seq_len
        T = self.num_rows * self.row_len
        if not ends or ends[-1] != T:
            raise ValueError(f"actual_seq_len must end at T = num_rows*row_len = {T}, got {ends[-8:]}")
        if any(b < a for a, b in zip([0, *ends], ends, strict=False)):
            raise ValueError(f"actual_seq_len must be non-decreasing cumulative ends, got {ends}")
        if missing := sorted(set(range(self.row_len, T, self.row_len)) - set(ends)):
            raise ValueError(
                f"a segment crosses a row boundary at token(s) {missing[:4]}; end every row's last document "
                f"(or padding tail) at a multiple of row_len={self.row_len}"
            )
        if self.cu_seqlens.dtype != torch.int32 or self.cu_seqlens.numel() != len(ends) + 1:
            raise ValueError(
                f"cu_seqlens must be int32 of length {len(ends) + 1}, got {self.cu_seqlens.dtype} "
                f"of length {self.cu_seqlens.numel()}; build metas with VarlenMeta.from_rows"
            )
        longest = max(b - a for a, b in zip([0, *ends], ends, strict=False))
        if self.max_seqlen != longest:
            raise ValueError(f"max_seqlen={self.max_seqlen} but the longest segment is {longest}")

    @classmethod
    def from_rows(
        cls, doc_lens_per_row: Sequence[Sequence[int]], row_len: int, device: torch.device | str | None = None
    ) -> VarlenMeta:
        """Meta for B rows of `row_len` tokens; a row whose documents fall short gets one padding-tail segment.

        >>> VarlenMeta.from_rows([[3, 2], [5]], row_len=8).actual_seq_len
        [3, 5, 8, 13, 16]
        """
        lens = boundaries.row_segments(doc_lens_per_row, row_len)
        return cls.from_segment_lens(lens, num_rows=len(doc_lens_per_row), row_len=row_len, device=device)

    @classmethod
    def from_segment_lens(
        cls, seg_lens: Sequence[int], num_rows: int, row_len: int, device: torch.device | str | None = None
    ) -> VarlenMeta:
        # the project's one lengths -> offsets function (int32, leading 0)
        cu = boundaries.cu_seqlens(seg_lens)
        return cls(
            cu_seqlens=torch.from_numpy(cu).to(device),
            max_seqlen=max((int(n) for n in seg_lens), default=0),
            actual_seq_len=cu[1:].tolist(),
            num_rows=num_rows,
            row_len=row_len,
        )

    def segments(self) -> list[tuple[int, int]]:
        """[(start, end), ...] of every segment, empty ones included."""
        ends = self.actual_seq_len
        return list(zip([0, *ends[:-1]], ends, strict=True))


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: VarlenMeta) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(
            f"expected q (T, Hq, D), k and v (T, Hkv, D); got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    T, Hq, D = q.shape
    if k.shape[0] != T or k.shape[2] != D:
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} disagree on T or head_dim")
    if Hq % k.shape[1]:
        raise ValueError(f"grouped-query attention needs Hq % Hkv == 0, got Hq={Hq}, Hkv={k.shape[1]}")
    if meta.total_tokens != T:
        raise ValueError(
            f"q has {T} tokens but meta describes {meta.num_rows} rows x {meta.row_len} = {meta.total_tokens}"
        )


def segments_per_pack(ds, seq_length: int | None = None) -> list[int]:
    """Attention segments each pack of `ds` becomes as one row of `seq_length` tokens: its documents (empty ones
    included) plus one padding-tail segment where the documents fall short of the row."""
    S = seq_length or ds.seq_length
    doc_lens = ds.doc_lens if hasattr(ds, "doc_lens") else (lambda i: ds[i].doc_lens)  # index-only when it can
    counts = []
    for i in range(len(ds)):
        lens = doc_lens(i)
        counts.append(len(lens) + (int(np.sum(lens)) < S))
    return counts


def max_segments_per_micro_batch(ds, micro_batch_size: int, seq_length: int | None = None) -> int:
    """The most segments one micro-batch of `micro_batch_size` packs can hold (the sum of the largest per-pack
    counts, whatever the shuffle), i.e. the longest actual_seq_len a kernel call can receive.

    4 packs of 300 short documents, each short of its row: 4 * (300 + 1) = 1,204 segments.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    return sum(sorted(segments_per_pack(ds, seq_length), reverse=True)[:micro_batch_size])
