"""MMIDIDX writer/reader: round trips, the byte layout, megatron-core compatibility, atomic commits."""

from __future__ import annotations

import hashlib
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest

import packer.indexed as indexed
from packer.indexed import (
    DTYPE_CODES,
    HEADER,
    MAGIC,
    VERSION,
    IndexedDataset,
    IndexedDatasetWriter,
    data_path,
    index_path,
    token_dtype,
)
from packer.manifest import DatasetError, MissingFileError


def random_docs(rng: np.random.Generator, n_docs: int, max_seqs: int, max_len: int, hi: int) -> list[list[np.ndarray]]:
    """n_docs documents of 0..max_seqs sequences of 0..max_len ids in [0, hi]."""
    return [
        [rng.integers(0, hi + 1, rng.integers(0, max_len + 1)) for _ in range(rng.integers(0, max_seqs + 1))]
        for _ in range(n_docs)
    ]


def write(prefix: Path, dtype, docs: list[list[np.ndarray]], bulk: bool = False) -> None:
    with IndexedDatasetWriter(prefix, dtype) as w:
        if bulk:  # the build's path: all sequences at once, then all document ends at once
            seqs = [s for d in docs for s in d]
            flat = np.concatenate(seqs) if seqs else np.zeros(0, np.int64)
            w.add_sequences(flat, [s.size for s in seqs])
            w.end_documents([len(d) for d in docs])
        else:
            for d in docs:
                for s in d:
                    w.add_sequence(s)
                w.end_document()
        assert w.sequence_count == sum(len(d) for d in docs)
        assert w.document_count == len(docs)
        w.finalize()
        w.commit()


def check_reads(prefix: Path, dtype, docs: list[list[np.ndarray]]) -> None:
    ds = IndexedDataset(prefix)
    seqs = [s for d in docs for s in d]
    assert ds.dtype == np.dtype(dtype)
    assert len(ds) == len(seqs)
    assert ds.num_documents == len(docs)
    np.testing.assert_array_equal(ds.sequence_lengths, [s.size for s in seqs])
    np.testing.assert_array_equal(ds.document_indices, np.concatenate([[0], np.cumsum([len(d) for d in docs])]))
    for i, s in enumerate(seqs):
        got = ds.get(i)
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got, s)
    for d, seqs_d in enumerate(docs):
        ids, lens = ds.read_document(d)
        np.testing.assert_array_equal(lens, [s.size for s in seqs_d])
        np.testing.assert_array_equal(ids, np.concatenate(seqs_d) if seqs_d else np.zeros(0))
    assert ds.bin_bytes == sum(s.size for s in seqs) * np.dtype(dtype).itemsize


@pytest.mark.parametrize("dtype,hi", [(np.uint16, 65535), (np.int32, 2**31 - 1), (np.uint8, 255)])
@pytest.mark.parametrize("seed", range(4))
def test_round_trip(tmp_path, dtype, hi, seed):
    rng = np.random.default_rng(seed)
    docs = random_docs(rng, n_docs=int(rng.integers(1, 40)), max_seqs=6, max_len=30, hi=hi)
    write(tmp_path / "a", dtype, docs)
    check_reads(tmp_path / "a", dtype, docs)
    write(tmp_path / "b", dtype, docs, bulk=True)
    check_reads(tmp_path / "b", dtype, docs)
    for p in (data_path, index_path):  # bulk and one-by-one writes are byte-identical
        assert p(tmp_path / "a").read_bytes() == p(tmp_path / "b").read_bytes()


@pytest.mark.parametrize("docs", [[], [[]], [[], [], []]], ids=["no documents", "one empty", "three empty"])
def test_empty_sequence_lists(tmp_path, docs):
    write(tmp_path / "e", np.uint16, docs)
    check_reads(tmp_path / "e", np.uint16, docs)
    assert data_path(tmp_path / "e").stat().st_size == 0


def test_document_with_many_sequences(tmp_path):
    rng = np.random.default_rng(7)
    docs = [[rng.integers(0, 50000, rng.integers(1, 5)) for _ in range(3000)], [np.array([1, 2, 3])]]
    write(tmp_path / "m", np.uint16, docs, bulk=True)
    check_reads(tmp_path / "m", np.uint16, docs)


def test_spill_across_chunks(tmp_path, monkeypatch):
    """Index columns are spilled and streamed in chunks; pointers must carry over chunk boundaries."""
    monkeypatch.setattr(indexed, "_CHUNK", 7)
    rng = np.random.default_rng(3)
    docs = random_docs(rng, n_docs=50, max_seqs=5, max_len=9, hi=60000)
    write(tmp_path / "a", np.uint16, docs)
    check_reads(tmp_path / "a", np.uint16, docs)
    write(tmp_path / "b", np.uint16, docs, bulk=True)
    check_reads(tmp_path / "b", np.uint16, docs)


def test_header_bytes_by_hand(tmp_path):
    docs = [[np.array([5, 6, 7]), np.array([8])], [np.array([9, 10])]]
    write(tmp_path / "h", np.uint16, docs)
    raw = index_path(tmp_path / "h").read_bytes()
    assert raw[0:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack("<Q", raw[9:17]) == (1,)  # version
    assert raw[17] == 8  # uint16
    assert struct.unpack("<Q", raw[18:26]) == (3,)  # sequences
    assert struct.unpack("<Q", raw[26:34]) == (3,)  # document_indices entries = documents + 1
    assert struct.unpack("<3i", raw[34:46]) == (3, 1, 2)  # sequence_lengths
    assert struct.unpack("<3q", raw[46:70]) == (0, 6, 8)  # byte pointers into .bin (uint16: 2 bytes/id)
    assert struct.unpack("<3q", raw[70:94]) == (0, 2, 3)  # document_indices
    assert len(raw) == 94
    assert data_path(tmp_path / "h").read_bytes() == np.array([5, 6, 7, 8, 9, 10], "<u2").tobytes()


def test_dtype_codes_match_megatron():
    assert MAGIC == b"MMIDIDX\x00\x00"
    assert {k: np.dtype(v).name for k, v in DTYPE_CODES.items()} == {
        1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float64", 7: "float32", 8: "uint16"
    }
    assert token_dtype(50257) is np.uint16
    assert token_dtype(65499) is np.uint16
    assert token_dtype(65500) is np.int32
    assert token_dtype(128256) is np.int32


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_megatron_core_reads_our_files(tmp_path, dtype, megatron_indexed):
    rng = np.random.default_rng(11)
    hi = 65535 if dtype is np.uint16 else 200000
    docs = random_docs(rng, n_docs=30, max_seqs=5, max_len=40, hi=hi)
    docs = [[s for s in d if s.size] or [np.array([1])] for d in docs]  # Megatron data has no empty sequences
    write(tmp_path / "m", dtype, docs, bulk=True)
    ours = IndexedDataset(tmp_path / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = megatron_indexed(str(tmp_path / "m"))
        assert len(theirs) == len(ours)
        np.testing.assert_array_equal(theirs.sequence_lengths, ours.sequence_lengths)
        np.testing.assert_array_equal(theirs.document_indices, ours.document_indices)
        for i in range(len(ours)):
            got = theirs[i]
            assert got.dtype == np.dtype(dtype)
            np.testing.assert_array_equal(got, ours.get(i))


def test_exception_inside_with_leaves_nothing(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(RuntimeError, match="boom"), IndexedDatasetWriter(tmp_path / "out" / "x", np.uint16) as w:
        w.add_sequence(np.arange(10))
        w.end_document()
        raise RuntimeError("boom")
    assert os.listdir(tmp_path / "out") == []


def test_exception_after_finalize_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), IndexedDatasetWriter(tmp_path / "x", np.uint16) as w:
        w.add_sequence(np.arange(10))
        w.end_document()
        w.finalize()
        raise RuntimeError("after finalize")
    assert os.listdir(tmp_path) == []


def test_without_commit_nothing_is_visible(tmp_path):
    with IndexedDatasetWriter(tmp_path / "x", np.uint16) as w:
        w.add_sequence(np.arange(3))
        w.end_document()
        w.finalize()
    assert os.listdir(tmp_path) == []


def test_failed_rewrite_keeps_previous_files(tmp_path):
    write(tmp_path / "x", np.uint16, [[np.array([1, 2])]])
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(RuntimeError), IndexedDatasetWriter(tmp_path / "x", np.uint16) as w:
        w.add_sequence(np.arange(5))
        raise RuntimeError
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_commit_requires_finalize(tmp_path):
    with IndexedDatasetWriter(tmp_path / "x", np.uint16) as w, pytest.raises(RuntimeError, match="finalize"):
        w.commit()


def test_writer_validation(tmp_path):
    with IndexedDatasetWriter(tmp_path / "x", np.uint16) as w:
        with pytest.raises(ValueError, match="1-D"):
            w.add_sequence(np.zeros((2, 2), dtype=np.int64))
        with pytest.raises(ValueError, match="out of range"):
            w.add_sequence(np.array([65536]))
        with pytest.raises(ValueError, match="out of range"):
            w.add_sequence(np.array([-1]))
        with pytest.raises(ValueError, match="out of range"):
            w.add_sequences(np.array([70000, 5]), [2])
        with pytest.raises(ValueError, match="sum to"):
            w.add_sequences(np.arange(5), [2, 2])
        w.add_sequences(np.arange(5), [2, 3])
        with pytest.raises(ValueError):
            w.end_documents([3])  # two sequences were added, not three
        with pytest.raises(ValueError):
            w.end_documents([1])  # the other one would silently join this document
        with pytest.raises(ValueError):
            w.end_documents([3, -1])
        assert w.document_count == 0
        w.end_documents([1, 1])
        assert w.document_count == 2
    with pytest.raises(ValueError, match="no MMIDIDX code"):
        IndexedDatasetWriter(tmp_path / "y", np.uint32)
    # Ids of a dtype that always fits skip the range pass; int32 ids into an int32 dataset of ids >= 0 do not.
    with IndexedDatasetWriter(tmp_path / "z", np.int32, min_value=0) as w:
        with pytest.raises(ValueError, match="out of range"):
            w.add_sequences(np.array([3, -1], dtype=np.int32), [2])
        w.add_sequences(np.array([0, 65535], dtype=np.uint16), [2])


@pytest.mark.parametrize("bulk", [False, True])
def test_checksums_are_of_the_bytes_written(tmp_path, monkeypatch, bulk):
    """sha256() hashes .bin and .idx as they are written: equal to reading the finished files back."""
    monkeypatch.setattr(indexed, "_CHUNK", 7)  # the .idx written in many pieces
    rng = np.random.default_rng(5)
    docs = random_docs(rng, n_docs=30, max_seqs=5, max_len=9, hi=60000)
    w = IndexedDatasetWriter(tmp_path / "h", np.uint16)
    with w:
        for doc in docs:
            if bulk and doc:
                w.add_sequences(np.concatenate(doc).astype(np.int64), [s.size for s in doc])
            else:
                for s in doc:
                    w.add_sequence(s)
            w.end_document()
        with pytest.raises(RuntimeError, match="finalize"):
            w.sha256()
        w.finalize()
        digests = w.sha256()
        assert set(digests) == {w.tmp_bin, w.tmp_idx}
        for path, digest in digests.items():
            assert digest == hashlib.sha256(path.read_bytes()).hexdigest(), path.name


@pytest.fixture
def small_dataset(tmp_path) -> Path:
    write(tmp_path / "s", np.uint16, [[np.array([1, 2, 3]), np.array([4])], [np.array([5, 6])]])
    return tmp_path / "s"


def test_reader_rejects_bad_magic(small_dataset):
    p = index_path(small_dataset)
    raw = bytearray(p.read_bytes())
    raw[0:7] = b"NOTIDX!"
    p.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match="bad magic"):
        IndexedDataset(small_dataset)


def test_reader_rejects_bad_version_and_code(small_dataset):
    p = index_path(small_dataset)
    good = p.read_bytes()
    p.write_bytes(good[:9] + struct.pack("<Q", 2) + good[17:])
    with pytest.raises(DatasetError, match="version"):
        IndexedDataset(small_dataset)
    p.write_bytes(good[:17] + bytes([9]) + good[18:])
    with pytest.raises(DatasetError, match="dtype code"):
        IndexedDataset(small_dataset)


@pytest.mark.parametrize("keep", [0, 10, 33, 34, 60, -1])
def test_reader_rejects_truncated_index(small_dataset, keep):
    p = index_path(small_dataset)
    raw = p.read_bytes()
    p.write_bytes(raw[:keep] if keep >= 0 else raw + b"\x00")
    with pytest.raises(DatasetError, match="too short|truncated or corrupt"):
        IndexedDataset(small_dataset)


def test_reader_missing_files(small_dataset):
    data_path(small_dataset).unlink()
    with pytest.raises(MissingFileError, match="does not exist"):
        IndexedDataset(small_dataset)
    with pytest.raises(MissingFileError, match="does not exist"):
        IndexedDataset(small_dataset.with_name("nope"))


def _patched(prefix: Path, offset: int, data: bytes) -> None:
    p = index_path(prefix)
    raw = bytearray(p.read_bytes())
    raw[offset : offset + len(data)] = data
    p.write_bytes(bytes(raw))


# small_dataset: S = 3 sequences [3, 1, 2] of uint16, D = 3 ([0, 2, 3]): lengths at 34, pointers at 46, docs at 70
@pytest.mark.parametrize(("patch", "check"), [
    (lambda p: index_path(p).write_bytes(np.random.default_rng(0).bytes(200)), "bad magic"),
    (lambda p: index_path(p).write_bytes(HEADER.pack(MAGIC, VERSION, 8, 2**63 - 1, 2**63 - 1)), "file size"),
    (lambda p: _patched(p, 34, struct.pack("<i", -3)), "sequence lengths: sequence 0 has length -3"),
    (lambda p: _patched(p, 34, struct.pack("<i", 2)), "sequence pointers: pointer 1 is 6"),
    (lambda p: _patched(p, 46 + 8, struct.pack("<q", 2**62)), "sequence pointers: pointer 1"),
    (lambda p: data_path(p).write_bytes(data_path(p).read_bytes() + b"\0\0"), "file size: 14 bytes but"),
    (lambda p: data_path(p).write_bytes(data_path(p).read_bytes()[:-1]), "file size: 11 bytes but"),
    (lambda p: _patched(p, 70 + 8, struct.pack("<q", 5)), "document indices: must rise from 0 to the sequence count 3"),
    (lambda p: _patched(p, 70, struct.pack("<q", 1)), "they run from 1 to 3"),
    (lambda p: _patched(p, 70 + 8, struct.pack("<q", -1)), "entry 1 falls from 0 to -1"),
])
def test_reader_checks_the_index_without_reading_bin(small_dataset, patch, check):
    """Garbage, absurd counts, inconsistent lengths/pointers/documents: always DatasetError naming the check."""
    patch(small_dataset)
    with pytest.raises(DatasetError, match=check):
        IndexedDataset(small_dataset)


def test_reader_error_names_the_build(small_dataset):
    _patched(small_dataset, 34, struct.pack("<i", 2))
    with pytest.raises(DatasetError, match=r"s\.idx: sequence pointers: .*run `packer verify /x/build`"):
        IndexedDataset(small_dataset, build="/x/build")
