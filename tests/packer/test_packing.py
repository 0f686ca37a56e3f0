"""Bin packing: every sample exactly once, no pack over capacity, and BFD/FFD equal to naive references."""

from __future__ import annotations

import numpy as np
import pytest

from packer.packing import ALGORITHMS, PackPlan, efficiency, lower_bound, pack


def check_plan(plan: PackPlan, lengths: np.ndarray, capacity: int) -> None:
    n = lengths.size
    assert plan.order.dtype == np.int64 and plan.offsets.dtype == np.int64
    np.testing.assert_array_equal(np.sort(plan.order), np.arange(n))  # every sample exactly once
    assert plan.offsets[0] == 0 and plan.offsets[-1] == n
    assert (np.diff(plan.offsets) > 0).all(), "empty pack"
    fills = plan.pack_lengths(lengths)
    assert fills.size == plan.num_packs
    assert fills.sum() == lengths.sum()
    assert fills.max(initial=0) <= capacity
    # within a pack, samples keep their input order
    same_pack = np.ones(n, dtype=bool)
    same_pack[plan.offsets[1:-1]] = False
    assert (np.diff(plan.order)[same_pack[1:]] > 0).all()


def reference_decreasing(lengths: np.ndarray, capacity: int, best: bool) -> list[list[int]]:
    """Textbook O(n^2) best-/first-fit decreasing, one item at a time (ties by input index)."""
    bins: list[list[int]] = []
    free: list[int] = []
    for i in np.argsort(-lengths, kind="stable").tolist():
        s = int(lengths[i])
        fits = [b for b in range(len(bins)) if free[b] >= s]
        if fits:
            b = min(fits, key=lambda b: free[b]) if best else fits[0]
            bins[b].append(i)
            free[b] -= s
        else:
            bins.append([i])
            free.append(capacity - s)
    return bins


def reference_next_fit(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    bins: list[list[int]] = []
    used = capacity + 1
    for i, s in enumerate(lengths.tolist()):
        if used + s > capacity:
            bins.append([])
            used = 0
        bins[-1].append(i)
        used += s
    return bins


def plan_bins(plan: PackPlan) -> list[list[int]]:
    return [plan.order[a:b].tolist() for a, b in zip(plan.offsets[:-1], plan.offsets[1:], strict=True)]


def random_case(seed: int) -> tuple[np.ndarray, int]:
    """Varied shapes: uniform, many duplicates, mostly large, mostly tiny, exact divisors of capacity."""
    rng = np.random.default_rng(seed)
    capacity = int(rng.choice([1, 2, 7, 16, 50, 64, 100, 257]))
    n = int(rng.integers(0, 300))
    kind = seed % 5
    if kind == 0:
        lengths = rng.integers(1, capacity + 1, n)
    elif kind == 1:
        lengths = rng.choice(rng.integers(1, capacity + 1, 4), n)
    elif kind == 2:
        lengths = rng.integers(max(1, capacity // 2), capacity + 1, n)
    elif kind == 3:
        lengths = rng.integers(1, max(2, capacity // 8) + 1, n)
    else:
        divisors = [d for d in range(1, capacity + 1) if capacity % d == 0]
        lengths = rng.choice(divisors, n)
    return np.minimum(lengths, capacity).astype(np.int64), capacity


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("seed", range(40))
def test_invariants(algorithm, seed):
    lengths, capacity = random_case(seed)
    plan = pack(lengths, capacity, algorithm)
    check_plan(plan, lengths, capacity)
    assert plan.num_packs >= lower_bound(lengths, capacity)


@pytest.mark.parametrize("seed", range(200))
def test_bfd_matches_reference(seed):
    lengths, capacity = random_case(seed)
    ref = reference_decreasing(lengths, capacity, best=True)
    plan = pack(lengths, capacity, "bfd")
    assert plan.num_packs == len(ref)
    # bins at the same fill level are interchangeable, so the multiset of fill levels is what BFD determines
    ref_fills = sorted(int(lengths[b].sum()) for b in ref)
    assert sorted(plan.pack_lengths(lengths).tolist()) == ref_fills


@pytest.mark.parametrize("seed", range(200))
def test_ffd_matches_reference(seed):
    lengths, capacity = random_case(seed)
    ref = reference_decreasing(lengths, capacity, best=False)
    plan = pack(lengths, capacity, "ffd")
    assert plan.num_packs == len(ref)
    assert sorted(plan.pack_lengths(lengths).tolist()) == sorted(int(lengths[b].sum()) for b in ref)
    # first fit has no ties: the same packs, in bin-creation order
    assert plan_bins(plan) == [sorted(b) for b in ref]


@pytest.mark.parametrize("seed", range(30))
def test_next_fit_matches_reference(seed):
    lengths, capacity = random_case(seed)
    assert plan_bins(pack(lengths, capacity, "nf")) == reference_next_fit(lengths, capacity)


def test_none_is_one_sample_per_pack_in_order():
    lengths = np.array([5, 1, 3])
    plan = pack(lengths, 5, "none")
    assert plan_bins(plan) == [[0], [1], [2]]


def test_hand_example():
    # capacity 10: BFD puts 6,4 | 5,5 | 3,3,2 ... every pack full
    lengths = np.array([3, 5, 4, 6, 5, 3, 2, 2])
    for algorithm in ("bfd", "ffd"):
        plan = pack(lengths, 10, algorithm)
        assert plan.num_packs == 3
        assert sorted(plan.pack_lengths(lengths).tolist()) == [10, 10, 10]
    assert pack(lengths, 10, "nf").num_packs == 4  # 3,5 | 4,6 | 5,3,2 | 2


def test_bfd_differs_from_ffd_by_choosing_the_tightest_bin():
    # capacity 10: 8 -> bin0 (free 2), 6 -> bin1 (free 4), 3 -> bin1 (free 1); the 1 goes to the tightest bin
    # (bin1) under best fit, to the first bin that fits (bin0) under first fit.
    lengths = np.array([8, 6, 3, 1])
    assert plan_bins(pack(lengths, 10, "bfd")) == [[0], [1, 2, 3]]
    assert plan_bins(pack(lengths, 10, "ffd")) == [[0, 3], [1, 2]]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_empty_input(algorithm):
    plan = pack(np.zeros(0, dtype=np.int64), 8, algorithm)
    assert plan.num_packs == 0 and plan.order.size == 0


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_rejects_bad_input(algorithm):
    with pytest.raises(ValueError, match="outside"):
        pack(np.array([1, 0, 2]), 8, algorithm)
    with pytest.raises(ValueError, match="sample 1 has length 9"):
        pack(np.array([1, 9, 2]), 8, algorithm)
    with pytest.raises(ValueError, match="capacity"):
        pack(np.array([1]), 0, algorithm)
    with pytest.raises(ValueError, match="1-D"):
        pack(np.ones((2, 2), dtype=np.int64), 8, algorithm)


def test_unknown_algorithm():
    with pytest.raises(ValueError, match="unknown packing algorithm 'magic'"):
        pack(np.array([1, 2]), 8, "magic")


def test_bounds_and_efficiency():
    assert lower_bound(np.array([5, 5, 1]), 10) == 2
    assert lower_bound(np.array([5, 5]), 10) == 1
    assert lower_bound(np.zeros(0, np.int64), 10) == 0
    assert efficiency(np.array([5, 5, 1]), 2, 10) == pytest.approx(0.55)
    assert efficiency(np.zeros(0, np.int64), 0, 10) == 0.0


@pytest.mark.parametrize("algorithm", ["bfd", "ffd"])
def test_alpaca_1m_lengths(algorithm, helpers):
    """Reference figures (MANIFEST.md): bound 38,660 packs, best peers 38,675."""
    lengths = np.minimum(np.load(helpers.data_file("lengths/alpaca_gpt2_1M.npy")), 2048).astype(np.int64)
    plan = pack(lengths, 2048, algorithm)
    assert lower_bound(lengths, 2048) == 38660
    assert 38660 <= plan.num_packs <= 38675
    assert np.array_equal(np.sort(plan.order), np.arange(lengths.size))
    assert plan.pack_lengths(lengths).max() <= 2048
    assert (np.diff(plan.offsets) > 0).all()
