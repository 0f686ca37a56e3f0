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
    returns                 (attention_out, softmax_max, softmax_sum, softmax_out, seed, offset, mask_len)

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
SPARSE_MODES = {3: "rightDownCausal", 4: "band"}
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
    if input_layout != "TND":
        raise NpuArgumentError(f"emulated input_layout is 'TND' (packed varlen), got {input_layout!r}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise NpuArgumentError(f"TND {name} must be a 3-D tensor (T, N, D), got {getattr(t, 'shape', t)}")
        if t.dtype not in _DTYPES or t.dtype != query.dtype:
            raise NpuArgumentError(f"query/key/value must share one of {_DTYPES}, got {name} {t.dtype}")
    T, N1, D = query.shape
    if key.shape != value.shape:
        raise NpuArgumentError(
            f"key and value shapes must match, got {tuple(key.shape)} and {tuple(value.shape)}"
        )
    if key.shape[0] != T or key.shape[2] != D:
        raise NpuArgumentError(
            f"key {tuple(key.shape)} must have T={T} and D={D} like query {tuple(query.shape)}"
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
            f"emulated sparse_mode is 4 (band) or 3 (rightDownCausal), both with the compressed mask, got "
            f"{sparse_mode!r}"
        )
    if sparse_mode == 4:
        for name, val in (("pre_tockens", pre_tockens), ("next_tockens", next_tockens)):
            if type(val) is not int or val < 0:
                raise NpuArgumentError(
                    f"sparse_mode=4 (band) takes {name} as a python int >= 0 here, got {val!r}; MindSpeed-LLM "
                    "passes pre_tockens=65536, next_tockens=0 (causal)"
                )
    if softmax_layout != "":
        raise NpuArgumentError(f"softmax_layout {softmax_layout!r} is outside the emulated subset; pass ''")
    if not isinstance(scale, float | int) or isinstance(scale, bool):
        raise NpuArgumentError(f"scale must be a python float, got {type(scale).__name__}")
    if inner_precise not in (0, 1, 2):
        raise NpuArgumentError(f"inner_precise must be 0, 1 or 2, got {inner_precise!r}")
    _check_mask(atten_mask, sparse_mode)
    q_ends = _check_seq_lens("actual_seq_qlen", actual_seq_qlen, T)
    kv_ends = _check_seq_lens("actual_seq_kvlen", actual_seq_kvlen, T)
    if q_ends != kv_ends:
        raise NpuArgumentError(
            "actual_seq_qlen and actual_seq_kvlen must be equal for packed self-attention, got "
            f"{q_ends[:16]} and {kv_ends[:16]}"
        )

    keep = _keep_mask(q_ends, sparse_mode, pre_tockens, next_tockens).to(query.device)

    G = N1 // N2
    q = query.float().transpose(0, 1)  # (N1, T, D)
    k = key.float().repeat_interleave(G, dim=1).transpose(0, 1)
    v = value.float().repeat_interleave(G, dim=1).transpose(0, 1)
    scores = (q @ k.transpose(1, 2)) * float(scale)
    scores = scores.masked_fill(~keep, float("-inf"))
    softmax_max = scores.amax(dim=-1, keepdim=True)  # (N1, T, 1); every row keeps its own diagonal
    probs = torch.exp(scores - softmax_max)
    softmax_sum = probs.sum(dim=-1, keepdim=True)
    out = ((probs / softmax_sum) @ v).transpose(0, 1).to(query.dtype)  # (T, N1, D)
    # The kernel returns max/sum in NTD-like layout, broadcast to 8 lanes; kept for shape-compatibility only.
    return (
        out,
        softmax_max.detach().expand(N1, T, 8),
        softmax_sum.detach().expand(N1, T, 8),
        query.new_empty(0),
        0,
        0,
        0,
    )
