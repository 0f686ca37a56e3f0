"""CPU emulator of `torch_npu.npu_fusion_attention`, for the subset the trainer uses. NOT the Ascend kernel.

No Ascend device exists where this project is tested, so the npu backend is exercised against this function
instead. It implements the semantics documented for torch_npu (Ascend/op-plugin
docs/context/torch_npu-npu_fusion_attention.md) for the varlen case MindSpeed-LLM uses on packed data:

    input_layout "TND"      q (T, N1, D), k/v (T, N2, D), N1 % N2 == 0 (GQA: q head h reads kv head h // (N1/N2))
    actual_seq_qlen/kvlen   CUMULATIVE ends, python ints: lengths [2, 2, 0, 2, 2] -> [2, 4, 4, 6, 8]
    sparse_mode 4           band within each segment, origin at its bottom-right corner: query offset i
                            (of Sq) sees key offset j (of Skv) iff
                                i + (Skv-Sq) - pre_tockens  <=  j  <=  i + (Skv-Sq) + next_tockens
                            pre_tockens=65536, next_tockens=0 (MindSpeed-LLM) is causal for segments up
                            to 65536 tokens; a smaller pre_tockens is a sliding window
    sparse_mode 3           rightDownCausal within each segment: j <= i + (Skv-Sq); pre/next_tockens ignored
    atten_mask (3 and 4)    the compressed (2048, 2048) bool, True above the diagonal, whatever the length
    sparse_mode 0           (context-parallel ring steps, as MindSpeed's TND ring calls it) no atten_mask and
                            pre/next_tockens >= every key segment: full attention within each segment; here
                            actual_seq_qlen and actual_seq_kvlen may differ (queries of a segment vs keys of it)
    returns                 (attention_out, softmax_max, softmax_sum, softmax_out, seed, offset, mask_len),
                            softmax_max/sum float32 (T, N1, 8) in TND, the 8 lanes equal
    npu_fusion_attention_grad  the backward for the same subset, from softmax_max/sum and attention_in

Here Sq == Skv (packed self-attention), so both modes are top-left aligned too; for
pre_tockens >= the segment length and next_tockens = 0 mode 4 equals mode 3.

Every argument outside that subset is rejected with a message rather than emulated approximately: a test
that passes here must mean the call is one the documented kernel accepts and computes the same way. What it
cannot show: kernel numerics (bf16 accumulation, tiling), performance, and undocumented constraints.
Documented features left out on purpose: other layouts and sparse modes, pse, dropout, prefix, negative
pre/next_tockens (rows with no key at a segment's start), softmax_layout="TND", and the trailing-zeros
form of actual_seq_qlen ([2, 5, 9, 0, 0] = skip the last two batches).
"""

from __future__ import annotations

import torch

MASK_SIZE = 2048
# op-plugin docs, constraints: the length of actual_seq_qlen is 1~2K, "in the varlen case at most 1K". The same
# page gives B 1~2K for varlen, and MindSpeed-LLM only warns above 2048; the emulator enforces the stricter one.
MAX_SEGMENTS = 1024
SPARSE_MODES = {0: "defaultMask", 3: "rightDownCausal", 4: "band"}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class NpuArgumentError(ValueError):
    """A call the real kernel would reject or compute differently from what the caller means."""


def _check_seq_lens(name: str, lens, total: int) -> list[int]:
    if not isinstance(lens, list | tuple):
        raise NpuArgumentError(
            f"{name} must be a python list of ints (host side), got {type(lens).__name__}; pass cu_seqlens[1:].tolist()"
        )
    if not lens or len(lens) > MAX_SEGMENTS:
        raise NpuArgumentError(
            f"{name} must hold 1..{MAX_SEGMENTS} segments (the documented varlen limit), got {len(lens)}; split "
            "the TND token axis at segment boundaries into several calls (trainer.kernels.npu_call_plan)"
        )
    bad = [x for x in lens if type(x) is not int]
    if bad:
        raise NpuArgumentError(
            f"{name} must hold python ints, got {type(bad[0]).__name__} ({bad[0]!r}); use .tolist()"
        )
    prev = 0
    for i, x in enumerate(lens):
        if x < prev:
            raise NpuArgumentError(
                f"{name} must be cumulative ends (non-decreasing), but entry {i} = {x} < {prev}: {list(lens)[:16]}; "
                f"per-document lengths [2, 2, 0, 2] are passed as [2, 4, 4, 6]"
            )
        prev = x
    if lens[-1] != total:
        raise NpuArgumentError(f"{name} must end at T = {total} (the TND token count), got {lens[-1]}")
    return list(lens)


def _check_mask(atten_mask, sparse_mode: int) -> None:
    if atten_mask is None:
        raise NpuArgumentError(
            f"sparse_mode={sparse_mode} needs atten_mask; without it the kernel silently computes full attention"
        )
    if not isinstance(atten_mask, torch.Tensor) or atten_mask.shape != (MASK_SIZE, MASK_SIZE):
        shape = tuple(atten_mask.shape) if isinstance(atten_mask, torch.Tensor) else type(atten_mask).__name__
        raise NpuArgumentError(
            f"sparse_mode={sparse_mode} takes the compressed causal mask of shape ({MASK_SIZE}, {MASK_SIZE}), got {shape}; build "
            f"it as torch.triu(torch.ones({MASK_SIZE}, {MASK_SIZE}), diagonal=1).bool()"
        )
    if atten_mask.dtype != torch.bool:
        raise NpuArgumentError(f"atten_mask must be bool (True = masked out), got {atten_mask.dtype}")
    expected = torch.ones(MASK_SIZE, MASK_SIZE, dtype=torch.bool, device=atten_mask.device).triu(1)
    if not torch.equal(atten_mask, expected):
        raise NpuArgumentError(
            "atten_mask must be upper-triangular above the diagonal (True = masked out), i.e. "
            f"torch.triu(torch.ones({MASK_SIZE}, {MASK_SIZE}), diagonal=1).bool(); an inverted (tril) mask "
            "would keep the future"
        )


def _keep_mask(ends: list[int], sparse_mode: int, pre_tockens: int, next_tockens: int) -> torch.Tensor:
    """(T, T) bool, True = query row may read key column. Segments [5, 3] (ends [5, 8]), mode 4, pre 1,
    next 0: each query sees itself and the one before it, never the other segment."""
    starts = [0, *ends[:-1]]
    T = ends[-1]
    seg = torch.repeat_interleave(torch.arange(len(ends)), torch.tensor(ends) - torch.tensor(starts))
    offset = torch.arange(T) - torch.tensor(starts)[seg]
    # Both offsets count from their segment's start, and Sq == Skv, so the bottom-right shift Skv - Sq is 0.
    rel = offset[None, :] - offset[:, None]  # key offset - query offset, (T, T)
    keep = rel <= 0 if sparse_mode == 3 else (rel >= -pre_tockens) & (rel <= next_tockens)
    return keep & (seg[:, None] == seg[None, :])


def npu_fusion_attention(
    query,
    key,
    value,
    head_num,
    input_layout,
    pse=None,
    padding_mask=None,
    atten_mask=None,
    scale=1.0,
    keep_prob=1.0,
    pre_tockens=2147483647,
    next_tockens=2147483647,
    inner_precise=0,
    prefix=None,
    actual_seq_qlen=None,
    actual_seq_kvlen=None,
    sparse_mode=0,
    gen_mask_parallel=True,
    sync=False,
    softmax_layout="",
):
    """Signature of torch_npu.npu_fusion_attention (the spelling `tockens` is the real one; softmax_layout
    is new in Ascend Extension for PyTorch 7.2.0)."""
    keep, N1, N2 = _check_call(
        query, key, value, head_num, input_layout, pse, padding_mask, atten_mask, scale, keep_prob,
        pre_tockens, next_tockens, inner_precise, prefix, actual_seq_qlen, actual_seq_kvlen, sparse_mode,
    )  # fmt: skip
    if softmax_layout != "":
        raise NpuArgumentError(f"softmax_layout {softmax_layout!r} is outside the emulated subset; pass ''")
    T = query.shape[0]
    q, k, v, scores = _scores(query, key, value, keep, scale, N1 // N2)
    softmax_max = scores.amax(dim=-1, keepdim=True)  # (N1, Tq, 1); every row keeps at least one key
    probs = torch.exp(scores - softmax_max)
    softmax_sum = probs.sum(dim=-1, keepdim=True)
    out = ((probs / softmax_sum) @ v).transpose(0, 1).to(query.dtype)  # (Tq, N1, D)
    # TND: softmax_max / softmax_sum are (T, N1, 8) float32, the 8 lanes equal (what MindSpeed's ring reads).
    return (
        out,
        softmax_max.detach().transpose(0, 1).expand(T, N1, 8),
        softmax_sum.detach().transpose(0, 1).expand(T, N1, 8),
        query.new_empty(0),
        0,
        0,
        0,
    )


def _scores(query, key, value, keep, scale, G: int):
    """fp32 q (N1, Tq, D), k/v repeated to the query heads (N1, Tk, D), and the masked scores (N1, Tq, Tk)."""
    q = query.float().transpose(0, 1)
    k = key.float().repeat_interleave(G, dim=1).transpose(0, 1)
    v = value.float().repeat_interleave(G, dim=1).transpose(0, 1)
    return q, k, v, ((q @ k.transpose(1, 2)) * float(scale)).masked_fill(~keep, float("-inf"))


def _check_call(
    query, key, value, head_num, input_layout, pse, padding_mask, atten_mask, scale, keep_prob, pre_tockens,
    next_tockens, inner_precise, prefix, actual_seq_qlen, actual_seq_kvlen, sparse_mode,
):  # fmt: skip
    """The argument checks the forward and the backward share; returns the (Tq, Tk) keep mask, N1, N2."""
    if input_layout != "TND":
        raise NpuArgumentError(f"emulated input_layout is 'TND' (packed varlen), got {input_layout!r}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise NpuArgumentError(f"TND {name} must be a 3-D tensor (T, N, D), got {getattr(t, 'shape', t)}")
        if t.dtype not in _DTYPES or t.dtype != query.dtype:
            raise NpuArgumentError(f"query/key/value must share one of {_DTYPES}, got {name} {t.dtype}")
    Tq, N1, D = query.shape
    if key.shape != value.shape:
        raise NpuArgumentError(
            f"key and value shapes must match, got {tuple(key.shape)} and {tuple(value.shape)}"
        )
    Tk = key.shape[0]
    if key.shape[2] != D or (sparse_mode != 0 and Tk != Tq):
        raise NpuArgumentError(
            f"key {tuple(key.shape)} must have D={D} (and T={Tq} unless sparse_mode=0) like query "
            f"{tuple(query.shape)}"
        )
    N2 = key.shape[1]
    if type(head_num) is not int or head_num != N1:
        raise NpuArgumentError(
            f"head_num must be the number of QUERY heads N1={N1} (an int), got {head_num!r}"
        )
    if N1 % N2:
        raise NpuArgumentError(f"query heads N1={N1} must be a multiple of key/value heads N2={N2}")
    for name, val in (("pse", pse), ("padding_mask", padding_mask), ("prefix", prefix)):
        if val is not None:
            raise NpuArgumentError(f"{name} is outside the emulated subset; pass None")
    if keep_prob != 1.0:
        raise NpuArgumentError(f"keep_prob must be 1.0 (no attention dropout), got {keep_prob}")
    if sparse_mode not in SPARSE_MODES:
        raise NpuArgumentError(
            f"emulated sparse_mode is 4 (band) or 3 (rightDownCausal), both with the compressed mask, or 0 "
            f"(defaultMask) without a mask and pre/next_tockens covering every key, got {sparse_mode!r}"
        )
    if sparse_mode in (0, 4):
        for name, val in (("pre_tockens", pre_tockens), ("next_tockens", next_tockens)):
            if type(val) is not int or val < 0:
                raise NpuArgumentError(
                    f"sparse_mode={sparse_mode} takes {name} as a python int >= 0 here, got {val!r}; MindSpeed-LLM "
                    "passes pre_tockens=65536, next_tockens=0 (causal) with mode 4"
                )
    if not isinstance(scale, float | int) or isinstance(scale, bool):
        raise NpuArgumentError(f"scale must be a python float, got {type(scale).__name__}")
    if inner_precise not in (0, 1, 2):
        raise NpuArgumentError(f"inner_precise must be 0, 1 or 2, got {inner_precise!r}")
    q_ends = _check_seq_lens("actual_seq_qlen", actual_seq_qlen, Tq)
    kv_ends = _check_seq_lens("actual_seq_kvlen", actual_seq_kvlen, Tk)
    if len(q_ends) != len(kv_ends):
        raise NpuArgumentError(
            f"actual_seq_qlen and actual_seq_kvlen must list the same segments, got {len(q_ends)} and "
            f"{len(kv_ends)} entries"
        )
    if sparse_mode == 0:
        if atten_mask is not None:
            raise NpuArgumentError("emulated sparse_mode=0 takes no atten_mask (full attention within segments)")
        lk = max(b - a for a, b in zip([0, *kv_ends[:-1]], kv_ends, strict=True))
        # defaultMask with a band: query i sees key j iff i - pre <= j <= i + next (top-left); the emulated
        # subset is the band that covers every key, which is how MindSpeed's ring passes it (pre = next = Tk)
        if pre_tockens < lk or next_tockens < lk:
            raise NpuArgumentError(
                f"emulated sparse_mode=0 needs pre_tockens and next_tockens >= the longest key segment ({lk}), "
                f"got {pre_tockens} and {next_tockens}; a narrower band is outside the emulated subset"
            )
        return _cross_mask(q_ends, kv_ends).to(query.device), N1, N2
    _check_mask(atten_mask, sparse_mode)
    if q_ends != kv_ends:
        raise NpuArgumentError(
            "actual_seq_qlen and actual_seq_kvlen must be equal for packed self-attention, got "
            f"{q_ends[:16]} and {kv_ends[:16]}"
        )
    return _keep_mask(q_ends, sparse_mode, pre_tockens, next_tockens).to(query.device), N1, N2


def _cross_mask(q_ends: list[int], kv_ends: list[int]) -> torch.Tensor:
    """(Tq, Tk) bool: query row and key column in the same segment (sparse_mode 0, full band)."""
    def seg_of(ends):
        ends_t = torch.tensor(ends)
        return torch.repeat_interleave(torch.arange(len(ends)), ends_t - torch.tensor([0, *ends[:-1]]))

    return seg_of(q_ends)[:, None] == seg_of(kv_ends)[None, :]


def npu_fusion_attention_grad(
    query,
    key,
    value,
    dy,
    head_num,
    input_layout,
    *,
    pse=None,
    padding_mask=None,
    atten_mask=None,
    softmax_max=None,
    softmax_sum=None,
    softmax_in=None,
    attention_in=None,
    scale_value=1.0,
    keep_prob=1.0,
    pre_tockens=2147483647,
    next_tockens=2147483647,
    inner_precise=0,
    seed=0,
    offset=0,
    numels=0,
    prefix=None,
    actual_seq_qlen=None,
    actual_seq_kvlen=None,
    sparse_mode=0,
    gen_mask_parallel=True,
    sync=False,
):
    """Signature of torch_npu.npu_fusion_attention_grad; returns (dq, dk, dv, dpse).

    The probabilities are rebuilt from the statistics the caller passes, P = exp(S - softmax_max) /
    softmax_sum ((T, N1, 8), lanes equal), and D = rowsum(dy * attention_in): with a ring's merged statistics
    and final output this is one step's share of the exact gradient (flash-attention's backward).
    """
    keep, N1, N2 = _check_call(
        query, key, value, head_num, input_layout, pse, padding_mask, atten_mask, scale_value, keep_prob,
        pre_tockens, next_tockens, inner_precise, prefix, actual_seq_qlen, actual_seq_kvlen, sparse_mode,
    )  # fmt: skip
    Tq = query.shape[0]
    for name, t in (("softmax_max", softmax_max), ("softmax_sum", softmax_sum)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (Tq, N1, 8) or t.dtype != torch.float32:
            raise NpuArgumentError(
                f"{name} must be the forward's float32 (T, N1, 8) = ({Tq}, {N1}, 8) statistics in TND, got "
                f"{getattr(t, 'shape', t)} {getattr(t, 'dtype', '')}"
            )
    for name, t in (("dy", dy), ("attention_in", attention_in)):
        if not isinstance(t, torch.Tensor) or t.shape != query.shape or t.dtype != query.dtype:
            raise NpuArgumentError(
                f"{name} must be shaped and typed like query {tuple(query.shape)} {query.dtype}, got "
                f"{getattr(t, 'shape', t)} {getattr(t, 'dtype', '')}"
            )
    if softmax_in is not None:
        raise NpuArgumentError("softmax_in is outside the emulated subset; pass None")
    G = N1 // N2
    q, k, v, scores = _scores(query, key, value, keep, scale_value, G)
    do = dy.float().transpose(0, 1)
    o = attention_in.float().transpose(0, 1)
    m = softmax_max[..., 0].transpose(0, 1)[..., None]  # (N1, Tq, 1)
    den = softmax_sum[..., 0].transpose(0, 1)[..., None]
    p = torch.exp(scores - m) / den
    dv = p.transpose(1, 2) @ do  # (N1, Tk, D)
    ds = p * (do @ v.transpose(1, 2) - (do * o).sum(-1, keepdim=True))
    dq = ds @ k * float(scale_value)
    dk = ds.transpose(1, 2) @ q * float(scale_value)
    Tk, D = key.shape[0], key.shape[2]
    fold = lambda x: x.view(N2, G, Tk, D).sum(1).transpose(0, 1).to(key.dtype)  # noqa: E731  GQA: sum a group
    return dq.transpose(0, 1).to(query.dtype), fold(dk), fold(dv), None
