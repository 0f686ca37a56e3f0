"""Read a packed build: one `Pack` (ids, loss mask, document lengths) per Megatron document."""

from __future__ import annotations

import os

import numpy as np

from packer.boundaries import actual_seq_len, cu_seqlens
from packer.indexed import IndexedDataset
from packer.manifest import loss_mask_prefix, read_manifest
from packer.records import Pack


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

    def actual_seq_len(self, i: int) -> list[int]:
        return actual_seq_len(self.doc_lens(i))

    def cu_seqlens(self, i: int) -> np.ndarray:
        return cu_seqlens(self.doc_lens(i))
