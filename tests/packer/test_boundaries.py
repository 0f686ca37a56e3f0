"""Document boundaries: lengths -> cumulative ends, the one representation used end to end."""

from __future__ import annotations

import numpy as np
import pytest

from packer.boundaries import actual_seq_len, cu_seqlens, cumulative_ends, pack_tokens, row_segments


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


def test_pack_tokens_hand_written():
    assert pack_tokens([3, 2, 4], [0, 2, 3]).tolist() == [5, 4]
    assert pack_tokens([3, 2, 4], [0, 1, 2, 3]).tolist() == [3, 2, 4]
    assert pack_tokens([3, 2, 4], [0, 3]).tolist() == [9]
    assert pack_tokens(np.array([3, 2, 4], dtype=np.int32), np.array([0, 2, 3])).dtype == np.int64


def test_pack_tokens_empty_pack():
    assert pack_tokens([3, 2, 4], [0, 2, 2, 3]).tolist() == [5, 0, 4]
    assert pack_tokens([3, 2, 4], [0, 0, 3]).tolist() == [0, 9]
    assert pack_tokens([3, 0, 4], [0, 1, 2, 3]).tolist() == [3, 0, 4]  # a pack of one empty sequence


def test_pack_tokens_zero_packs():
    assert pack_tokens([], [0]).tolist() == []
    assert pack_tokens([3, 2], [0]).tolist() == []


@pytest.mark.parametrize("seed", range(10))
def test_pack_tokens_sums_each_pack(seed):
    rng = np.random.default_rng(seed)
    lens = rng.integers(0, 20, rng.integers(0, 30))
    docs = np.concatenate([[0], np.sort(rng.integers(0, lens.size + 1, rng.integers(0, 8))), [lens.size]])
    got = pack_tokens(lens, docs).tolist()
    assert got == [int(lens[a:b].sum()) for a, b in zip(docs[:-1], docs[1:], strict=True)]
    assert sum(got) == int(lens.sum())


def test_row_segments_full_row_has_no_padding_segment():
    assert row_segments([[3, 5]], row_len=8) == [3, 5]
    assert row_segments([[8]], row_len=8) == [8]


def test_row_segments_short_row_has_one_padding_segment():
    assert row_segments([[2, 2]], row_len=8) == [2, 2, 4]
    assert row_segments([[3, 5], [2, 2], [1]], row_len=8) == [3, 5, 2, 2, 4, 1, 7]


def test_row_segments_empty_row_is_one_segment():
    assert row_segments([[]], row_len=8) == [8]
    assert row_segments([[4, 4], [], [6]], row_len=8) == [4, 4, 8, 6, 2]
    assert row_segments([], row_len=8) == []


def test_row_segments_rows_end_on_row_boundaries():
    rows = [np.array([3, 5]), np.array([2, 2], dtype=np.int32), np.array([], dtype=np.int64), [0, 7]]
    segs = row_segments(rows, row_len=8)
    assert all(type(s) is int for s in segs)
    ends = cumulative_ends(segs).tolist()
    assert ends[-1] == 8 * len(rows)
    assert {8, 16, 24, 32} <= set(ends)


@pytest.mark.parametrize(
    ("rows", "bad_row"), [([[5, 4]], 0), ([[3, 5], [9]], 1), ([[-1, 3]], 0), ([[2], [4, -4]], 1)]
)
def test_row_segments_rejects_overfull_or_negative_rows(rows, bad_row):
    with pytest.raises(ValueError, match="--seq-length") as info:
        row_segments(rows, row_len=8)
    assert f"row {bad_row} " in str(info.value)
