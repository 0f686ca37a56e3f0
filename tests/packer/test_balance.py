"""Pack attention costs and the balanced data order (packer.balance)."""

from __future__ import annotations

import numpy as np
import pytest

from packer.balance import (
    StepShape,
    _lpt,
    balanced_plan,
    balanced_window,
    epoch_permutation,
    pack_attention_costs,
    rank_costs,
    unbalanced_plan,
)


def naive_costs(lens: np.ndarray, docs: np.ndarray, multiple: int) -> list[int]:
    out = []
    for d in range(len(docs) - 1):
        total = 0
        for n in lens[docs[d] : docs[d + 1]].tolist():
            padded = (n + multiple - 1) // multiple * multiple
            total += padded * padded
        out.append(total)
    return out


@pytest.mark.parametrize("multiple", [1, 2, 4, 8, 7])
def test_costs_equal_a_naive_loop_with_empty_packs(multiple):
    rng = np.random.default_rng(multiple)
    for _ in range(20):
        lens = rng.integers(0, 40, int(rng.integers(0, 60))).astype(np.int32)
        # Boundaries drawn with repeats, so some packs are empty (also the first and the last).
        inner = np.sort(rng.integers(0, lens.size + 1, int(rng.integers(0, 20))))
        docs = np.concatenate([[0], inner, [lens.size]]).astype(np.int64)
        got = pack_attention_costs(lens, docs, multiple)
        assert got.dtype == np.int64
        assert got.tolist() == naive_costs(lens, docs, multiple)


def test_costs_hand_computed_and_large_lengths_do_not_overflow():
    lens, docs = np.array([3, 5, 8, 2, 2]), np.array([0, 2, 2, 5])
    assert pack_attention_costs(lens, docs).tolist() == [34, 0, 72]
    assert pack_attention_costs(lens, docs, multiple=4).tolist() == [80, 0, 96]
    # int32 lengths: squaring must happen in int64 (32768**2 overflows int32)
    big = np.full(4, 32768, dtype=np.int32)
    assert pack_attention_costs(big, np.array([0, 4])).tolist() == [4 * 32768**2]
    assert pack_attention_costs(np.zeros(0, np.int32), np.array([0])).tolist() == []


@pytest.mark.parametrize(
    ("lens", "docs", "multiple", "match"),
    [
        ([1, 2], [0, 2], 0, "multiple must be an integer >= 1"),
        ([1, 2], [0, 2], 2.0, "multiple must be an integer >= 1"),
        ([1, 2], [0, 1], 1, r"run from 0 to the number of sequences \(2\)"),
        ([1, 2], [1, 2], 1, "run from 0"),
        ([1, 2], [], 1, "run from 0"),
        ([1, 2, 3], [0, 2, 1, 3], 1, "must not decrease, got 2 then 1"),
        ([1, -2], [0, 2], 1, "must be >= 0, got -2 at sequence 1"),
        ([[1, 2]], [0, 1], 1, "must be 1-D"),
    ],
)
def test_costs_refuse_bad_input_naming_it(lens, docs, multiple, match):
    with pytest.raises(ValueError, match=match):
        pack_attention_costs(np.array(lens), np.array(docs, dtype=np.int64), multiple)


def step_max_sum(costs: np.ndarray, plan: np.ndarray) -> int:
    return int(rank_costs(costs, plan).max(axis=1).sum())


def test_hand_computed_two_ranks():
    # perm order matters for the unbalanced side, so fix the costs in perm order.
    perm = epoch_permutation(4, seed=0, epoch=0)
    costs = np.zeros(4, dtype=np.int64)
    costs[perm] = [9, 1, 8, 2]  # unbalanced: step 0 = ranks [9, 1], step 1 = [8, 2]
    shape = StepShape(dp_size=2, grad_accum=1, micro_batch_size=1)
    unbalanced = unbalanced_plan(4, shape, seed=0, epoch=0)
    assert sorted(rank_costs(costs, unbalanced).tolist()) == [[8, 2], [9, 1]]
    assert step_max_sum(costs, unbalanced) == 17
    plan = balanced_plan(costs, shape, seed=0, epoch=0, window_steps=2)
    assert sorted(sorted(r) for r in rank_costs(costs, plan).tolist()) == [[1, 2], [8, 9]]
    assert step_max_sum(costs, plan) == 11


def test_hand_computed_micro_batches_of_a_rank():
    perm = epoch_permutation(8, seed=0, epoch=0)
    costs = np.zeros(8, dtype=np.int64)
    costs[perm] = [8, 7, 6, 5, 4, 3, 2, 1]  # unbalanced: rank 0 reads 8, 6, 4, 2 = 20, rank 1 7, 5, 3, 1 = 16
    shape = StepShape(dp_size=2, grad_accum=2, micro_batch_size=2)
    assert rank_costs(costs, unbalanced_plan(8, shape, seed=0, epoch=0)).tolist() == [[20, 16]]
    plan = balanced_plan(costs, shape, seed=0, epoch=0, window_steps=1)
    # LPT: {8, 5, 4, 1} and {7, 6, 3, 2}, 18 each; snake into micro-batches: [8, 1] [5, 4] and [7, 2] [6, 3]
    assert sorted(sorted(costs[plan[0, r]].tolist()) for r in range(2)) == [
        [[5, 4], [8, 1]],
        [[6, 3], [7, 2]],
    ]
    assert costs[plan].sum(axis=3).tolist() == [[[9, 9], [9, 9]]]


def test_lpt_with_cap_then_swap():
    c = np.array([5, 6, 9, 7, 6, 5])
    bins = _lpt(c, n_bins=2, cap=3)
    assert sorted(bins.ravel().tolist()) == list(range(6))
    assert c[bins].sum(axis=1).tolist() == [19, 19]  # LPT alone: [20, 18]


SHAPES = [StepShape(2, 1, 1), StepShape(4, 1, 2), StepShape(3, 2, 1), StepShape(8, 2, 2), StepShape(1, 3, 2)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("window_steps", [1, 3, 32])
def test_plan_permutes_each_windows_packs_deterministically_and_never_worse(shape, window_steps):
    rng = np.random.default_rng(shape.packs * 100 + window_steps)
    n = int(rng.integers(shape.packs, 40 * shape.packs))
    costs = (rng.pareto(1.5, n) * 1000).astype(np.int64)  # heavy tail, like squared lengths
    for epoch in (0, 1):
        plan = balanced_plan(costs, shape, seed=5, epoch=epoch, window_steps=window_steps)
        base = unbalanced_plan(n, shape, seed=5, epoch=epoch)
        assert plan.shape == base.shape == (n // shape.packs, *base.shape[1:])
        assert plan.dtype == np.int64
        for w in range(0, len(plan), window_steps):
            got, want = plan[w : w + window_steps], base[w : w + window_steps]
            assert sorted(got.ravel().tolist()) == sorted(want.ravel().tolist())
        if window_steps == 1:  # each step keeps the unbalanced step's packs
            for got, want in zip(plan, base, strict=True):
                assert sorted(got.ravel().tolist()) == sorted(want.ravel().tolist())
        again = balanced_plan(costs, shape, seed=5, epoch=epoch, window_steps=window_steps)
        assert np.array_equal(plan, again)
        for w in range(0, len(plan), window_steps):
            got, want = plan[w : w + window_steps], base[w : w + window_steps]
            assert step_max_sum(costs, got) <= step_max_sum(costs, want)


def test_plan_balances_random_costs_much_better():
    rng = np.random.default_rng(0)
    costs = (rng.pareto(1.5, 4000) * 1000).astype(np.int64)
    for shape in (StepShape(8, 1, 1), StepShape(8, 2, 2)):
        base = rank_costs(costs, unbalanced_plan(costs.size, shape, seed=1, epoch=0))
        bal = rank_costs(costs, balanced_plan(costs, shape, seed=1, epoch=0))
        ratio = lambda rc: float((rc.max(axis=1) / rc.mean(axis=1)).mean())  # noqa: E731
        assert ratio(bal) < 1 + (ratio(base) - 1) / 3
        assert bal.max(axis=1).sum() < base.max(axis=1).sum()


def test_seed_and_epoch_change_the_plan_and_ranks_are_dealt_at_random():
    costs = np.arange(64, dtype=np.int64) ** 2
    shape = StepShape(4, 1, 1)
    a = balanced_plan(costs, shape, seed=0, epoch=0, window_steps=4)
    assert not np.array_equal(a, balanced_plan(costs, shape, seed=1, epoch=0, window_steps=4))
    assert not np.array_equal(a, balanced_plan(costs, shape, seed=0, epoch=1, window_steps=4))
    heaviest_rank = rank_costs(costs, a).argmax(axis=1)
    assert len(set(heaviest_rank.tolist())) > 1  # not always rank 0


def test_a_window_that_cannot_improve_keeps_the_unbalanced_order():
    costs = np.full(12, 7, dtype=np.int64)  # all equal: nothing to gain, so nothing moves
    shape = StepShape(2, 2, 1)
    assert np.array_equal(
        balanced_plan(costs, shape, seed=3, epoch=0, window_steps=2),
        unbalanced_plan(12, shape, seed=3, epoch=0),
    )


def test_too_few_packs_and_bad_arguments_name_the_fix():
    with pytest.raises(
        ValueError, match=r"3 packs, fewer than one step's 4 \(--micro-batch-size 2 x --grad-accum 1"
    ):
        balanced_plan(np.ones(3, np.int64), StepShape(2, 1, 2), seed=0, epoch=0)
    with pytest.raises(ValueError, match="--grad-accum must be an integer >= 1, got 0"):
        StepShape(2, 0, 1)
    with pytest.raises(ValueError, match="window_steps must be an integer >= 1"):
        balanced_plan(np.ones(8, np.int64), StepShape(2, 1, 1), seed=0, epoch=0, window_steps=0)
    with pytest.raises(ValueError, match="1-D integer array"):
        balanced_plan(np.ones(8), StepShape(2, 1, 1), seed=0, epoch=0)
    with pytest.raises(ValueError, match="must be >= 0, got -1 for pack 2"):
        balanced_plan(np.array([1, 2, -1, 3]), StepShape(2, 1, 1), seed=0, epoch=0)
    perm = epoch_permutation(8, 0, 0)
    with pytest.raises(ValueError, match="window 4 is outside epoch 0's 4 windows of 1 steps"):
        balanced_window(np.ones(8, np.int64), perm, StepShape(2, 1, 1), 0, 0, window=4, window_steps=1)
