"""Attention cost of packs, and a data order that balances it across data-parallel ranks.

Packed rows all hold about `seq_length` tokens, so the linear parts of a step (MLPs, projections, the loss)
cost the same on every rank. Attention does not: with document masking (varlen attention) a document of L
tokens costs L*(L+1)/2 causal query-key pairs, so one 8192-token document costs as much as 64 documents of
1024 tokens in the same row. The rank that drew the pack of long documents sets the step time; the others wait.
"""

from __future__ import annotations

import numpy as np


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
    cuts each document into 2N chunks, so each document is padded to a multiple of 2N tokens
    (padded_len = ceil(len / multiple) * multiple); multiple 1 = the real lengths.

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
            f"multiple must be an integer >= 1 (the per-document padding, 2 x the CP size), got {multiple!r}"
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
