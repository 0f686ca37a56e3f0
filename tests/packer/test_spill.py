"""The spill: samples written in arrival order come back, in any order, exactly as they went in."""

from __future__ import annotations

import os

import numpy as np
import pytest

import packer.spill as spill_mod
from packer.spill import SampleSpill


def spilled(tmp_path, dtype, lengths, seed=0):
    """(spill, every sample's ids and mask) for samples of `lengths`, added in chunks of 3."""
    rng = np.random.default_rng(seed)
    high = min(np.iinfo(dtype).max, 200_000)
    samples = [
        (rng.integers(0, high, n).astype(dtype), rng.integers(0, 2, n).astype(np.uint8)) for n in lengths
    ]
    spill = SampleSpill(tmp_path, np.dtype(dtype))
    for k in range(0, len(samples), 3):
        part = samples[k : k + 3]
        spill.add(
            np.concatenate([s[0] for s in part]).astype(np.int64),
            np.concatenate([s[1] for s in part]),
            np.array([s[0].size for s in part]),
        )
    return spill, samples


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_gather_returns_samples_in_the_asked_order(tmp_path, dtype):
    lengths = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]
    spill, samples = spilled(tmp_path, dtype, lengths)
    with spill:
        assert spill.seal().tolist() == lengths
        starts = np.cumsum(lengths) - lengths
        order = np.array([5, 0, 1, 2, 11, 7, 8, 3])  # 0, 1, 2 and 7, 8 follow each other in the spill too
        with spill.reader() as r:
            ids, mask = r.gather(starts[order], np.array(lengths)[order])
            empty_ids, empty_mask = r.gather(np.zeros(0, np.int64), np.zeros(0, np.int64))
        assert ids.dtype == dtype and mask.dtype == np.uint8
        assert ids.tolist() == np.concatenate([samples[j][0] for j in order]).tolist()
        assert mask.tolist() == np.concatenate([samples[j][1] for j in order]).tolist()
        assert empty_ids.size == 0 and empty_ids.dtype == dtype and empty_mask.size == 0


def test_neighbours_in_the_spill_are_read_as_one_range(tmp_path, monkeypatch):
    """starts [0, 3, 9], lengths [3, 2, 4]: samples 0 and 1 are one pread, sample 2 another."""
    spill, samples = spilled(tmp_path, np.uint16, [3, 2, 4, 4])
    reads = []
    monkeypatch.setattr(
        spill_mod.os, "pread", lambda fd, n, at, f=os.pread: (reads.append((at, n)), f(fd, n, at))[1]
    )
    with spill:
        spill.seal()
        with spill.reader() as r:
            ids, _ = r.gather(np.array([0, 3, 9]), np.array([3, 2, 4]))
    assert reads == [(0, 5 * 3), (9 * 3, 4 * 3)]  # 3 bytes a token: uint16 id + mask byte
    assert ids.tolist() == np.concatenate([samples[0][0], samples[1][0], samples[3][0]]).tolist()


def test_a_short_read_is_read_on(tmp_path, monkeypatch):
    """pread may return fewer bytes than asked (Linux stops at 2 GiB): the gather reads the rest."""
    spill, samples = spilled(tmp_path, np.uint16, [700, 5, 300])
    monkeypatch.setattr(spill_mod.os, "pread", lambda fd, n, at, f=os.pread: f(fd, min(n, 1000), at))
    with spill:
        spill.seal()
        with spill.reader() as r:
            ids, mask = r.gather(np.array([705, 0]), np.array([300, 705]))
    assert ids.tolist() == np.concatenate([samples[2][0], samples[0][0], samples[1][0]]).tolist()
    assert mask.tolist() == np.concatenate([samples[2][1], samples[0][1], samples[1][1]]).tolist()


def test_a_sample_past_the_end_of_the_spill_is_an_error(tmp_path):
    spill, _ = spilled(tmp_path, np.uint16, [4])
    with spill:
        spill.seal()
        with spill.reader() as r, pytest.raises(RuntimeError, match="before a sample's end"):
            r.gather(np.array([2]), np.array([5]))


def test_the_folder_is_removed_on_exit(tmp_path):
    spill, _ = spilled(tmp_path, np.uint16, [2, 2])
    with spill:
        assert sorted(p.name for p in spill.dir.iterdir()) == ["samples"]
    assert list(tmp_path.iterdir()) == []
