"""Context-parallel builds (`packer build --cp-size N --tp-size M`): every sample padded to the multiple that
the trainers' context-parallel split needs -- virtually, so the stored data stays exactly a plain build's.

Ring attention with a causal mask cuts every document into 2*CP chunks and gives CP rank r the chunks r and
2*CP-1-r (the zigzag split balances the causal work), so every document must hold a multiple of 2*CP tokens.
Who asks for what (docs/context-parallel.md cites each):

    MindSpeed  mindspeed/core/context_parallel/utils.py::pad_data(actual_seq_len, batch, cp_size, tp_size),
               called by MindSpeed-LLM's get_batch with --reset-attention-mask, --attention-mask-type causal,
               --context-parallel-algo megatron_cp_algo and --context-parallel-size > 1: pads every segment to a
               multiple of lcm(2, TP) * CP (TP counts whether or not --sequence-parallel is on)
    TE / mcore get_thd_batch_on_this_cp_rank -> tex.thd_get_partitioned_indices(cu_seqlens_padded, ...): every
               document of cu_seqlens_padded a multiple of 2 * CP; with --sequence-parallel a CP rank's S / CP
               tokens are scattered over TP ranks (tensor_parallel.mappings._split_along_first_dim: divisible)
    Megatron-LM arguments.py: seq_length % (2 * CP) == 0

so the multiple is m = CP * lcm(2, TP) for CP > 1, which covers both; at CP 1 no trainer pads a document for TP
alone (m = 1), and seq_length must be a multiple of m and of TP.

The build packs by PADDED lengths, ceil(len / m) * m, so that the padded samples of every pack fit in
seq_length; it stores the real samples unchanged (each still ends with its EOD, the loss mask is the plain
build's), and records m in the manifest's `context_parallel` section. The padded length of every sample is then
a pure function of the index and m, and padding is never a target. For m = 4 and seq_length 16:

    sample lengths   5  3  8            stored in .bin/.idx as they are (16 tokens, one pack)
    padded lengths   8  4  8    = 20    > 16: the build puts the 8-token sample in another pack
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

RULE = (
    "every sample counts as ceil(len / m) * m tokens, m = CP x lcm(2, TP) for CP > 1 (MindSpeed pad_data; a "
    "multiple of 2 x CP, as TransformerEngine's THD split needs), 1 at CP 1; padding follows each sample and is "
    "never a target"
)


class CPError(ValueError):
    """A CP/TP setting that cannot work: the message names the value and the fix."""


def pad_multiple(cp_size: int, tp_size: int = 1) -> int:
    """The multiple every sample is padded to for context parallelism `cp_size` and tensor parallelism `tp_size`.

    >>> [pad_multiple(1), pad_multiple(2), pad_multiple(4), pad_multiple(2, 2), pad_multiple(2, 3), pad_multiple(1, 4)]
    [1, 4, 8, 4, 12, 1]
    """
    for name, value in (("--cp-size", cp_size), ("--tp-size", tp_size)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise CPError(
                f"{name} {value!r}: must be an integer >= 1 (the trainer's {name[2:4].upper()} size)"
            )
    return int(cp_size) * math.lcm(2, int(tp_size)) if cp_size > 1 else 1


def check_seq_length(seq_length: int, cp_size: int, tp_size: int = 1) -> int:
    """The multiple m for these sizes, once seq_length is known to be a multiple of m and of TP; else CPError
    naming the nearest seq_lengths that are."""
    m = pad_multiple(cp_size, tp_size)
    need = math.lcm(m, int(tp_size))
    if seq_length % need:
        lo, hi = seq_length // need * need, -(-seq_length // need) * need
        why = (
            f"every document is padded to a multiple of {m} (CP {cp_size} x lcm(2, TP {tp_size}))"
            if m > 1
            else f"sequence parallelism splits each row over TP {tp_size} ranks"
        )
        raise CPError(
            f"--seq-length {seq_length} is not a multiple of {need}: {why}; pass --seq-length "
            + (f"{lo} or {hi}" if lo else f"{hi}")
        )
    return m


def padded_lengths(lens: np.ndarray, multiple: int) -> np.ndarray:
    """Every length rounded up to a multiple of `multiple` (int64): [5, 3, 8], 4 -> [8, 4, 8]."""
    lens = np.asarray(lens, dtype=np.int64)
    return lens if multiple == 1 else -(-lens // multiple) * multiple


def pack_figures(
    lens: np.ndarray, docs: np.ndarray, multiple: int, chunk: int = 1 << 20
) -> tuple[int, np.ndarray, np.ndarray]:
    """(padded tokens of all samples, padded tokens per pack (packs,), attention cost per pack (packs,)) of an
    index (`docs` rising from 0 to len(lens)), chunk packs at a time so the padded lengths never exist for the
    whole index at once. A pack's cost is the sum of its samples' squared padded lengths
    (`packer.balance.pack_attention_costs`)."""
    from packer.balance import pack_attention_costs

    docs = np.asarray(docs, dtype=np.int64)
    total, per_pack, costs = 0, [], []
    for a in range(0, docs.size - 1, chunk):
        d = docs[a : a + chunk + 1]
        seg = padded_lengths(lens[d[0] : d[-1]], multiple)
        ends = np.concatenate([[0], np.cumsum(seg)])
        per_pack.append(ends[d[1:] - d[0]] - ends[d[:-1] - d[0]])
        costs.append(pack_attention_costs(seg, d - d[0]))
        total += int(ends[-1])
    empty = np.zeros(0, np.int64)
    return total, np.concatenate(per_pack) if per_pack else empty, np.concatenate(costs) if costs else empty


def section(
    cp_size: int, tp_size: int, pad_id: int, real_tokens: int, padded_tokens: int, max_padded_pack_tokens: int
) -> dict[str, Any]:
    """The manifest's `context_parallel` section (docs/format.md)."""
    return {
        "cp_size": int(cp_size),
        "tp_size": int(tp_size),
        "multiple": pad_multiple(cp_size, tp_size),
        "rule": RULE,
        "pad_id": int(pad_id),
        "real_tokens": int(real_tokens),
        "padded_tokens": int(padded_tokens),
        "max_padded_pack_tokens": int(max_padded_pack_tokens),
    }


def percentiles(values: np.ndarray, qs: tuple[float, ...]) -> np.ndarray:
    """`np.percentile(values, qs)` (its default "linear" method), the same floats, of a non-empty 1-D array
    of integers: np.percentile's np.unique imports numpy.ma, 26 ms of every build's start-up."""
    a = np.sort(np.asarray(values))
    n = a.size
    at = (n - 1) * (np.asarray(qs, dtype=np.float64) / 100)
    lo = np.floor(at).astype(np.intp)
    lo[at >= n - 1] = n - 1
    hi = np.minimum(lo + 1, n - 1)
    gamma = at - lo
    below, above = a[lo], a[hi]
    diff = above - below
    # numpy's _lerp: from the lower neighbour, or from the upper one where gamma >= 0.5 (the same rounding)
    return np.where(gamma >= 0.5, above - diff * (1 - gamma), below + diff * gamma)


def attention_summary(costs: np.ndarray, multiple: int) -> dict[str, Any]:
    """The manifest's `attention_cost` section from the per-pack costs (int64, (packs,)): a pack's cost is the sum
    of its samples' squared padded lengths (causal attention scores about half of that in query-key pairs)."""
    costs = np.asarray(costs, dtype=np.int64)
    q = percentiles(costs, (50, 99)) if costs.size else np.zeros(2)
    return {
        "multiple": int(multiple),
        "total": int(costs.sum()),
        "max": int(costs.max(initial=0)),
        "mean": round(float(costs.mean()), 3) if costs.size else 0.0,
        "p50": float(q[0]),
        "p99": float(q[1]),
    }


def index_problems(where: str, fields: dict[str, Any], lens: np.ndarray, docs: np.ndarray) -> list[str]:
    """The `context_parallel` and `attention_cost` sections (`check_manifest`'s fields) against each other and the
    index: the multiple is the rule's for the sizes, seq_length a multiple of it, every pack's padded samples fit,
    and every figure is the index's."""
    problems = []
    seq_length = fields.get("config.seq_length")
    cp, tp, m = (fields.get(f"context_parallel.{k}") for k in ("cp_size", "tp_size", "multiple"))
    if cp is not None and tp is not None and m is not None:
        if m != pad_multiple(cp, tp):
            problems.append(
                f"{where}: context_parallel.multiple = {m}, but CP {cp} and TP {tp} need "
                f"{pad_multiple(cp, tp)} ({RULE})"
            )
        elif seq_length is not None:
            try:
                check_seq_length(seq_length, cp, tp)
            except CPError as e:
                problems.append(f"{where}: config.seq_length does not fit context_parallel: {e}")
    if "context_parallel.rule" in fields and fields["context_parallel.rule"] != RULE:
        problems.append(
            f"{where}: context_parallel.rule = {fields['context_parallel.rule']!r}, but packer pads by "
            f"{RULE!r}"
        )
    multiple = m if m is not None else 1
    for key in ("attention_cost.multiple",):
        if key in fields and fields[key] != multiple:
            problems.append(f"{where}: {key} = {fields[key]}, but the build pads to multiples of {multiple}")
    has_cost = any(k.startswith("attention_cost.") for k in fields)
    if m is None and not has_cost:
        return problems
    padded, per_pack, costs = pack_figures(lens, docs, multiple)
    if m is not None and seq_length is not None and per_pack.size and per_pack.max() > seq_length:
        over = int((per_pack > seq_length).sum())
        problems.append(
            f"{where}: {over} packs hold more than --seq-length {seq_length} tokens once their samples "
            f"are padded to multiples of {m} (the fullest {int(per_pack.max())}); rebuild with --cp-size "
            f"{cp} --tp-size {tp}"
        )
    actual = {
        "context_parallel.real_tokens": int(np.asarray(lens).sum(dtype=np.int64)),
        "context_parallel.padded_tokens": padded,
        "context_parallel.max_padded_pack_tokens": int(per_pack.max(initial=0)),
    }
    want = attention_summary(costs, multiple)
    actual |= {f"attention_cost.{k}": want[k] for k in ("total", "max")}
    for key, value in actual.items():
        if key in fields and fields[key] != value:
            problems.append(f"{where}: {key} = {fields[key]}, but the index says {value}")
    for k in ("mean", "p50", "p99"):
        got = fields.get(f"attention_cost.{k}")
        if got is not None and not math.isclose(got, want[k], rel_tol=1e-6, abs_tol=1e-3):
            problems.append(f"{where}: attention_cost.{k} = {got}, but the index says {want[k]}")
    return problems
