"""BalancedPackOrder: PackOrder's interface, with each step's attention cost balanced across DP ranks.

The plan is packer.balance's (the module docstring there has the algorithm and the cost it balances); this
class only walks one DP rank's share of it. With context parallelism pass the DP rank and size (the CP ranks
of one DP group read the same micro-batch) and costs computed with the build's padding multiple (CP x lcm(2, TP)).

For 4 packs costing [9, 1, 8, 2], dp_size 2, micro_batch_size 1, grad_accum 1 and window_steps 2, the two
steps hold packs {0, 2} (costs 9, 8) and {1, 3} (costs 1, 2), in an order the seed fixes, and the two ranks
read different packs of the same step (the unbalanced PackOrder pairs 9 with 1 and 8 with 2):

    >>> orders = [BalancedPackOrder(np.array([9, 1, 8, 2]), 1, 1, seed=0, dp_rank=r, dp_size=2, window_steps=2)
    ...           for r in (0, 1)]
    >>> [[o.next() for _ in range(2)] for o in orders]       # step 0: packs 2, 0; step 1: packs 1, 3
    [[[2], [1]], [[0], [3]]]
"""

from __future__ import annotations

import numpy as np

from packer.balance import (
    DEFAULT_WINDOW_STEPS,
    StepShape,
    balanced_window,
    check_costs,
    check_window_steps,
    epoch_permutation,
)


class BalancedPackOrder:
    """Which packs DP rank `dp_rank` reads: micro_batch_size packs per next(), grad_accum next() per step.

    Like PackOrder, every rank reads the same number of micro-batches per epoch (per_epoch packs; the packs
    after the last whole step of dp_size * grad_accum * micro_batch_size are dropped, a different few each
    epoch), and (epoch, index) is the whole position: the plan is a pure function of (costs, seed, epoch), so
    a checkpoint needs nothing else and the ranks need no communication.
    """

    def __init__(
        self,
        costs: np.ndarray,
        micro_batch_size: int,
        grad_accum: int,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        window_steps: int = DEFAULT_WINDOW_STEPS,
    ):
        self.costs = check_costs(costs, "the pack attention costs")
        self.shape = StepShape(dp_size, grad_accum, micro_batch_size)
        if (
            not isinstance(dp_rank, (int, np.integer))
            or isinstance(dp_rank, bool)
            or not 0 <= dp_rank < dp_size
        ):
            raise ValueError(f"dp_rank must be an integer in [0, dp_size={dp_size}), got {dp_rank!r}")
        self.seed, self.dp_rank, self.window_steps = seed, int(dp_rank), check_window_steps(window_steps)
        self.n_packs = self.costs.size
        self.B, self.A = micro_batch_size, grad_accum
        self.steps_per_epoch = self.shape.steps_per_epoch(self.n_packs)
        self.per_epoch = self.steps_per_epoch * self.shape.per_rank  # packs this rank reads per epoch
        self.epoch, self.index = 0, 0
        self._perm: tuple[int, np.ndarray] | None = None  # (epoch, its permutation)
        self._window: tuple[int, int, np.ndarray] | None = None  # (epoch, window, its (K, W, A, B) plan)

    def _plan(self, epoch: int, window: int) -> np.ndarray:
        if self._window is None or self._window[:2] != (epoch, window):
            if self._perm is None or self._perm[0] != epoch:
                self._perm = (epoch, epoch_permutation(self.n_packs, self.seed, epoch))
            plan = balanced_window(
                self.costs, self._perm[1], self.shape, self.seed, epoch, window, self.window_steps
            )
            self._window = (epoch, window, plan)
        return self._window[2]

    def next(self) -> list[int]:
        if self.index + self.B > self.per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        step, micro = divmod(self.index // self.B, self.A)
        window, k = divmod(step, self.window_steps)
        idx = self._plan(self.epoch, window)[k, self.dp_rank, micro].tolist()
        self.index += self.B
        return idx

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or index < 0 or index % self.B or index > self.per_epoch:
            raise ValueError(
                f"data position epoch {epoch}, index {index} is not one this order reaches (index must be a "
                f"multiple of --micro-batch-size {self.B} in [0, {self.per_epoch}]); resume with the "
                "--micro-batch-size, --grad-accum and world size the checkpoint was saved with"
            )
        self.epoch, self.index = epoch, index
