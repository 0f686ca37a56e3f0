"""Read a packed build: one `Pack` (ids, loss mask, document lengths) per Megatron document."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from packer.boundaries import actual_seq_len, cu_seqlens, cumulative_ends
from packer.indexed import IndexedDataset
from packer.manifest import loss_mask_prefix, read_manifest
from packer.records import Pack


@dataclass(frozen=True, slots=True)
class PackGroup:
    """Consecutive packs first .. first+n-1, flat: their tokens and masks back to back (views of the files)."""

    first: int  # index of the group's first pack
    ids: np.ndarray  # (T,) in the token dtype
    mask: np.ndarray  # (T,) uint8
    seq_lens: np.ndarray  # (n_samples,) int64, pack by pack
    samples_per_pack: np.ndarray  # (n,) int64

    @property
    def doc_index(self) -> np.ndarray:
        """[0, end of pack 0, ...] into seq_lens."""
        return cumulative_ends(self.samples_per_pack, leading_zero=True)


class PackedDataset:
    """Packs of `packer build` output, read through the index alone (no EOD scanning).

        ds = PackedDataset("out/alpaca")
        pack = ds[0]                      # Pack(ids (T,), loss_mask (T,), doc_lens (n,))
        ds.actual_seq_len(0)              # [len0, len0+len1, ...] for npu_fusion_attention
        ds.cu_seqlens(0)                  # int32 [0, len0, ...] for flash-attn varlen
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = os.fspath(prefix)
        self.manifest = read_manifest(prefix)
        self.tokens = IndexedDataset(prefix)
        self.loss_mask = IndexedDataset(loss_mask_prefix(prefix))
        tok = self.manifest["tokenizer"]
        self.seq_length: int = int(self.manifest["config"]["seq_length"])
        self.eod_id: int = int(tok["eod_id"])
        self.pad_id: int = int(tok["pad_id"] if tok.get("pad_id") is not None else tok["eod_id"])
        self.bos_id: int | None = tok.get("bos_id")
        self.vocab_size: int = int(tok["vocab_size"])
        if len(self.tokens) != len(self.loss_mask) or self.tokens.num_documents != self.loss_mask.num_documents:
            raise ValueError(
                f"{self.prefix}: token and loss-mask indexes disagree "
                f"({len(self.tokens)} vs {len(self.loss_mask)} sequences); run `packer verify {self.prefix}`"
            )

    def __len__(self) -> int:
        return self.tokens.num_documents

    def doc_lens(self, i: int) -> np.ndarray:
        s0, s1 = self.tokens.document_sequences(i)
        return self.tokens.sequence_lengths[s0:s1]

    def __getitem__(self, i: int) -> Pack:
        if not -len(self) <= i < len(self):
            raise IndexError(f"pack {i} out of range for {len(self)} packs")
        i %= len(self)
        ids, lens = self.tokens.read_document(i)
        mask, _ = self.loss_mask.read_document(i)
        return Pack(ids=ids.astype(np.int64), loss_mask=np.array(mask, dtype=np.uint8), doc_lens=lens.astype(np.int32))

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def groups(self, max_tokens: int = 1 << 22) -> Iterator[PackGroup]:
        """All packs in order, as groups of whole consecutive packs of about `max_tokens` tokens (one pack alone
        may be more): memory is bounded by the group, whatever the build's size."""
        tok, mask = self.tokens, self.loss_mask
        lens, docs = tok.sequence_lengths, tok.document_indices
        ends = cumulative_ends(lens, leading_zero=True)  # token offset of each sequence start, and the total
        pack_end = ends[docs[1:]]  # token offset after each pack
        d = 0
        while d < len(self):
            t0 = int(ends[docs[d]])
            d1 = min(max(d + 1, int(np.searchsorted(pack_end, t0 + max_tokens, side="right"))), len(self))
            t1 = int(pack_end[d1 - 1])
            yield PackGroup(first=d, ids=tok.read(t0 * tok.dtype.itemsize, t1 - t0), mask=mask.read(t0, t1 - t0),
                            seq_lens=lens[docs[d] : docs[d1]].astype(np.int64),
                            samples_per_pack=np.diff(docs[d : d1 + 1]))
            tok.release()  # memory stays bounded by the group, not the build (the group's arrays stay valid)
            mask.release()
            d = d1

    def actual_seq_len(self, i: int) -> list[int]:
        return actual_seq_len(self.doc_lens(i))

    def cu_seqlens(self, i: int) -> np.ndarray:
        return cu_seqlens(self.doc_lens(i))
