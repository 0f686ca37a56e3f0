"""CPU emulator of `torch_npu.npu_fusion_attention`, for the subset the trainer uses. NOT the Ascend kernel.

No Ascend device exists where this project is tested, so the npu backend is exercised against this function
instead. It implements the semantics documented for torch_npu (Ascend/op-plugin
docs/context/torch_npu-npu_fusion_attention.md) for the varlen case MindSpeed-LLM uses on packed data:

    input_layout "TND"      q (T, N1, D), k/v (T, N2, D), N1 % N2 == 0 (GQA: q head h reads kv head h // (N1/N2))
    actual_seq_qlen/kvlen   CUMULATIVE ends, python ints: lengths [2, 2, 0, 2, 2] -> [2, 4, 4, 6, 8]
    sparse_mode 3           rightDownCausal within each segment; atten_mask is the compressed
                            (2048, 2048) bool, True above the diagonal; pre_tockens/next_tockens are ignored
    returns                 (attention_out, softmax_max, softmax_sum, softmax_out, seed, offset, mask_len)

Every argument outside that subset is rejected with a message rather than emulated approximately: a test
that passes here must mean the call is one the documented kernel accepts and computes the same way. What it
cannot show: kernel numerics (bf16 accumulation, tiling), performance, and undocumented constraints.
Documented features left out on purpose: other layouts and sparse modes, pse, dropout, prefix, and the
trailing-zeros form of actual_seq_qlen ([2, 5, 9, 0, 0] = skip the last two batches).
"""

from __future__ import annotations

import torch

MASK_SIZE = 2048
MAX_SEGMENTS = 1024  # documented limit on len(actual_seq_qlen) in the varlen case
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class NpuArgumentError(ValueError):
    """A call the real kernel would reject or compute differently from what the caller means."""


def _check_seq_lens(name: str, lens, total: int) -> list[int]:
    if not isinstance(lens, list | tuple):
        raise NpuArgumentError(
            f"{name} must be a python list of ints (host side), got {type(lens).__name__}; pass cu_seqlens[1:].tolist()"
        )
    if not lens or len(lens) > MAX_SEGMENTS:
        raise NpuArgumentError(f"{name} must hold 1..{MAX_SEGMENTS} segments, got {len(lens)}")
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


def _check_mask(atten_mask) -> None:
    if atten_mask is None:
        raise NpuArgumentError(
            "sparse_mode=3 needs atten_mask; without it the kernel silently computes full attention"
        )
    if not isinstance(atten_mask, torch.Tensor) or atten_mask.shape != (MASK_SIZE, MASK_SIZE):
        shape = tuple(atten_mask.shape) if isinstance(atten_mask, torch.Tensor) else type(atten_mask).__name__
        raise NpuArgumentError(
            f"sparse_mode=3 takes the compressed causal mask of shape ({MASK_SIZE}, {MASK_SIZE}), got {shape}; build "
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
):
    """Signature of torch_npu.npu_fusion_attention (the spelling `tockens` is the real one)."""
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
    if sparse_mode != 3:
        raise NpuArgumentError(
            f"emulated sparse_mode is 3 (rightDownCausal with the compressed mask), got {sparse_mode}"
        )
    if not isinstance(scale, float | int) or isinstance(scale, bool):
        raise NpuArgumentError(f"scale must be a python float, got {type(scale).__name__}")
    if inner_precise not in (0, 1, 2):
        raise NpuArgumentError(f"inner_precise must be 0, 1 or 2, got {inner_precise!r}")
    _check_mask(atten_mask)
    q_ends = _check_seq_lens("actual_seq_qlen", actual_seq_qlen, T)
    kv_ends = _check_seq_lens("actual_seq_kvlen", actual_seq_kvlen, T)
    if q_ends != kv_ends:
        raise NpuArgumentError(
            "actual_seq_qlen and actual_seq_kvlen must be equal for packed self-attention, got "
            f"{q_ends[:16]} and {kv_ends[:16]}"
        )

    # rightDownCausal per segment: key j (offset kj) is visible to query i (offset qi) iff kj <= qi + (Skv - Sq).
    starts = [0, *q_ends[:-1]]
    seg = torch.repeat_interleave(torch.arange(len(q_ends)), torch.tensor(q_ends) - torch.tensor(starts))
    offset = torch.arange(T) - torch.tensor(starts)[seg]
    keep = (seg[:, None] == seg[None, :]) & (offset[None, :] <= offset[:, None])  # Sq == Skv: plain causal
    keep = keep.to(query.device)

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
