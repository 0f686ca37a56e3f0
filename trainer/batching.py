"""Packs -> micro-batches: one flat token stream (TND) whose document boundaries come from the index.

A micro-batch is B packs laid end to end, each padded at its tail to a row of S tokens, T = B * S.
For S = 8 and two packs with doc_lens [3, 5] and [2, 2] (P = pad):

    row            0                         1
    tokens_T       a0 a1 a2 b0 b1 b2 b3 b4 | c0 c1 d0 d1 P  P  P  P
    positions_T    0  1  2  0  1  2  3  4  | 0  1  0  1  0  1  2  3
    segments       [3, 5]                  | [2, 2, 4]          <- the padding tail is ONE segment
    actual_seq_len [3, 8, 10, 12, 16]          (Ascend npu_fusion_attention, no leading 0)
    cu_seqlens     [0, 3, 8, 10, 12, 16]       (flash-attn / torch varlen, int32)

Labels are the next token of the same document, and only where that next token is a training target
(loss_mask 1): the last token of a document and every padding token get IGNORE_INDEX.

The `padded` layout is the baseline users have today: the same packs are split back into documents and
each document gets its own row of S tokens. It trains on exactly the same real tokens, but processes
n_docs * S tokens instead of B * S, and its attention is plain causal attention per row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from packer.boundaries import cu_seqlens, cumulative_ends, row_segments
from packer.records import Pack
from packer.trainer.varlen import VarlenMeta

IGNORE_INDEX = -100
Layout = Literal["packed", "padded"]


def segment_boundaries(
    doc_lens_per_row: Sequence[Sequence[int] | np.ndarray], row_len: int
) -> tuple[list[int], np.ndarray, int]:
    """Attention segments of rows of `row_len` tokens laid end to end.

    Returns (actual_seq_len: cumulative ends, no leading 0, last == n_rows * row_len;
             cu_seqlens: int32 (n_seg + 1,) with leading 0; max_seqlen).
    The padding tail of a row (row_len - sum(doc_lens)) is one extra segment.

    >>> segment_boundaries([[3, 5], [2, 2]], row_len=8)[0]
    [3, 8, 10, 12, 16]
    """
    seg_lens = row_segments(doc_lens_per_row, row_len)
    cu = cu_seqlens(seg_lens)
    return cu[1:].tolist(), cu, max(seg_lens, default=0)


def varlen_meta(doc_lens_per_row: Sequence[Sequence[int] | np.ndarray], row_len: int) -> VarlenMeta:
    return VarlenMeta.from_rows(doc_lens_per_row, row_len)


@dataclass(frozen=True, slots=True)
class MicroBatch:
    tokens_T: torch.Tensor  # (T,) int64, T = num_rows * row_len
    positions_T: torch.Tensor  # (T,) int64, restart at 0 at every segment
    labels_T: torch.Tensor  # (T,) int64, IGNORE_INDEX where nothing is trained
    segment_ids_T: torch.Tensor  # (T,) int64, index of the segment (document or padding tail) of each token
    target_idx_N: torch.Tensor  # (N,) int64, the tokens that have a label (built here, so no device sync)
    meta: VarlenMeta
    num_tokens: int  # real (non-pad) tokens
    num_targets: int  # tokens with a label
    num_docs: int  # documents with at least one label (the denominator of --loss-average sample)
    # context parallel: targets of each segment over the whole micro-batch (this rank holds only a share)
    segment_targets_S: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> MicroBatch:
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return dataclasses.replace(
            self,
            tokens_T=move(self.tokens_T),
            positions_T=move(self.positions_T),
            labels_T=move(self.labels_T),
            segment_ids_T=move(self.segment_ids_T),
            target_idx_N=move(self.target_idx_N),
            meta=(
                self.meta.to(device)
                if hasattr(self.meta, "to")  # a context-parallel CPMeta
                else dataclasses.replace(self.meta, cu_seqlens=move(self.meta.cu_seqlens))
            ),
            segment_targets_S=None if self.segment_targets_S is None else move(self.segment_targets_S),
        )


def _row_docs(pack: Pack) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split a pack into (ids, loss_mask) per document using the index's doc_lens (never scanning for EOD)."""
    ends = cumulative_ends(pack.doc_lens, leading_zero=True)
    if ends[-1] != len(pack.ids):
        raise ValueError(f"pack doc_lens sum to {ends[-1]} but it holds {len(pack.ids)} tokens")
    return [(pack.ids[a:b], pack.loss_mask[a:b]) for a, b in zip(ends[:-1], ends[1:], strict=True)]


def _pad_docs(ids: np.ndarray, mask: np.ndarray, lens: np.ndarray, multiple: int, pad_id: int):
    """Each document followed by pad tokens up to a multiple of `multiple` (never targets), as a
    `packer build --cp-size N` build planned it. lens [3, 4], multiple 4: a a a P b b b b -> lens [4, 4]."""
    padded = -(-lens // multiple) * multiple
    if (padded == lens).all():
        return ids, mask, lens
    starts = np.concatenate([[0], np.cumsum(padded)[:-1]])
    where = np.repeat(starts, lens) + (np.arange(len(ids)) - np.repeat(np.cumsum(lens) - lens, lens))
    out_ids = np.full(int(padded.sum()), pad_id, dtype=np.int64)
    out_mask = np.zeros(int(padded.sum()), dtype=np.uint8)
    out_ids[where], out_mask[where] = ids, mask
    return out_ids, out_mask, padded


def collate(
    packs: Sequence[Pack], row_len: int, pad_id: int, layout: Layout = "packed", pad_multiple: int = 1
) -> MicroBatch:
    """Build one micro-batch from packs. `packed`: one row per pack; `padded`: one row per document.

    `pad_multiple` > 1 (packed only): every document is followed by pad tokens up to a multiple of it, the
    layout context parallelism needs (`packer build --cp-size N` packed the documents so that this fits).
    The pad tokens belong to their document's segment, come after all of its real tokens (so no real token
    attends to them) and are never targets.
    """
    if pad_multiple < 1:
        raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
    if layout == "packed":
        rows = [(p.ids, p.loss_mask, np.asarray(p.doc_lens, dtype=np.int64)) for p in packs]
        if pad_multiple > 1:
            rows = [_pad_docs(*row, pad_multiple, pad_id) for row in rows]
    elif layout == "padded":
        rows = [(ids, mask, np.array([len(ids)])) for p in packs for ids, mask in _row_docs(p) if len(ids)]
    else:
        raise ValueError(f"unknown layout {layout!r}; use 'packed' or 'padded'")

    n_rows = len(rows)
    T = n_rows * row_len
    tokens = np.full(T, pad_id, dtype=np.int64)
    labels = np.full(T, IGNORE_INDEX, dtype=np.int64)
    targets = np.zeros(T, dtype=bool)  # targets[i]: tokens[i] is trained on
    for r, (ids, mask, lens) in enumerate(rows):
        off = r * row_len
        if lens.sum() != len(ids) or len(mask) != len(ids):
            raise ValueError(
                f"row {r}: doc_lens sum to {lens.sum()}, but there are {len(ids)} ids and {len(mask)} "
                f"loss-mask values; run `packer verify` on the data"
            )
        if len(ids) > row_len:
            raise ValueError(
                f"a {'pack' if layout == 'packed' else 'document'} of {len(ids)} tokens does not fit "
                f"--seq-length {row_len}; pass --seq-length >= the packed seq_length of the data"
            )
        tokens[off : off + len(ids)] = ids
        targets[off : off + len(ids)] = np.asarray(mask, dtype=bool)

    actual, cu, max_seqlen = segment_boundaries([lens for _, _, lens in rows], row_len)
    seg_lens = np.diff(cu).astype(np.int64)
    starts = cu[:-1].astype(np.int64)
    segment_ids = np.repeat(np.arange(len(seg_lens)), seg_lens)  # (T,)
    positions = np.arange(T, dtype=np.int64) - np.repeat(starts, seg_lens)

    # label[i] = tokens[i+1] when i+1 is in the same segment and is a target; pad tokens are never targets.
    same_seg = segment_ids[:-1] == segment_ids[1:]
    keep = same_seg & targets[1:]
    labels[:-1][keep] = tokens[1:][keep]

    num_tokens = int(sum(len(p.ids) for p in packs))
    docs_with_targets = np.unique(segment_ids[:-1][keep]).size
    meta = VarlenMeta(
        cu_seqlens=torch.from_numpy(cu),
        max_seqlen=max_seqlen,
        actual_seq_len=actual,
        num_rows=n_rows,
        row_len=row_len,
    )
    return MicroBatch(
        tokens_T=torch.from_numpy(tokens),
        positions_T=torch.from_numpy(positions),
        labels_T=torch.from_numpy(labels),
        segment_ids_T=torch.from_numpy(segment_ids),
        target_idx_N=torch.from_numpy(np.flatnonzero(labels != IGNORE_INDEX)),
        meta=meta,
        num_tokens=num_tokens,
        num_targets=int(keep.sum()),
        num_docs=int(docs_with_targets),
    )


class PackOrder:
    """Which packs each rank reads: a seeded shuffle per epoch, rank r takes packs r, r+W, r+2W, ...

    Every rank gets the same number of micro-batches per epoch (the remainder is dropped), so ranks stay in
    lockstep and the position (epoch, index) is the same on every rank and is all a checkpoint needs.
    """

    def __init__(self, n_packs: int, micro_batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        per_rank = n_packs // world_size
        if per_rank < micro_batch_size:
            raise ValueError(
                f"the data has {n_packs} packs, fewer than --micro-batch-size {micro_batch_size} x "
                f"{world_size} ranks; lower --micro-batch-size or build more data"
            )
        self.n_packs, self.B, self.seed, self.rank, self.W = n_packs, micro_batch_size, seed, rank, world_size
        self.per_epoch = per_rank // micro_batch_size * micro_batch_size  # packs each rank reads per epoch
        self.epoch, self.index = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_packs)
        return perm[self.rank :: self.W][: self.per_epoch]

    def next(self) -> list[int]:
        if self.index + self.B > self.per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        idx = self._order[self.index : self.index + self.B].tolist()
        self.index += self.B
        return idx

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._epoch_order(self.epoch)
