"""Read a packed build: one `Pack` (ids, loss mask, document lengths) per Megatron document."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from packer import cp
from packer.boundaries import actual_seq_len, cu_seqlens, cumulative_ends
from packer.indexed import IndexedDataset, token_dtype
from packer.manifest import (
    DatasetError,
    check_manifest,
    loss_mask_prefix,
    manifest_path,
    output_files,
    read_manifest,
    sha256_file,
)
from packer.packing import efficiency, lower_bound
from packer.records import Pack

__all__ = ["DatasetError", "PackFigures", "PackGroup", "PackedDataset", "file_problems", "pack_figures", "pack_groups",
           "structure_problems"]


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
        ds.padded_doc_lens(0)             # int32 each sample padded for context parallelism (cp_size > 1)

    Opening validates the build in O(index) time without reading the payload: the manifest's schema, both
    indexes (`IndexedDataset`), file sizes against the manifest, and the index against the manifest
    (`structure_problems`). Anything wrong raises `DatasetError`. `verify_checksums=True` also compares every
    file's sha256 with the manifest (a full read); `packer verify` checks the payload itself.
    """

    def __init__(self, prefix: str | os.PathLike, verify_checksums: bool = False):
        self.prefix = os.fspath(prefix)
        self.manifest = read_manifest(prefix)
        fields, problems = check_manifest(self.manifest, manifest_path(prefix))
        if problems:
            raise DatasetError(problems, self.prefix)
        self.tokens = IndexedDataset(prefix, build=self.prefix)
        self.loss_mask = IndexedDataset(loss_mask_prefix(prefix), build=self.prefix)
        problems = file_problems(self.prefix, self.manifest, fields, verify_checksums)
        problems += structure_problems(self.prefix, fields, self.tokens, self.loss_mask)
        if problems:
            raise DatasetError(problems, self.prefix)
        self.seq_length: int = fields["config.seq_length"]
        self.eod_id: int = fields["tokenizer.eod_id"]
        pad = fields.get("tokenizer.pad_id")
        self.pad_id: int = self.eod_id if pad is None else pad
        self.bos_id: int | None = fields.get("tokenizer.bos_id")
        self.vocab_size: int = fields["tokenizer.vocab_size"]
        # A --cp-size/--tp-size build (packer/cp.py): the section as written, None for a plain build.
        section = self.manifest.get("context_parallel")
        self.context_parallel: dict[str, Any] | None = section if isinstance(section, dict) else None
        self.cp_size: int = fields.get("context_parallel.cp_size", 1)
        self.tp_size: int = fields.get("context_parallel.tp_size", 1)
        self.pad_multiple: int = fields.get("context_parallel.multiple", 1)

    def __len__(self) -> int:
        return self.tokens.num_documents

    def doc_lens(self, i: int) -> np.ndarray:
        s0, s1 = self.tokens.document_sequences(i)
        return self.tokens.sequence_lengths[s0:s1]

    def padded_doc_lens(self, i: int) -> np.ndarray:
        """(n,) int32: pack i's sample lengths, each rounded up to a multiple of `pad_multiple` (the real ones for
        a plain build). The padding follows each sample and is never a target: doc_lens [5, 3] at CP 2 -> [8, 4]."""
        return cp.padded_lengths(self.doc_lens(i), self.pad_multiple).astype(np.int32)

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
        return pack_groups(self.tokens, self.loss_mask, max_tokens)

    def actual_seq_len(self, i: int) -> list[int]:
        return actual_seq_len(self.doc_lens(i))

    def cu_seqlens(self, i: int) -> np.ndarray:
        return cu_seqlens(self.doc_lens(i))


def pack_groups(tok: IndexedDataset, mask: IndexedDataset, max_tokens: int = 1 << 22) -> Iterator[PackGroup]:
    """`PackedDataset.groups` over two indexes with the same lengths and document indices (`verify` calls it
    before the build is known to open)."""
    lens, docs = tok.sequence_lengths, tok.document_indices
    ends = cumulative_ends(lens, leading_zero=True)  # token offset of each sequence start, and the total
    pack_end = ends[docs[1:]]  # token offset after each pack
    n, d = len(docs) - 1, 0
    while d < n:
        t0 = int(ends[docs[d]])
        d1 = min(max(d + 1, int(np.searchsorted(pack_end, t0 + max_tokens, side="right"))), n)
        t1 = int(pack_end[d1 - 1])
        yield PackGroup(first=d, ids=tok.read(t0 * tok.dtype.itemsize, t1 - t0),
                        mask=mask.read(t0 * mask.dtype.itemsize, t1 - t0),
                        seq_lens=lens[docs[d] : docs[d1]].astype(np.int64), samples_per_pack=np.diff(docs[d : d1 + 1]))
        tok.release()  # memory stays bounded by the group, not the build (the group's arrays stay valid)
        mask.release()
        d = d1


@dataclass(frozen=True, slots=True)
class PackFigures:
    packs: int
    tokens: int
    min_tokens: int  # tokens in the shortest pack (0 without packs)
    max_tokens: int
    max_samples: int  # samples in the fullest pack
    empty_samples: int
    empty_packs: int
    over: int  # packs longer than seq_length


def pack_figures(lens: np.ndarray, docs: np.ndarray, seq_length: int | None = None, chunk: int = 1 << 20
                 ) -> PackFigures:
    """Per-pack figures of a sound index (`docs` rising from 0 to len(lens)), chunk packs at a time: O(chunk)
    memory beyond the map, whatever the build's size."""
    tokens = empty_samples = empty_packs = over = max_samples = max_tokens = 0
    min_tokens = None
    n = docs.size - 1
    for a in range(0, n, chunk):
        d = docs[a : a + chunk + 1]
        seg = lens[d[0] : d[-1]]
        ends = np.concatenate([[0], np.cumsum(seg, dtype=np.int64)])
        per_pack = ends[d[1:] - d[0]] - ends[d[:-1] - d[0]]  # (chunk,) tokens of each pack
        per_pack_samples = np.diff(d)
        tokens += int(ends[-1])
        empty_samples += int((seg < 1).sum())
        empty_packs += int((per_pack_samples == 0).sum())
        over += int((per_pack > seq_length).sum()) if seq_length is not None else 0
        max_samples = max(max_samples, int(per_pack_samples.max()))
        max_tokens = max(max_tokens, int(per_pack.max()))
        min_tokens = int(per_pack.min()) if min_tokens is None else min(min_tokens, int(per_pack.min()))
    return PackFigures(n, tokens, min_tokens or 0, max_tokens, max_samples, empty_samples, empty_packs, over)


def file_problems(prefix: str, manifest: dict[str, Any], fields: dict[str, Any], checksums: bool = False) -> list[str]:
    """The four data files against the manifest's `files` section: present, listed, of the recorded size, and
    (with `checksums`, a full read) of the recorded sha256. `fields` is `check_manifest`'s."""
    problems = []
    listed = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
    for path in output_files(prefix):
        want = fields.get(f"files.{path.name}.bytes")
        try:
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif path.name not in listed:
                problems.append(f"{path}: not listed in the manifest's files")
            elif want is None:
                continue  # a malformed entry, which check_manifest reports
            elif path.stat().st_size != want:
                problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {want}")
            elif checksums and sha256_file(path) != fields.get(f"files.{path.name}.sha256"):
                problems.append(f"{path}: sha256 differs from the manifest (file changed or corrupt)")
        except OSError as e:
            problems.append(f"{path}: cannot be read ({type(e).__name__}: {e})")
    names = {p.name for p in output_files(prefix)}
    for name in listed:
        if name not in names:
            problems.append(f"{manifest_path(prefix)}: files lists {name!r}, which is no file of a build at {prefix}")
    return problems


def structure_problems(prefix: str, fields: dict[str, Any], tok: IndexedDataset, mask: IndexedDataset) -> list[str]:
    """Everything the two indexes and the manifest can be checked for without the payload: dtypes, equal
    lengths and document indices, no empty sample or pack, no pack over seq_length, and the manifest's counts,
    packing figures and special ids. `fields` is `check_manifest`'s (a field missing there is not checked)."""
    where = manifest_path(prefix)
    problems = []
    dtype_name = fields.get("token_dtype")
    if dtype_name is not None and tok.dtype.name != dtype_name:
        problems.append(f"{tok.idx_path}: dtype: {tok.dtype}, but the manifest's token_dtype is {dtype_name!r}")
    vocab = fields.get("tokenizer.vocab_size")
    if vocab is not None and dtype_name is not None and np.dtype(token_dtype(vocab)).name != dtype_name:
        problems.append(f"{where}: token_dtype {dtype_name!r}, but a vocabulary of {vocab} ids is stored as "
                        f"{np.dtype(token_dtype(vocab)).name}")
    if mask.dtype != np.uint8:
        problems.append(f"{mask.idx_path}: dtype: {mask.dtype}, but a loss mask is uint8")
    for what, a, b in (("sequence lengths", tok.sequence_lengths, mask.sequence_lengths),
                       ("document indices", tok.document_indices, mask.document_indices)):
        if a.size != b.size:
            problems.append(f"{mask.idx_path}: {what}: {b.size} entries, {tok.idx_path} has {a.size}")
        elif not np.array_equal(a, b):
            i = int(np.flatnonzero(a != b)[0])
            problems.append(f"{mask.idx_path}: {what} differ from {tok.idx_path}'s (first at entry {i}: "
                            f"{b[i]} vs {a[i]})")
    seq_length = fields.get("config.seq_length")
    f = pack_figures(tok.sequence_lengths, tok.document_indices, seq_length)
    packs, tokens = f.packs, f.tokens
    if f.empty_samples:
        problems.append(f"{tok.idx_path}: {f.empty_samples} samples are empty (a sample holds its EOD at least)")
    if f.empty_packs:
        problems.append(f"{tok.idx_path}: {f.empty_packs} packs are empty")
    if f.over:
        problems.append(f"{tok.idx_path}: {f.over} packs exceed --seq-length {seq_length} (the longest holds "
                        f"{f.max_tokens} tokens)")
    actual = {"counts.samples": len(tok), "counts.tokens": tokens, "counts.packs": packs,
              "packing.packs": packs, "eod_scan.packs": packs, "packing.seq_length": seq_length}
    if seq_length is not None:
        actual["packing.lower_bound"] = lower_bound(tokens, seq_length)
    if packs:
        actual |= {"packing.max_pack_tokens": f.max_tokens, "packing.min_pack_tokens": f.min_tokens,
                   "packing.max_docs_per_pack": f.max_samples}
    for key, value in actual.items():
        if value is not None and key in fields and fields[key] != value:
            source = "config.seq_length" if key == "packing.seq_length" else "the index"
            problems.append(f"{where}: {key} = {fields[key]}, but {source} says {value}")
    if seq_length is not None and "packing.efficiency" in fields:
        eff = efficiency(tokens, packs, seq_length)
        if not math.isclose(fields["packing.efficiency"], eff, rel_tol=1e-9, abs_tol=1e-12):
            problems.append(f"{where}: packing.efficiency = {fields['packing.efficiency']}, but the index has "
                            f"{tokens} tokens in {packs} packs of {seq_length}: {eff}")
    for key in ("eod_id", "bos_id", "pad_id", "context_parallel.pad_id"):
        value = fields.get(key if "." in key else f"tokenizer.{key}")
        if vocab is not None and value is not None and value >= vocab:
            problems.append(f"{where}: {key if '.' in key else 'tokenizer.' + key} = {value} is outside the "
                            f"vocabulary of {vocab} ids")
    # Context parallelism and the attention cost: padded packs fit, figures are the index's (packer/cp.py).
    problems += cp.index_problems(str(where), fields, tok.sequence_lengths, tok.document_indices)
    return problems
