"""Document boundaries: lengths -> cumulative ends, the one representation used end to end."""

from __future__ import annotations

import numpy as np
import pytest

from packer.boundaries import actual_seq_len, cu_seqlens, cumulative_ends


def test_hand_written_example():
    assert cumulative_ends([2, 2, 0, 2, 2]).tolist() == [2, 4, 4, 6, 8]
    assert actual_seq_len([2, 2, 0, 2, 2]) == [2, 4, 4, 6, 8]
    cu = cu_seqlens([2, 2, 0, 2, 2])
    assert cu.dtype == np.int32
    assert cu.tolist() == [0, 2, 4, 4, 6, 8]


def test_actual_seq_len_is_plain_ints():
    out = actual_seq_len(np.array([3, 5], dtype=np.int32))
    assert out == [3, 8]
    assert all(type(x) is int for x in out)


def test_empty():
    assert cumulative_ends([]).tolist() == []
    assert cumulative_ends([], leading_zero=True).tolist() == [0]
    assert actual_seq_len([]) == []
    cu = cu_seqlens([])
    assert cu.dtype == np.int32 and cu.tolist() == [0]


@pytest.mark.parametrize("bad", [[1, -1, 2], np.array([-5])])
def test_negative_rejected(bad):
    with pytest.raises(ValueError, match=">= 0"):
        cumulative_ends(bad)
    with pytest.raises(ValueError):
        cu_seqlens(bad)


def test_two_d_rejected():
    with pytest.raises(ValueError, match="1-D"):
        cumulative_ends([[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="1-D"):
        cu_seqlens(np.ones((2, 2), dtype=np.int64))


def test_int32_overflow_rejected():
    with pytest.raises(ValueError, match="int32"):
        cu_seqlens([2**31 - 1, 1])
    assert cu_seqlens([2**31 - 2, 1])[-1] == 2**31 - 1


@pytest.mark.parametrize("seed", range(20))
def test_round_trip_random(seed):
    rng = np.random.default_rng(seed)
    lens = rng.integers(0, 50, rng.integers(0, 30))
    cu = cu_seqlens(lens)
    assert cu[0] == 0 and cu.size == lens.size + 1
    np.testing.assert_array_equal(np.diff(cu), lens)
    np.testing.assert_array_equal(cu[1:], actual_seq_len(lens))
    assert (np.diff(cu) >= 0).all()
