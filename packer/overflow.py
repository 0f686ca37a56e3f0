"""`--overflow`: what becomes of a sample longer than `--seq-length`. Pure: arrays in, arrays and counts out.

For seq_length 4 and a 7-token sample (T = target, E = EOD):

    ids         p0 p1 t0 t1 t2 t3 E
    truncate    p0 p1 t0 E                  the response is cut, the document still ends (EOD kept)
    split       p0 p1 t0 t1 | t2 t3 E       chunks of seq_length; only the last ends with EOD
    drop        (nothing)
    error       SampleTooLong
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

POLICIES = ("truncate", "split", "drop", "error")


class SampleTooLong(ValueError):
    def __init__(self, length: int, seq_length: int):
        super().__init__(f"sample is {length} tokens, longer than --seq-length {seq_length}")
        self.length, self.seq_length = length, seq_length


@dataclass(frozen=True, slots=True)
class Fitted:
    """The samples an over-long sample became, and what happened to it (the build's counters of the same name)."""

    pieces: list[tuple[np.ndarray, np.ndarray]]  # (ids, loss_mask) of each sample, in order
    truncated: int = 0
    split: int = 0
    dropped: int = 0
    dropped_no_target: int = 0  # truncation left no trainable token, or a split chunk had none
    unterminated: int = 0  # split chunks that do not end with EOD


def fit(ids: np.ndarray, mask: np.ndarray, seq_length: int, policy: str) -> Fitted:
    """Apply `policy` to one sample (`ids` ends with its EOD); a sample that fits comes back unchanged."""
    if policy not in POLICIES:
        raise ValueError(f"unknown --overflow policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if seq_length < 2:
        raise ValueError(f"--seq-length must be >= 2, got {seq_length}")
    n = seq_length
    if ids.size <= n:
        return Fitted([(ids, mask)])
    if policy == "error":
        raise SampleTooLong(ids.size, n)
    if policy == "drop":
        return Fitted([], dropped=1)
    if policy == "truncate":
        # Keep the first n-1 tokens and the EOD.
        cut_ids, cut_mask = np.append(ids[: n - 1], ids[-1]), np.append(mask[: n - 1], mask[-1])
        if not cut_mask[:-1].any():
            return Fitted([], dropped_no_target=1)
        return Fitted([(cut_ids, cut_mask)], truncated=1)
    chunks, untrained, ends = [], 0, False
    for a in range(0, ids.size, n):
        if not mask[a : a + n].any():
            untrained += 1
            continue
        chunks.append((ids[a : a + n], mask[a : a + n]))
        ends = a + n >= ids.size
    # Only the last chunk holds the EOD (a target, so that chunk is never dropped): the others are unterminated.
    return Fitted(chunks, split=1, dropped_no_target=untrained, unterminated=len(chunks) - int(ends))
