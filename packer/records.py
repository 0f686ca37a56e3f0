"""Record types shared by every stage: handler -> tokenizer -> packer -> writer -> reader."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Segment:
    """A piece of a formatted sample. `target=True` means its tokens are trained on (loss mask 1)."""

    text: str
    target: bool = False


@dataclass(frozen=True, slots=True)
class Sample:
    """One tokenized sample: ids end with exactly one EOD; loss_mask[i] == 1 means ids[i] is a target."""

    ids: np.ndarray  # (L,) int64
    loss_mask: np.ndarray  # (L,) uint8


@dataclass(frozen=True, slots=True)
class Pack:
    """One packed sequence as a trainer sees it.

    For doc_lens [3, 2]:
        ids        a0 a1 EOD b0 EOD
        loss_mask   0  1   1  1   1
        doc_lens   [3, 2]   -> actual_seq_len [3, 5], cu_seqlens [0, 3, 5]
    """

    ids: np.ndarray  # (T,) int64, T = doc_lens.sum() <= seq_length
    loss_mask: np.ndarray  # (T,) uint8
    doc_lens: np.ndarray  # (n_docs,) int32
