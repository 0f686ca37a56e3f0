"""Causal attention over packed, document-bounded token streams.

A batch is flattened to one stream of T = B*S tokens. Documents (and one padding-tail segment per padded
row) are contiguous segments of that stream, given as cumulative offsets; attention is causal and never
crosses a segment. For rows of S=8, docs [3, 2] then [5] + 3 padding tokens:

    tokens        a a a b b | c c c c c p p p
    cu_seqlens    [0, 3, 5, 8, 13, 16]         (CUDA form, leading 0)
    actual_seq_len   [3, 5, 8, 13, 16]         (Ascend form, cumulative ends)

Backends (see docs/attention.md):
    reference  exact, one segment at a time, fp32 softmax; the ground truth
    blockwise  pure PyTorch block-sparse flash-style attention; skips blocks that share no document
    npu        torch_npu.npu_fusion_attention, TND layout, sparse_mode=3 (as MindSpeed-LLM calls it)
    cuda       torch.nn.attention.varlen.varlen_attn (or flash_attn.flash_attn_varlen_func)
    padded     dense causal SDPA over each full row; ignores documents (the baseline of one doc per row)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from packer import boundaries

BACKENDS = ("reference", "blockwise", "npu", "cuda", "padded")


@dataclass(frozen=True, slots=True)
class VarlenMeta:
    cu_seqlens: torch.Tensor  # (n_seg+1,) int32, leading 0, last == T, on the tensors' device
    max_seqlen: int  # longest segment
    actual_seq_len: list[int]  # cu_seqlens[1:] as python ints (Ascend form)
    num_rows: int  # B
    row_len: int  # S; T = B*S

    @property
    def total_tokens(self) -> int:
        return self.num_rows * self.row_len

    def __post_init__(self) -> None:
        # Checked on the python copy of the offsets so that building a meta never syncs with the device.
        ends = self.actual_seq_len
        T = self.num_rows * self.row_len
        if not ends or ends[-1] != T:
            raise ValueError(f"actual_seq_len must end at T = num_rows*row_len = {T}, got {ends[-8:]}")
        if any(b < a for a, b in zip([0, *ends], ends, strict=False)):
            raise ValueError(f"actual_seq_len must be non-decreasing cumulative ends, got {ends}")
        if missing := sorted(set(range(self.row_len, T, self.row_len)) - set(ends)):
            raise ValueError(
                f"a segment crosses a row boundary at token(s) {missing[:4]}; end every row's last document "
                f"(or padding tail) at a multiple of row_len={self.row_len}"
            )
        if self.cu_seqlens.dtype != torch.int32 or self.cu_seqlens.numel() != len(ends) + 1:
            raise ValueError(
                f"cu_seqlens must be int32 of length {len(ends) + 1}, got {self.cu_seqlens.dtype} "
                f"of length {self.cu_seqlens.numel()}; build metas with VarlenMeta.from_rows"
            )
        longest = max(b - a for a, b in zip([0, *ends], ends, strict=False))
        if self.max_seqlen != longest:
            raise ValueError(f"max_seqlen={self.max_seqlen} but the longest segment is {longest}")

    @classmethod
    def from_rows(
        cls, doc_lens_per_row: Sequence[Sequence[int]], row_len: int, device: torch.device | str | None = None
    ) -> VarlenMeta:
        """Meta for B rows of `row_len` tokens; a row whose documents fall short gets one padding-tail segment.

        >>> VarlenMeta.from_rows([[3, 2], [5]], row_len=8).actual_seq_len
        [3, 5, 8, 13, 16]
        """
        lens: list[int] = []
        for r, row in enumerate(doc_lens_per_row):
            row = [int(n) for n in row]
            if any(n < 0 for n in row) or sum(row) > row_len:
                raise ValueError(
                    f"row {r}: document lengths {row} must be >= 0 and sum to <= row_len={row_len}"
                )
            lens += row
            if sum(row) < row_len:
                lens.append(row_len - sum(row))
        return cls.from_segment_lens(lens, num_rows=len(doc_lens_per_row), row_len=row_len, device=device)

    @classmethod
    def from_segment_lens(
        cls, seg_lens: Sequence[int], num_rows: int, row_len: int, device: torch.device | str | None = None
    ) -> VarlenMeta:
        # the project's one lengths -> offsets function (int32, leading 0)
        cu = boundaries.cu_seqlens(seg_lens)
        return cls(
            cu_seqlens=torch.from_numpy(cu).to(device),
            max_seqlen=max((int(n) for n in seg_lens), default=0),
            actual_seq_len=cu[1:].tolist(),
            num_rows=num_rows,
            row_len=row_len,
        )

    def segments(self) -> list[tuple[int, int]]:
        """[(start, end), ...] of every segment, empty ones included."""
        ends = self.actual_seq_len
        return list(zip([0, *ends[:-1]], ends, strict=True))


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: VarlenMeta) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(
            f"expected q (T, Hq, D), k and v (T, Hkv, D); got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    T, Hq, D = q.shape
    if k.shape[0] != T or k.shape[2] != D:
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} disagree on T or head_dim")
    if Hq % k.shape[1]:
        raise ValueError(f"grouped-query attention needs Hq % Hkv == 0, got Hq={Hq}, Hkv={k.shape[1]}")
    if meta.total_tokens != T:
        raise ValueError(
            f"q has {T} tokens but meta describes {meta.num_rows} rows x {meta.row_len} = {meta.total_tokens}"
        )


def _reference(q, k, v, meta: VarlenMeta, scale: float) -> torch.Tensor:
    """Exact softmax(q k^T * scale + causal) v per segment, in fp32."""
    G = q.shape[1] // k.shape[1]
    outs = []
    for start, end in meta.segments():
        if end == start:
            continue  # zero-length documents own no tokens
        L = end - start
        qs = q[start:end].float().transpose(0, 1)  # (Hq, L, D)
        ks = k[start:end].float().repeat_interleave(G, dim=1).transpose(0, 1)  # (Hq, L, D)
        vs = v[start:end].float().repeat_interleave(G, dim=1).transpose(0, 1)
        scores = (qs @ ks.transpose(1, 2)) * scale  # (Hq, L, L)
        future = torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1)
        probs = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        outs.append((probs @ vs).transpose(0, 1).to(q.dtype))  # (L, Hq, D)
    # Segments tile [0, T) in order, so concatenating them rebuilds the stream.
    return torch.cat(outs, dim=0)


def _padded(q, k, v, meta: VarlenMeta, scale: float) -> torch.Tensor:
    """Dense causal SDPA over each full row of S tokens; documents inside a row are NOT separated."""
    B, S = meta.num_rows, meta.row_len
    _, Hq, D = q.shape
    rows = [x.view(B, S, x.shape[1], D).transpose(1, 2) for x in (q, k, v)]  # (B, H, S, D)
    out = F.scaled_dot_product_attention(*rows, is_causal=True, scale=scale, enable_gqa=Hq != k.shape[1])
    return out.transpose(1, 2).reshape(B * S, Hq, D)


# ---------------------------------------------------------------------------------------------------------
# blockwise: flash-attention's tiling and online softmax, in plain PyTorch, skipping blocks that share no doc


@dataclass(frozen=True, slots=True)
class BlockPlan:
    """Which (q-block, k-block) tiles of the T x T score matrix get computed.

    T=16, block 4, docs [5, 3, 0, 8]: segment id per token 00000111 33333333 (the empty doc 2 owns none).

        q\\k  0 1 2 3      M = computed with an element mask, F = computed unmasked,
         0   M . . .      . = skipped: above the diagonal, or no document in common
         1   M M . .      6 of the 10 causal tiles are computed (dense causal: all 10)
         2   . . M .
         3   . . F M
    """

    block_size: int
    num_blocks: int
    tiles: tuple[tuple[int, tuple[tuple[int, bool], ...]], ...]  # (i, ((j, needs_mask), ...) diagonal first)

    @property
    def computed(self) -> int:
        return sum(len(js) for _, js in self.tiles)

    @property
    def masked(self) -> int:
        return sum(m for _, js in self.tiles for _, m in js)


def _segment_ids(meta: VarlenMeta) -> list[int]:
    """Segment id of every token; empty segments own no token, so ids may jump (0,0,2,...)."""
    ids: list[int] = []
    prev = 0
    for s, end in enumerate(meta.actual_seq_len):
        ids += [s] * (end - prev)
        prev = end
    return ids


def block_plan(meta: VarlenMeta, block_size: int = 128) -> BlockPlan:
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    seg = _segment_ids(meta)
    T = len(seg)
    nb = -(-T // block_size)
    lo = [seg[i * block_size] for i in range(nb)]  # ids are non-decreasing, so a block's docs are [lo, hi]
    hi = [seg[min((i + 1) * block_size, T) - 1] for i in range(nb)]
    tiles = []
    for i in range(nb):
        js = []
        # k-blocks j <= i (causal); k-block j shares a doc with q-block i iff hi[j] >= lo[i]. Going down from
        # the diagonal, hi[j] only shrinks, so stop at the first block that misses.
        for j in range(i, -1, -1):
            if hi[j] < lo[i]:
                break
            # below the diagonal and all of both blocks in one document: every score is kept
            full = j < i and lo[j] == hi[i]
            js.append((j, not full))
        tiles.append((i, tuple(js)))
    return BlockPlan(block_size=block_size, num_blocks=nb, tiles=tuple(tiles))


def _blockwise(q, k, v, meta: VarlenMeta, scale: float, block_size: int = 128) -> torch.Tensor:
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    plan = block_plan(meta, block_size)
    seg = torch.tensor(_segment_ids(meta), device=q.device)
    pos = torch.arange(T, device=q.device)
    # Group q heads under their kv head so GQA needs no repeat: q head h uses kv head h // G.
    q_HGTD = q.float().view(T, Hkv, G, D).permute(1, 2, 0, 3)
    k_HDT = k.float().permute(1, 2, 0).unsqueeze(1)  # (Hkv, 1, D, T)
    v_HTD = v.float().permute(1, 0, 2).unsqueeze(1)  # (Hkv, 1, T, D)
    bs = block_size
    outs = []
    for i, js in plan.tiles:
        qs = slice(i * bs, min((i + 1) * bs, T))
        qb = q_HGTD[:, :, qs] * scale
        m = denom = acc = None
        # Diagonal block first: it holds every query's own key, so the running max is finite from the start
        # and later fully-masked rows add exp(-inf) = 0 instead of NaN.
        for j, needs_mask in js:
            ks = slice(j * bs, min((j + 1) * bs, T))
            s = qb @ k_HDT[..., ks]  # (Hkv, G, bq, bk)
            if needs_mask:
                keep = (seg[qs, None] == seg[None, ks]) & (pos[qs, None] >= pos[None, ks])
                s = s.masked_fill(~keep, float("-inf"))
            # The max only keeps exp() in range; the result does not depend on it, so keep it out of autograd.
            s_max = s.detach().amax(dim=-1, keepdim=True)
            m_new = s_max if m is None else torch.maximum(m, s_max)
            p = torch.exp(s - m_new)
            pv = p @ v_HTD[:, :, ks]
            if m is None:
                denom, acc = p.sum(-1, keepdim=True), pv
            else:
                alpha = torch.exp(m - m_new)
                denom = denom * alpha + p.sum(-1, keepdim=True)
                acc = acc * alpha + pv
            m = m_new
        outs.append(acc / denom)  # (Hkv, G, bq, D)
    out = torch.cat(outs, dim=2)  # (Hkv, G, T, D)
    return out.permute(2, 0, 1, 3).reshape(T, Hq, D).to(q.dtype)


# ---------------------------------------------------------------------------------------------------------
# npu: torch_npu.npu_fusion_attention in TND layout, called the way MindSpeed-LLM calls it for packed data

# sparse_mode 2/3/4 take this fixed "compressed" causal mask, whatever the sequence length
NPU_MASK_SIZE = 2048
NPU_SPARSE_MODE = 3  # rightDownCausal: causal within each (actual_seq_qlen, actual_seq_kvlen) segment
NPU_PRE_TOCKENS = 65536  # MindSpeed-LLM's defaults; sparse_mode=3 ignores both
NPU_NEXT_TOCKENS = 0


@functools.lru_cache(maxsize=4)
def npu_causal_mask(device: torch.device | str = "cpu") -> torch.Tensor:
    """(2048, 2048) bool, True above the diagonal (= masked out), built once per device like MindSpeed-LLM."""
    return torch.triu(torch.ones(NPU_MASK_SIZE, NPU_MASK_SIZE, device=device), diagonal=1).bool()


def _torch_npu_kernel() -> Callable[..., tuple]:
    try:
        import torch_npu  # here, not at module import: CPU/CUDA users never need it
    except ImportError as e:
        raise ImportError(
            "attention backend 'npu' needs torch_npu and an Ascend NPU with CANN: `pip install torch-npu` at the "
            "version matching your torch and CANN; without an NPU use backend 'auto'"
        ) from e
    return torch_npu.npu_fusion_attention


def npu_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: VarlenMeta,
    scale: float | None = None,
    kernel: Callable[..., tuple] | None = None,
) -> torch.Tensor:
    """npu backend with the kernel injectable (tests pass trainer.npu_emulator.npu_fusion_attention).

    TND: q is (T, N1, D), k/v (T, N2, D) with N1 % N2 == 0 (GQA is native, no repeat); head_num is N1.
    actual_seq_qlen/kvlen are CUMULATIVE ends as python ints ([5, 3, 0, 8] -> [5, 8, 8, 16]); passing them
    as host lists avoids a device->host copy per layer.
    """
    _check_inputs(q, k, v, meta)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    kernel = _torch_npu_kernel() if kernel is None else kernel
    out = kernel(
        q,
        k,
        v,
        q.shape[1],
        "TND",
        pse=None,
        padding_mask=None,
        atten_mask=npu_causal_mask(q.device),
        scale=scale,
        keep_prob=1.0,
        pre_tockens=NPU_PRE_TOCKENS,
        next_tockens=NPU_NEXT_TOCKENS,
        inner_precise=0,
        actual_seq_qlen=list(meta.actual_seq_len),
        actual_seq_kvlen=list(meta.actual_seq_len),
        sparse_mode=NPU_SPARSE_MODE,
    )
    return out[0]  # (attention_out, softmax_max, softmax_sum, softmax_out, seed, offset, mask_len)


# ---------------------------------------------------------------------------------------------------------
# cuda: torch's own varlen kernel (FlashAttention-2 inside), flash-attn as the fallback for older torch


def _cuda_kernel() -> tuple[str, Callable]:
    try:
        from torch.nn.attention.varlen import varlen_attn  # torch >= 2.10

        return "torch", varlen_attn
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_varlen_func

        return "flash_attn", flash_attn_varlen_func
    except ImportError as e:
        raise ImportError(
            f"attention backend 'cuda' needs torch >= 2.10 (torch.nn.attention.varlen) or flash-attn; this is torch "
            f"{torch.__version__}: `pip install -U torch` or `pip install flash-attn --no-build-isolation`"
        ) from e


def _cuda(q, k, v, meta: VarlenMeta, scale: float) -> torch.Tensor:
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"attention backend 'cuda' runs FlashAttention, which takes float16/bfloat16, got {q.dtype}; "
            "train in bf16 (or autocast) or use backend 'blockwise' / 'reference' for fp32"
        )
    name, kernel = _cuda_kernel()
    cu, n = meta.cu_seqlens.to(q.device, non_blocking=True), meta.max_seqlen  # no-op when already there
    if name == "torch":
        # window (-1, 0) is how varlen_attn spells causal; GQA is native (enable_gqa), no repeat of k/v.
        return kernel(
            q, k, v, cu, cu, n, n, scale=scale, window_size=(-1, 0), enable_gqa=q.shape[1] != k.shape[1]
        )
    return kernel(q, k, v, cu, cu, n, n, softmax_scale=scale, causal=True)  # flash-attn: GQA native too


# ---------------------------------------------------------------------------------------------------------


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: VarlenMeta,
    backend: str,
    scale: float | None = None,
    block_size: int = 128,
) -> torch.Tensor:
    """Causal attention within each segment of `meta`. q (T, Hq, D), k/v (T, Hkv, D) -> (T, Hq, D).

    `scale` defaults to 1/sqrt(D); `block_size` is used by the blockwise backend only.
    """
    _check_inputs(q, k, v, meta)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if backend == "reference":
        return _reference(q, k, v, meta, scale)
    if backend == "blockwise":
        return _blockwise(q, k, v, meta, scale, block_size)
    if backend == "npu":
        return npu_varlen_attention(q, k, v, meta, scale)
    if backend == "cuda":
        return _cuda(q, k, v, meta, scale)
    if backend == "padded":
        return _padded(q, k, v, meta, scale)
    raise ValueError(
        f"unknown attention backend {backend!r}; choose one of {BACKENDS}, or resolve 'auto' with "
        "resolve_backend()"
    )


def resolve_backend(requested: str, device: torch.device | str) -> str:
    """Turn a user's choice into a backend that can run on `device`.

    'auto' / 'varlen' pick the fused varlen kernel of the device (npu, cuda) and the exact reference on CPU.
    """
    device = torch.device(device)
    if requested in ("auto", "varlen"):
        if device.type == "npu":
            return "npu"
        if device.type == "cuda":
            return resolve_backend("cuda", device)
        return "reference"
    if requested == "npu" and device.type != "npu":
        raise ValueError(
            f"attention backend 'npu' needs an Ascend NPU device, got {device}; on this device use 'auto' "
            "(or 'reference' / 'blockwise'); the npu path can be unit-tested with trainer.npu_emulator"
        )
    if requested == "cuda":
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(
                f"attention backend 'cuda' needs a CUDA device, got {device} (cuda available: "
                f"{torch.cuda.is_available()}); use 'auto' (reference on CPU) or 'blockwise'"
            )
        _cuda_kernel()  # fail now, with the pip command, rather than at the first forward
        return "cuda"
    if requested not in BACKENDS:
        raise ValueError(
            f"unknown attention backend {requested!r}; choose 'auto', 'varlen' or one of {BACKENDS}"
        )
    return requested


def attention_flops(
    meta: VarlenMeta, backend: str, n_heads: int, head_dim: int, block_size: int = 128
) -> dict:
    """Forward attention FLOPs (QK^T + PV) one layer computes for `meta`, and how many of them are useful.

    A (query, key) score costs 4*head_dim FLOPs per head: 2*D for q.k and 2*D for p.v (multiply-add = 2).
    useful = causal pairs inside segments, sum L*(L+1)/2; a padding-tail segment counts as a segment here,
    since the meta cannot tell it from a document. computed:
        reference/npu/cuda  exactly the useful pairs (fused kernels round up to their tiles; not modelled)
        padded              a full causal triangle per row, B * S*(S+1)/2, documents ignored
        blockwise           every element of every computed tile (masked elements are computed, then dropped)
    Softmax, masking and backward (about 2.5x forward for flash-style kernels) are not counted.
    """
    per_pair = 4 * head_dim * n_heads
    seg_lens = [e - s for s, e in meta.segments()]
    useful = sum(n * (n + 1) // 2 for n in seg_lens)
    T, S = meta.total_tokens, meta.row_len
    out: dict = {"backend": backend, "tokens": T}
    if backend in ("reference", "npu", "cuda"):
        computed = useful
    elif backend == "padded":
        computed = meta.num_rows * S * (S + 1) // 2
    elif backend == "blockwise":
        plan = block_plan(meta, block_size)
        rows = [min(block_size, T - i * block_size) for i in range(plan.num_blocks)]
        computed = sum(rows[i] * rows[j] for i, js in plan.tiles for j, _ in js)
        nb = plan.num_blocks
        # What a causal block kernel that knows rows but not documents computes: the same plan, one segment a row.
        rows_only = VarlenMeta.from_segment_lens([S] * meta.num_rows, meta.num_rows, S)
        dense = block_plan(rows_only, block_size).computed
        out |= {
            "block_size": block_size,
            "blocks_total": nb * nb,
            "blocks_dense_causal": dense,
            "blocks_computed": plan.computed,
            "blocks_masked": plan.masked,  # computed with an element mask (partially covered)
            "blocks_skipped": nb * nb - plan.computed,
            "skipped_fraction": 1 - plan.computed / (nb * nb),
            "skipped_fraction_vs_dense_causal": 1 - plan.computed / dense,
        }
    else:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    out |= {
        "pairs_computed": computed,
        "pairs_useful": useful,
        "flops_computed": computed * per_pair,
        "flops_useful": useful * per_pair,
        "flops_per_token": computed * per_pair / T,
        "useful_fraction": useful / computed if computed else 1.0,
    }
    return out
