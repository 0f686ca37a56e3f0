"""`--overflow`: fit() of one sample to --seq-length under each policy, on hand-written arrays."""

from __future__ import annotations

import numpy as np
import pytest

from packer.overflow import POLICIES, Fitted, SampleTooLong, fit

EOD = 0

# The module docstring's example: seq_length 4, a 7-token sample p0 p1 t0 t1 t2 t3 E (ids never equal EOD).
IDS = np.array([10, 11, 20, 21, 22, 23, EOD], dtype=np.int64)
MASK = np.array([0, 0, 1, 1, 1, 1, 1], dtype=np.uint8)


def arr(*xs: int, dtype=np.int64) -> np.ndarray:
    return np.array(xs, dtype=dtype)


def counters(f: Fitted) -> dict[str, int]:
    return {k: getattr(f, k) for k in ("truncated", "split", "dropped", "dropped_no_target", "unterminated")}


NO_COUNTS = dict.fromkeys(("truncated", "split", "dropped", "dropped_no_target", "unterminated"), 0)


def test_policies_registry():
    assert POLICIES == ("truncate", "split", "drop", "error")


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("seq_length", [7, 8])  # exactly full, and with room to spare
def test_a_sample_that_fits_comes_back_unchanged(policy, seq_length):
    f = fit(IDS, MASK, seq_length, policy)
    assert len(f.pieces) == 1
    ids, mask = f.pieces[0]
    assert ids is IDS and mask is MASK
    assert counters(f) == NO_COUNTS


def test_truncate_keeps_first_n_minus_1_tokens_and_the_eod():
    f = fit(IDS, MASK, 4, "truncate")
    assert counters(f) == NO_COUNTS | {"truncated": 1}
    [(ids, mask)] = f.pieces
    assert ids.tolist() == [10, 11, 20, EOD]
    assert mask.tolist() == [0, 0, 1, 1]


def test_truncate_keeps_the_eod_mask_value():
    # An EOD that is not a target stays not a target after the cut.
    f = fit(arr(1, 2, 3, 4, 5, 6, EOD), arr(0, 1, 1, 1, 1, 1, 0, dtype=np.uint8), 4, "truncate")
    [(ids, mask)] = f.pieces
    assert ids.tolist() == [1, 2, 3, EOD]
    assert mask.tolist() == [0, 1, 1, 0]
    assert f.truncated == 1


def test_truncate_with_one_target_just_inside_the_cut_is_kept():
    # The only kept target is token n-2, the last one before the EOD.
    f = fit(arr(1, 2, 3, 4, 5, EOD), arr(0, 0, 1, 0, 0, 0, dtype=np.uint8), 4, "truncate")
    [(ids, mask)] = f.pieces
    assert ids.tolist() == [1, 2, 3, EOD]
    assert mask.tolist() == [0, 0, 1, 0]
    assert counters(f) == NO_COUNTS | {"truncated": 1}


@pytest.mark.parametrize("eod_mask", [0, 1])
def test_truncate_without_a_target_in_the_kept_prefix_is_dropped(eod_mask):
    # The targets all lie past the cut; a target EOD alone does not save the sample.
    mask = arr(0, 0, 0, 1, 1, 1, eod_mask, dtype=np.uint8)
    f = fit(IDS, mask, 4, "truncate")
    assert f.pieces == []
    assert counters(f) == NO_COUNTS | {"dropped_no_target": 1}


def test_split_into_chunks_of_seq_length():
    f = fit(IDS, MASK, 4, "split")
    assert [ids.tolist() for ids, _ in f.pieces] == [[10, 11, 20, 21], [22, 23, EOD]]
    assert [mask.tolist() for _, mask in f.pieces] == [[0, 0, 1, 1], [1, 1, 1]]
    assert counters(f) == NO_COUNTS | {"split": 1, "unterminated": 1}


def test_split_exact_multiple_of_seq_length():
    ids = arr(1, 2, 3, 4, 5, 6, 7, 8, 9, EOD)
    mask = np.ones(10, dtype=np.uint8)
    f = fit(ids, mask, 5, "split")
    assert [p.tolist() for p, _ in f.pieces] == [[1, 2, 3, 4, 5], [6, 7, 8, 9, EOD]]
    assert counters(f) == NO_COUNTS | {"split": 1, "unterminated": 1}


def test_split_drops_and_counts_chunks_without_a_target():
    #        chunk 0   chunk 1   chunk 2   chunk 3
    ids = arr(1, 2, 3, 4, 5, 6, 7, 8, 9, EOD)
    mask = arr(0, 0, 0, 0, 1, 0, 0, 0, 0, 1, dtype=np.uint8)
    f = fit(ids, mask, 3, "split")
    assert [p.tolist() for p, _ in f.pieces] == [[4, 5, 6], [EOD]]
    assert [m.tolist() for _, m in f.pieces] == [[0, 1, 0], [1]]
    assert counters(f) == NO_COUNTS | {"split": 1, "dropped_no_target": 2, "unterminated": 1}


def test_split_only_the_last_chunk_holds_the_eod():
    ids = np.arange(1, 12, dtype=np.int64)
    ids[-1] = EOD
    f = fit(ids, np.ones(11, dtype=np.uint8), 3, "split")
    assert len(f.pieces) == 4
    assert [p[-1] == EOD for p, _ in f.pieces] == [False, False, False, True]
    assert f.unterminated == len(f.pieces) - 1 == 3
    assert f.split == 1


def test_drop():
    f = fit(IDS, MASK, 4, "drop")
    assert f.pieces == []
    assert counters(f) == NO_COUNTS | {"dropped": 1}


def test_error_names_the_length_and_the_option():
    with pytest.raises(SampleTooLong, match="--seq-length") as info:
        fit(IDS, MASK, 4, "error")
    assert (info.value.length, info.value.seq_length) == (7, 4)
    assert "7" in str(info.value) and "4" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unknown_policy_rejected():
    with pytest.raises(ValueError, match="unknown --overflow policy 'chop'") as info:
        fit(IDS, MASK, 4, "chop")
    assert not isinstance(info.value, SampleTooLong)
    for p in POLICIES:
        assert p in str(info.value)


def random_sample(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """An over-long sample: ids that are never EOD, then EOD; a sparse mask whose EOD is a target."""
    size = int(rng.integers(n + 1, 6 * n))
    ids = np.append(rng.integers(1, 1000, size - 1), EOD)
    mask = np.append(rng.random(size - 1) < rng.choice([0.0, 0.05, 0.3, 1.0]), True).astype(np.uint8)
    return ids, mask


@pytest.mark.parametrize("seed", range(30))
def test_split_loses_nothing_but_untrained_chunks(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 9))
    ids, mask = random_sample(rng, n)
    f = fit(ids, mask, n, "split")
    # Walk the chunks in order: each is either the next kept piece or a dropped chunk with no target.
    pieces, dropped = iter(f.pieces), 0
    ids_parts, mask_parts = [], []
    for a in range(0, ids.size, n):
        chunk_ids, chunk_mask = ids[a : a + n], mask[a : a + n]
        if chunk_mask.any():
            p_ids, p_mask = next(pieces)
            np.testing.assert_array_equal(p_ids, chunk_ids)
            np.testing.assert_array_equal(p_mask, chunk_mask)
        else:
            dropped += 1
        ids_parts.append(chunk_ids)
        mask_parts.append(chunk_mask)
    assert next(pieces, None) is None
    np.testing.assert_array_equal(np.concatenate(ids_parts), ids)
    np.testing.assert_array_equal(np.concatenate(mask_parts), mask)
    assert f.dropped_no_target == dropped
    assert f.unterminated == len(f.pieces) - 1
    assert f.split == 1 and f.truncated == f.dropped == 0
    assert all(0 < p.size <= n and m.any() for p, m in f.pieces)
    assert f.pieces[-1][0][-1] == EOD
    assert sum(p.size for p, _ in f.pieces) + sum(m.size for m in mask_parts if not m.any()) == ids.size


@pytest.mark.parametrize("seed", range(30))
def test_truncate_random(seed):
    rng = np.random.default_rng(1000 + seed)
    n = int(rng.integers(2, 9))
    ids, mask = random_sample(rng, n)
    f = fit(ids, mask, n, "truncate")
    if not mask[: n - 1].any():
        assert f.pieces == [] and f.dropped_no_target == 1 and f.truncated == 0
        return
    [(p_ids, p_mask)] = f.pieces
    assert p_ids.size == n and f.truncated == 1
    np.testing.assert_array_equal(p_ids, np.append(ids[: n - 1], ids[-1]))
    np.testing.assert_array_equal(p_mask, np.append(mask[: n - 1], mask[-1]))


def test_bad_policy_or_seq_length_is_refused_even_when_the_sample_fits():
    with pytest.raises(ValueError, match="unknown --overflow policy 'bogus'"):
        fit(IDS, MASK, 100, "bogus")
    with pytest.raises(ValueError, match="--seq-length must be >= 2"):
        fit(IDS, MASK, 1, "truncate")


def test_split_counts_unterminated_by_where_the_eod_is():
    """The chunk holding the sample's last token (its EOD) is the terminated one, whatever the masks say."""
    f = fit(np.array([1, 2, 3, 0]), np.array([1, 0, 0, 0], np.uint8), 2, "split")
    assert [p.tolist() for p, _ in f.pieces] == [[1, 2]] and f.unterminated == 1 and f.dropped_no_target == 1
