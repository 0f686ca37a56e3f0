"""Attention cost of packs, and a data order that balances it across data-parallel ranks.

Packed rows all hold about `seq_length` tokens, so the linear parts of a step (MLPs, projections, the loss)
cost the same on every rank. Attention does not: with document masking (varlen attention) a document of L
tokens costs L*(L+1)/2 causal query-key pairs, so one 8192-token document costs as much as 64 documents of
1024 tokens in the same row. The rank that drew the pack of long documents sets the step time; the others wait.

Context parallelism does not change this picture, only where it applies. The CP ranks of one DP group read
the same micro-batch, and a zigzag split gives each the same share of every document: a document padded to
L = 2N*c tokens is cut into 2N chunks of c, CP rank r holds chunks r and 2N-1-r, and query chunk i scores
i*c*c keys before it plus c*(c+1)/2 inside it, so rank r scores (r + 2N-1-r)*c*c + c*(c+1) = 2N*c*c + c =
L*(L+1)/(2N) pairs -- exactly 1/N of the document's L*(L+1)/2, on every rank. What differs is the cost of
the DP groups' micro-batches, and that is what the order below balances.

The balanced order (`balanced_plan`, `balanced_window`) for one epoch:

    perm      = epoch_permutation(n_packs, seed, epoch)      the shuffle PackOrder deals out, unchanged
    steps     = n_packs // (dp_size * grad_accum * micro_batch_size), the tail dropped
    window w  = the packs of window_steps consecutive steps of perm (K steps, K*W bins of A*B packs)
      1. LPT: packs by cost, largest first, each into the lightest bin with room (exactly A*B per bin),
         then swaps between the heaviest and the lightest bin while one narrows their gap
      2. bins sorted by load, W consecutive bins make a step: each step's ranks get similar loads
      3. if the window's sum of step maxima is not below the unbalanced order's: the unbalanced window
      4. the K steps shuffled, the W bins of a step dealt to ranks at random (seeded)
      5. each rank-step's A*B packs dealt to A micro-batches of B, largest first in snake order
         (0..A-1, A-1..0, ...), the micro-batches then heaviest first

For W = 2 ranks, A = B = 1, K = 2 steps, costs [9, 1, 8, 2] in perm order:

    unbalanced   step 0: ranks [9, 1]   step 1: [8, 2]       max/mean 1.8, 1.6; step maxima sum to 17
    balanced     steps {9, 8} and {2, 1} (in seeded order)   max/mean 1.06, 1.33; step maxima sum to 11

With A*B = 1 a rank's step is one pack, so only re-dealing packs between steps can balance it: a window of
K > 1 steps keeps the window's (and the epoch's) packs, but a step's packs are no longer the unbalanced
order's, and a step holds packs of similar cost (length grouping, within the window). window_steps=1 keeps
every step's packs exactly those of the unbalanced order's step (the trainer averages the loss over the whole
step, so each step's gradient is unchanged) and only moves packs between ranks and micro-batches; that
needs A*B > 1 to do anything.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

DEFAULT_WINDOW_STEPS = 32


def pack_attention_costs(
    sequence_lengths: np.ndarray, document_indices: np.ndarray, multiple: int = 1
) -> np.ndarray:
    """Attention cost of every pack: the sum over its samples of `padded_len**2`, int64, shape (packs,).

    Why squares: causal attention over a document of L tokens scores L*(L+1)/2 query-key pairs (~ L**2/2),
    and FLOPs, time and memory traffic of the attention kernel grow with the pairs. The constant 1/2 and the
    linear L/2 term are the same for every pack of the same token count, so `sum L**2` orders and balances
    packs exactly as the pair count does, and stays an integer. The padding tail of a row (seq_length minus
    the pack's tokens) is NOT counted: it is one more segment to the kernel, but every trainer masks it out of
    the loss and its cost does not depend on how the packs are ordered.

    `multiple` is the padding that context parallelism adds to every document: with CP size N a zigzag split
    cuts each document into 2N chunks, so each document is padded to a multiple of 2N tokens, or of
    N * lcm(2, TP) with tensor parallelism (the build's `context_parallel.multiple`, packer/cp.py);
    padded_len = ceil(len / multiple) * multiple; multiple 1 = the real lengths.

    Pack d holds sequences document_indices[d] .. document_indices[d+1]-1 (docs/format.md):

        sequence_lengths  [3, 5, 8, 2, 2]        document_indices [0, 2, 2, 5]   -> packs [3, 5], [], [8, 2, 2]
        multiple 1        [3*3 + 5*5, 0, 8*8 + 2*2 + 2*2]                          = [34, 0, 72]
        multiple 4        [4*4 + 8*8, 0, 8*8 + 4*4 + 4*4]                          = [80, 0, 96]

    >>> pack_attention_costs(np.array([3, 5, 8, 2, 2]), np.array([0, 2, 2, 5])).tolist()
    [34, 0, 72]
    >>> pack_attention_costs(np.array([3, 5, 8, 2, 2]), np.array([0, 2, 2, 5]), multiple=4).tolist()
    [80, 0, 96]
    """
    lens = np.asarray(sequence_lengths)
    docs = np.asarray(document_indices)
    if isinstance(multiple, bool) or not isinstance(multiple, (int, np.integer)) or multiple < 1:
        raise ValueError(
            f"multiple must be an integer >= 1 (the per-document padding: the build's context_parallel.multiple, CP x lcm(2, TP)), got {multiple!r}"
        )
    if lens.ndim != 1 or docs.ndim != 1:
        raise ValueError(
            f"sequence_lengths and document_indices must be 1-D, got shapes {lens.shape} and {docs.shape}"
        )
    if docs.size == 0 or docs[0] != 0 or docs[-1] != lens.size:
        ends = (docs[:1].tolist(), docs[-1:].tolist())
        raise ValueError(
            f"document_indices must run from 0 to the number of sequences ({lens.size}), got first/last {ends}; "
            "pass the index's own document_indices (packs + 1 entries)"
        )
    if docs.size > 1 and np.any(np.diff(docs) < 0):
        bad = int(np.flatnonzero(np.diff(docs) < 0)[0])
        raise ValueError(
            f"document_indices must not decrease, got {docs[bad]} then {docs[bad + 1]} at entries {bad}, {bad + 1}"
        )
    lens = lens.astype(np.int64)
    if lens.size and lens.min() < 0:
        bad = int(np.argmin(lens))
        raise ValueError(f"sequence_lengths must be >= 0, got {lens[bad]} at sequence {bad}")
    if multiple > 1:
        lens = -(-lens // multiple) * multiple
    # Prefix sums of the squares, read at the pack boundaries: O(samples) and correct for empty packs
    # (equal boundaries give 0), which np.add.reduceat is not. The total is <= all tokens x the longest
    # sample (1e10 tokens x 32768 = 3e14), far below 2**63.
    csum = np.zeros(lens.size + 1, dtype=np.int64)
    np.cumsum(lens * lens, out=csum[1:])
    docs = docs.astype(np.int64)
    return csum[docs[1:]] - csum[docs[:-1]]


@dataclass(frozen=True, slots=True)
class StepShape:
    """Packs one optimizer step reads: dp_size ranks x grad_accum micro-batches x micro_batch_size packs."""

    dp_size: int
    grad_accum: int
    micro_batch_size: int

    def __post_init__(self) -> None:
        flags = (("dp_size", self.dp_size), ("--grad-accum", self.grad_accum),
                 ("--micro-batch-size", self.micro_batch_size))  # fmt: skip
        for flag, value in flags:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{flag} must be an integer >= 1, got {value!r}")

    @property
    def per_rank(self) -> int:
        return self.grad_accum * self.micro_batch_size

    @property
    def packs(self) -> int:
        return self.dp_size * self.per_rank

    def steps_per_epoch(self, n_packs: int) -> int:
        steps = n_packs // self.packs
        if steps < 1:
            raise ValueError(
                f"the data has {n_packs} packs, fewer than one step's {self.packs} (--micro-batch-size "
                f"{self.micro_batch_size} x --grad-accum {self.grad_accum} x {self.dp_size} DP ranks); "
                "lower them or build more data"
            )
        return steps


def epoch_permutation(n_packs: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded shuffle of one epoch: the same permutation trainer.batching.PackOrder deals out."""
    return np.random.default_rng([seed, epoch]).permutation(n_packs)


def unbalanced_plan(n_packs: int, shape: StepShape, seed: int, epoch: int) -> np.ndarray:
    """What PackOrder(n_packs, B, seed, rank, W) reads in `epoch`, step by step: (steps, W, A, B) pack ids.

    Rank r reads perm[r::W], B packs per micro-batch, so step s of all ranks is the slice
    perm[s*W*A*B : (s+1)*W*A*B], and slot b of micro-batch m of rank r is perm[W*((s*A + m)*B + b) + r].
    (PackOrder lets a step run across an epoch's end; here, as in the balanced plan, an epoch ends with its
    last whole step.)

    >>> unbalanced_plan(6, StepShape(dp_size=2, grad_accum=1, micro_batch_size=1), seed=0, epoch=0).shape
    (3, 2, 1, 1)
    """
    steps = shape.steps_per_epoch(n_packs)
    perm = epoch_permutation(n_packs, seed, epoch)[: steps * shape.packs]
    return perm.reshape(steps, shape.grad_accum, shape.micro_batch_size, shape.dp_size).transpose(0, 3, 1, 2)


def rank_costs(costs: np.ndarray, plan: np.ndarray) -> np.ndarray:
    """(steps, W): the cost each rank carries in each step of a (steps, W, A, B) plan."""
    return np.asarray(costs, dtype=np.int64)[plan].sum(axis=(2, 3))


def check_costs(costs: np.ndarray, source: str = "costs") -> np.ndarray:
    """`costs` as int64, or a ValueError naming `source` where it is not one non-negative integer per pack."""
    costs = np.asarray(costs)
    if costs.ndim != 1 or not np.issubdtype(costs.dtype, np.integer):
        raise ValueError(
            f"{source} must be a 1-D integer array (one attention cost per pack, from pack_attention_costs), "
            f"got dtype {costs.dtype} shape {costs.shape}"
        )
    if costs.size and costs.min() < 0:
        bad = int(np.argmin(costs))
        raise ValueError(f"{source} must be >= 0, got {costs[bad]} for pack {bad}")
    return costs.astype(np.int64, copy=False)


def balanced_window(
    costs: np.ndarray,
    perm: np.ndarray,
    shape: StepShape,
    seed: int,
    epoch: int,
    window: int,
    window_steps: int = DEFAULT_WINDOW_STEPS,
) -> np.ndarray:
    """Steps window*K .. window*K+K-1 of the balanced plan of `epoch`: (K, W, A, B) pack ids, K = window_steps
    (fewer in an epoch's last window). `perm` is epoch_permutation(len(costs), seed, epoch). Every rank
    computes the same plan from (costs, seed, epoch) alone, without communication."""
    K = check_window_steps(window_steps)
    W, A, B = shape.dp_size, shape.grad_accum, shape.micro_batch_size
    steps = shape.steps_per_epoch(len(costs))
    first, last = window * K, min((window + 1) * K, steps)
    if not 0 <= first < steps:
        raise ValueError(f"window {window} is outside epoch {epoch}'s {-(-steps // K)} windows of {K} steps")
    K = last - first
    packs = np.asarray(perm[first * shape.packs : last * shape.packs], dtype=np.int64)
    c = np.asarray(costs, dtype=np.int64)[packs]
    # The unbalanced order's window, the fallback: step k, rank r, micro-batch m, slot b (see unbalanced_plan).
    identity = np.arange(packs.size).reshape(K, A, B, W).transpose(0, 3, 1, 2)
    bins = _lpt(c, K * W, A * B)  # (K*W, A*B) positions into `packs`
    loads = c[bins].sum(axis=1)
    # Sorting bins by load and cutting W at a time minimises the sum over steps of the heaviest bin.
    by_load = np.argsort(-loads, kind="stable").reshape(K, W)
    if loads[by_load].max(axis=1).sum() >= c[identity].sum(axis=(2, 3)).max(axis=1).sum():
        return packs[identity]
    rng = np.random.default_rng([seed, epoch, 1, window])
    by_load = by_load[rng.permutation(K)]
    by_load = np.take_along_axis(by_load, np.argsort(rng.random((K, W)), axis=1), axis=1)
    rank_bins = bins[by_load]  # (K, W, A*B) positions, each bin's packs heaviest first (LPT fills in order)
    if A == 1:
        return packs[rank_bins].reshape(K, W, 1, B)
    # A rank's A*B packs into A micro-batches of B: dealt heaviest first in snake order (micro-batches
    # 0..A-1, then A-1..0, ...), vectorised over every rank-step; then its micro-batches heaviest first.
    by_cost = np.take_along_axis(rank_bins, np.argsort(-c[rank_bins], axis=2, kind="stable"), axis=2)
    j = np.arange(A * B)
    snake = np.where((j // A) % 2 == 0, j % A, A - 1 - j % A)  # micro-batch of the j-th heaviest pack
    micro = by_cost[:, :, np.argsort(snake, kind="stable")].reshape(K, W, A, B)
    heaviest_first = np.argsort(-c[micro].sum(axis=3), axis=2, kind="stable")
    return packs[np.take_along_axis(micro, heaviest_first[..., None], axis=2)]


def balanced_plan(
    costs: np.ndarray, shape: StepShape, seed: int, epoch: int, window_steps: int = DEFAULT_WINDOW_STEPS
) -> np.ndarray:
    """The whole balanced epoch, (steps, W, A, B) pack ids: balanced_window for every window.

    Packs 0..3 cost [9, 1, 8, 2]; 2 ranks, one pack each per step, both steps in one window:

    >>> plan = balanced_plan(np.array([9, 1, 8, 2]), StepShape(2, 1, 1), seed=0, epoch=0, window_steps=2)
    >>> sorted(sorted(step) for step in plan.reshape(2, 2).tolist())
    [[0, 2], [1, 3]]
    """
    costs = check_costs(costs)
    K = check_window_steps(window_steps)
    perm = epoch_permutation(costs.size, seed, epoch)
    n_windows = -(-shape.steps_per_epoch(costs.size) // K)
    return np.concatenate([balanced_window(costs, perm, shape, seed, epoch, w, K) for w in range(n_windows)])


def check_window_steps(window_steps: int) -> int:
    if isinstance(window_steps, bool) or not isinstance(window_steps, (int, np.integer)) or window_steps < 1:
        raise ValueError(
            f"window_steps must be an integer >= 1 (the steps whose packs are re-dealt), got {window_steps!r}"
        )
    return int(window_steps)


def _lpt(c: np.ndarray, n_bins: int, cap: int) -> np.ndarray:
    """Longest processing time first with a count cap: (n_bins, cap) indices into c, len(c) == n_bins * cap.

    Items by cost, largest first, each into the lightest bin with room (ties: the lower bin), then swaps
    between the heaviest and the lightest bin (_narrow).

        c = [5, 6, 9, 7, 6, 5], 2 bins of 3: 9 -> bin 0, 7 -> 1, 6 -> 1 (7 < 9), 6 -> 0 (9 < 13),
        5 -> 1 (13 < 15, now full), 5 -> 0         loads [20, 18]; swapping item 4 (6) for item 0 (5): [19, 19]

    >>> _lpt(np.array([5, 6, 9, 7, 6, 5]), n_bins=2, cap=3).tolist()
    [[2, 0, 5], [3, 1, 4]]
    """
    if cap == 1:
        return np.argsort(-c, kind="stable")[:, None]
    cost = c.tolist()
    out = np.empty((n_bins, cap), dtype=np.int64)
    fill = [0] * n_bins
    heap = [(0, b) for b in range(n_bins)]
    for i in np.argsort(-c, kind="stable").tolist():
        load, b = heapq.heappop(heap)
        out[b, fill[b]] = i
        fill[b] += 1
        if fill[b] < cap:
            heapq.heappush(heap, (load + cost[i], b))
    if n_bins > 1:
        _narrow(c, out)
    return out


def _narrow(c: np.ndarray, bins: np.ndarray) -> None:
    """Swap one item between the heaviest and the lightest bin, in place, the swap that best halves their gap,
    until none narrows it. A swap lowers the heavier bin and raises the lighter one to below the heavier one's
    old load, so the maximum never rises. At most n_bins swaps, O(cap**2) each."""
    loads = c[bins].sum(axis=1)
    never = np.iinfo(np.int64).max
    for _ in range(len(bins)):
        hi, lo = int(np.argmax(loads)), int(np.argmin(loads))
        gap = loads[hi] - loads[lo]
        # d_CC[i, j]: the load that swapping hi's item i for lo's item j moves from hi to lo
        d = c[bins[hi]][:, None] - c[bins[lo]][None, :]
        # The pair's new max is max(hi - d, lo + d): any d in (0, gap) lowers it, d nearest gap/2 the most.
        score = np.where((d > 0) & (d < gap), np.abs(2 * d - gap), never)
        i, j = np.unravel_index(int(np.argmin(score)), score.shape)
        if score[i, j] == never:
            return
        bins[hi, i], bins[lo, j] = bins[lo, j], bins[hi, i]
        loads[hi] -= d[i, j]
        loads[lo] += d[i, j]
