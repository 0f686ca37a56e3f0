"""BalancedPackOrder: PackOrder's interface over packer.balance's plan."""

from __future__ import annotations

import numpy as np
import pytest

from packer.balance import StepShape, balanced_plan, unbalanced_plan
from packer.trainer.balance import BalancedPackOrder
from packer.trainer.batching import PackOrder


def random_costs(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).pareto(1.5, n) * 1000).astype(np.int64)


def read_epoch(order) -> list[list[int]]:
    return [order.next() for _ in range(order.per_epoch // order.B)]


@pytest.mark.parametrize(("W", "A", "B"), [(1, 1, 1), (3, 1, 2), (4, 2, 1), (2, 3, 2)])
def test_each_epoch_uses_every_pack_once_across_disjoint_ranks(W, A, B):
    steps = 7
    n = steps * W * A * B  # divides evenly: nothing dropped
    costs = random_costs(n)
    orders = [BalancedPackOrder(costs, B, A, seed=3, dp_rank=r, dp_size=W, window_steps=3) for r in range(W)]
    for epoch in range(2):
        reads = [read_epoch(o) for o in orders]
        for o in orders:
            assert (o.epoch, o.index, o.per_epoch) == (epoch, o.per_epoch, steps * A * B)
        assert all(len(mb) == B and all(isinstance(i, int) for i in mb) for r in reads for mb in r)
        flat = [i for r in reads for mb in r for i in mb]
        assert sorted(flat) == list(range(n))
        # the micro-batches follow the plan: rank r's micro-batch m of step s
        plan = balanced_plan(costs, StepShape(W, A, B), seed=3, epoch=epoch, window_steps=3)
        for r in range(W):
            assert reads[r] == plan[:, r].reshape(-1, B).tolist()


def test_a_remainder_is_dropped_and_ranks_stay_disjoint():
    n, W, A, B = 50, 3, 2, 2  # 12 packs per step: 4 steps, 2 packs dropped
    orders = [BalancedPackOrder(random_costs(n), B, A, seed=0, dp_rank=r, dp_size=W) for r in range(W)]
    assert orders[0].steps_per_epoch == 4 and orders[0].per_epoch == 16
    reads = [sum(read_epoch(o), []) for o in orders]
    flat = sum(reads, [])
    assert len(flat) == len(set(flat)) == 48
    first = orders[0].next()  # starts epoch 1
    assert (orders[0].epoch, orders[0].index) == (1, B)
    assert first == balanced_plan(orders[0].costs, StepShape(W, A, B), seed=0, epoch=1)[0, 0, 0].tolist()


def test_resume_reproduces_the_order_mid_window_and_across_epochs():
    costs = random_costs(90)
    fresh = BalancedPackOrder(costs, 2, 2, seed=11, dp_rank=1, dp_size=2, window_steps=4)
    for _ in range(7):  # mid-step, mid-window
        fresh.next()
    state = fresh.state_dict()
    assert state == {"epoch": 0, "index": 14}
    expected = [fresh.next() for _ in range(50)]  # 22 micro-batches per epoch: into epoch 2
    assert fresh.epoch == 2
    resumed = BalancedPackOrder(costs, 2, 2, seed=11, dp_rank=1, dp_size=2, window_steps=4)
    resumed.load_state_dict(state)
    assert [resumed.next() for _ in range(50)] == expected
    late = BalancedPackOrder(costs, 2, 2, seed=11, dp_rank=1, dp_size=2, window_steps=4)
    late.load_state_dict({"epoch": 2, "index": 4})
    assert late.next() == expected[22 * 2 + 2 - 7]  # overall micro-batch 46


def test_load_state_dict_refuses_a_position_this_order_never_reaches():
    order = BalancedPackOrder(random_costs(40), 2, 1, seed=0, dp_rank=0, dp_size=2)
    with pytest.raises(ValueError, match="index 3 is not one this order reaches.*--micro-batch-size 2"):
        order.load_state_dict({"epoch": 0, "index": 3})
    with pytest.raises(ValueError, match=r"in \[0, 20\]"):
        order.load_state_dict({"epoch": 0, "index": 22})


def test_window_one_keeps_packorders_step_sets_and_unbalanced_plan_is_packorder():
    n, W, B = 48, 4, 3
    costs = random_costs(n, seed=2)
    packorder = [PackOrder(n, B, seed=9, rank=r, world_size=W) for r in range(W)]
    pack_reads = [read_epoch(o) for o in packorder]  # 4 micro-batches of 3 per rank
    base = unbalanced_plan(n, StepShape(W, 1, B), seed=9, epoch=0)
    for r in range(W):
        assert pack_reads[r] == base[:, r, 0].tolist()
    balanced = [
        BalancedPackOrder(costs, B, 1, seed=9, dp_rank=r, dp_size=W, window_steps=1) for r in range(W)
    ]
    bal_reads = [read_epoch(o) for o in balanced]
    for step in range(4):
        assert sorted(sum((bal_reads[r][step] for r in range(W)), [])) == sorted(
            sum((pack_reads[r][step] for r in range(W)), [])
        )


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match=r"dp_rank must be an integer in \[0, dp_size=2\), got 2"):
        BalancedPackOrder(random_costs(8), 1, 1, seed=0, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="8 packs, fewer than one step's 12"):
        BalancedPackOrder(random_costs(8), 3, 2, seed=0, dp_rank=0, dp_size=2)
    with pytest.raises(ValueError, match="the pack attention costs must be a 1-D integer array"):
        BalancedPackOrder(np.ones(8), 1, 1, seed=0)
