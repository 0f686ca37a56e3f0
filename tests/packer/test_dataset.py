"""PackedDataset: one Pack per Megatron document, boundaries read from the index alone."""

from __future__ import annotations

import json
import struct
import warnings

import numpy as np
import pytest

from packer.dataset import DatasetError, PackedDataset
from packer.indexed import IndexedDatasetWriter
from packer.manifest import loss_mask_prefix, manifest_path

ALPACA = "alpaca/stanford_alpaca_pr152_alpaca_5000.json"

# eod = 0; three packs of 2, 1 and 3 samples
PACKS = [
    [([5, 0], [1, 1]), ([6, 0], [0, 1])],
    [([7, 8, 9, 0], [0, 0, 1, 1])],
    [([1, 0], [1, 1]), ([2, 3, 0], [0, 1, 1]), ([4, 0], [0, 1])],
]


@pytest.fixture
def hand(tmp_path, helpers):
    prefix = tmp_path / "hand"
    helpers.write_dataset(prefix, PACKS, eod=0, vocab=10, seq_length=8)
    return prefix


def test_packs(hand):
    ds = PackedDataset(hand)
    assert len(ds) == 3
    assert (ds.seq_length, ds.eod_id, ds.pad_id, ds.bos_id, ds.vocab_size) == (8, 0, 0, None, 10)
    for p, expected in zip(ds, PACKS, strict=True):
        assert p.ids.dtype == np.int64 and p.loss_mask.dtype == np.uint8 and p.doc_lens.dtype == np.int32
        assert p.ids.tolist() == [t for ids, _ in expected for t in ids]
        assert p.loss_mask.tolist() == [m for _, mask in expected for m in mask]
        assert p.doc_lens.tolist() == [len(ids) for ids, _ in expected]
    assert ds[-1].ids.tolist() == ds[2].ids.tolist()
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(IndexError):
        ds[-4]


def test_boundaries(hand):
    ds = PackedDataset(hand)
    assert ds.actual_seq_len(2) == [2, 5, 7]
    cu = ds.cu_seqlens(2)
    assert cu.dtype == np.int32 and cu.tolist() == [0, 2, 5, 7]
    assert ds.doc_lens(1).tolist() == [4]


def test_pack_is_a_copy(hand):
    ds = PackedDataset(hand)
    p = ds[0]
    p.loss_mask[:] = 7  # the memory map underneath must not change
    assert ds[0].loss_mask.tolist() == [1, 1, 0, 1]


def test_missing_manifest(hand):
    manifest_path(hand).unlink()
    with pytest.raises(FileNotFoundError, match="did not complete") as e:  # also a DatasetError
        PackedDataset(hand)
    assert isinstance(e.value, DatasetError) and isinstance(e.value, ValueError)


def _patch(path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def _manifest_edit(prefix, f) -> None:
    m = json.loads(manifest_path(prefix).read_text())
    f(m)
    manifest_path(prefix).write_text(json.dumps(m))


# hand: S = 6 samples, D = 4; each .idx has lengths at 34, pointers at 58, document indices at 106
@pytest.mark.parametrize(("corrupt", "check"), [
    (lambda p: _patch(p.with_name("hand_loss_mask.idx"), 17, bytes([2])), "hand_loss_mask.idx: dtype: int8, but a loss mask is uint8"),
    (lambda p: _patch(p.with_name("hand.idx"), 17, bytes([3])), "hand.idx: dtype: int16, but the manifest's token_dtype is 'uint16'"),
    (lambda p: _patch(p.with_name("hand_loss_mask.idx"), 106 + 8, struct.pack("<q", 1)),
     "hand_loss_mask.idx: document indices differ from .*hand.idx's \\(first at entry 1: 1 vs 2\\)"),
    (lambda p: p.with_name("hand.idx").write_bytes(p.with_name("hand.idx").read_bytes()[:50]), "hand.idx: file size"),
    (lambda p: p.with_name("hand.bin").write_bytes(b"\0" * 3), "hand.bin: file size: 3 bytes but"),
    (lambda p: _manifest_edit(p, lambda m: m["counts"].update(packs=4)), "counts.packs = 4, but the index says 3"),
    (lambda p: _manifest_edit(p, lambda m: m["counts"].update(samples=None)), "counts.samples is None"),
    (lambda p: _manifest_edit(p, lambda m: m["config"].update(seq_length=6)), "1 packs exceed --seq-length 6"),
    (lambda p: _manifest_edit(p, lambda m: m["tokenizer"].update(pad_id=99)), "tokenizer.pad_id = 99 is outside"),
    (lambda p: _manifest_edit(p, lambda m: m["files"]["hand.idx"].update(bytes=1)), "hand.idx: 138 bytes, manifest says 1"),
    (lambda p: manifest_path(p).write_text("[" * 100_000), "nested too deeply"),
    (lambda p: manifest_path(p).write_text("[1, 2]"), "a manifest is a JSON object, this file holds an array"),
])
def test_open_refuses_a_corrupt_build(hand, corrupt, check):
    """Each check on open raises the one error type, naming the file and the check, and the fix."""
    corrupt(hand)
    with pytest.raises(DatasetError, match=check + ".*run `packer verify .*hand`"):
        PackedDataset(hand)


def test_open_does_not_read_the_payload_but_checksums_can(hand):
    _patch(hand.with_name("hand.bin"), 0, b"\x07\x00")  # token 5 -> 7: the index is untouched
    ds = PackedDataset(hand)
    assert ds[0].ids[0] == 7
    with pytest.raises(DatasetError, match="hand.bin: sha256 differs"):
        PackedDataset(hand, verify_checksums=True)


def test_mismatched_mask_index(hand):
    with IndexedDatasetWriter(loss_mask_prefix(hand), np.uint8) as w:
        w.add_sequence(np.ones(4, dtype=np.int64))
        w.end_document()
        w.finalize()
        w.commit()
    with pytest.raises(DatasetError, match=r"hand_loss_mask.idx: sequence lengths: 1 entries, .*run `packer verify"):
        PackedDataset(hand)


def test_matches_megatron_core(real_build, megatron_indexed):
    prefix = real_build("alpaca", ALPACA, "gpt2", 2048, "bfd", on_error="skip")
    ds = PackedDataset(prefix)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = megatron_indexed(prefix)
        mask = megatron_indexed(str(loss_mask_prefix(prefix)))
        np.testing.assert_array_equal(tok.document_indices, mask.document_indices)
        np.testing.assert_array_equal(tok.sequence_lengths, mask.sequence_lengths)
        assert len(tok.document_indices) - 1 == len(ds)
        for d in range(len(ds)):
            s0, s1 = int(tok.document_indices[d]), int(tok.document_indices[d + 1])
            doc_lens = tok.sequence_lengths[s0:s1]
            p = ds[d]
            np.testing.assert_array_equal(p.doc_lens, doc_lens)
            np.testing.assert_array_equal(p.ids, np.concatenate([tok[i] for i in range(s0, s1)]))
            np.testing.assert_array_equal(p.loss_mask, np.concatenate([mask[i] for i in range(s0, s1)]))
            np.testing.assert_array_equal(ds.cu_seqlens(d), np.concatenate([[0], np.cumsum(doc_lens)]))
            assert ds.actual_seq_len(d) == np.cumsum(doc_lens).tolist()
            assert p.ids.size <= ds.seq_length
