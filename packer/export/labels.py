"""Per-token views of a group of packs that every export shares: document starts, positions, unshifted labels.

packer's loss mask marks target TOKENS (mask[t] == 1: the model is trained to predict token t from the tokens
before it in the same document). The first token of a document has nothing before it in its document, so it is
never a target in any export, whatever its mask says (otherwise a shift that crosses the boundary would train
the previous document's last token to predict it). For doc_lens [3, 2]:

    ids            a0 a1 E  b0 E
    mask           0  1  1  1  1
    doc_start      1  0  0  1  0
    positions      0  1  2  0  1
    labels         -  a1 E  -  E        (unshifted: - = -100; HF, TRL, MindSpeed shift inside the model)
"""

from __future__ import annotations

import numpy as np

IGNORE = -100


def doc_starts(seq_lens: np.ndarray, total: int) -> np.ndarray:
    """(total,) bool: True at the first token of every document (zero-length documents start nowhere)."""
    starts = np.zeros(total, dtype=bool)
    offsets = (np.cumsum(seq_lens) - seq_lens)[seq_lens > 0]
    starts[offsets] = True
    return starts


def positions(seq_lens: np.ndarray) -> np.ndarray:
    """0..len-1 for every document, concatenated (int64)."""
    total = int(seq_lens.sum())
    return np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(seq_lens) - seq_lens, seq_lens)


def targets(mask: np.ndarray, seq_lens: np.ndarray) -> np.ndarray:
    """(total,) bool: the tokens any export trains on: packer's mask, minus every document's first token."""
    return (mask != 0) & ~doc_starts(seq_lens, mask.size)


def unshifted_labels(ids: np.ndarray, mask: np.ndarray, seq_lens: np.ndarray) -> np.ndarray:
    """(total,) int64: the token id where it is a target, else IGNORE."""
    return np.where(targets(mask, seq_lens), ids.astype(np.int64), IGNORE)
